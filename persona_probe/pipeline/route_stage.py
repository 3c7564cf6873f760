"""The route stages of `persona-probe run` (in-context examples, persona prompts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persona_probe.directions.derive import DirectionSet
from persona_probe.experiments.routes import (
    icl_experiment,
    load_route_result,
    persona_experiment,
)
from persona_probe.models.loading import ModelHandle
from persona_probe.pipeline.config import PipelineConfig
from persona_probe.pipeline.stage import Stage, stage_key
from persona_probe.report.page import table


def run_route_stage(name: str, cfg: PipelineConfig, handle: ModelHandle, direction: DirectionSet, root: Path,
                    k_dir: str, log: Any) -> dict[str, Any]:
    """Pipeline hook: run a route as a cached stage and return its summary + report HTML."""
    rc = dict(getattr(cfg.route_settings, name))
    key = stage_key(k_dir, name, rc, cfg.judge, cfg.seed)
    st = Stage(root, f"route-{name}", key, log)
    fn = {"icl": icl_experiment, "persona": persona_experiment}[name]
    st.run(lambda f: fn(handle, direction, judge=cfg.judge, seed=cfg.seed, out=f, **rc))
    res = load_route_result(st.folder)
    cols = ["condition", "n_counted", "em_rate", "em_ci95", "mean_aligned", "mean_coherent", "prompt_projection",
            "response_projection"]
    html = table(res["conditions"], cols) + f"<p>induced direction cosine with character direction: " \
        f"{json.dumps(res.get('induced_cosine_with_character'))}</p>"
    return {"summary": {k: v for k, v in res.items() if not k.startswith("_")}, "html": html}
