"""`persona-probe run`: the whole story in one command, every stage cached by manifest.

extract → character direction (+ random control) → steering sweep (judged) → routes (when enabled)
→ SAE decomposition (when an SAE is available) → report (self-contained HTML + report.json). Each stage's key
hashes its own settings plus the keys of the stages it depends on, so a rerun with one changed setting
recomputes only what depends on it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona_probe.backends.vllm import require_vllm
from persona_probe.core.artifacts import base_manifest
from persona_probe.core.paths import checkpoints_dir
from persona_probe.directions.derive import load_direction
from persona_probe.directions.workflows import persona_direction
from persona_probe.experiments.steer import steering_sweep
from persona_probe.models.loading import load_model
from persona_probe.pipeline.config import PipelineConfig, from_dict, load_config
from persona_probe.pipeline.route_stage import run_route_stage
from persona_probe.pipeline.sae_stage import run_sae_stage
from persona_probe.pipeline.stage import Stage, stage_key
from persona_probe.prompts.questions import as_questions
from persona_probe.report.figures import write_plotlyjs
from persona_probe.report.page import write_report

__all__ = ["load_config", "run_pipeline"]


def run_pipeline(config: PipelineConfig | dict[str, Any] | None = None, *, out: str | Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns report.json's content. Outputs land in `out`
    (default checkpoints/runs/<name>)."""
    cfg = config if isinstance(config, PipelineConfig) else from_dict(config or {})
    root = Path(out) if out else checkpoints_dir() / "runs" / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    write_plotlyjs(root)  # one plotly.js for every stage page of the run (report.html itself stays one file)
    t0 = time.time()
    m = cfg.model
    if cfg.engine == "vllm":
        require_vllm()  # before the model loads
    handle = load_model(m.model, adapter=m.adapter, device=m.device, dtype=m.dtype)
    handle.engine = cfg.engine
    model_key = stage_key(handle.info.fingerprint, handle.info.adapter_fingerprint, handle.info.dtype)
    seed = cfg.seed
    # the engine joins the stage keys only when not the default, so existing hf runs keep their cache
    backend = cfg.backend
    kb = backend if cfg.engine == "hf" else f"{backend}+{cfg.engine}"
    dcfg, scfg = cfg.direction, cfg.steering
    timings: dict[str, float] = {}

    k_dir = stage_key(model_key, dataclasses.asdict(dcfg), seed, kb)
    st = Stage(root, "direction", k_dir, log)
    t = time.time()
    st.run(lambda f: persona_direction(
        handle, dcfg.trait, position=dcfg.position, layers=dcfg.layers, n_questions=dcfg.n_questions,
        n_prompts=dcfg.n_prompts, backend=backend, batch_size=dcfg.batch_size, out=f, seed=seed,
        test_frac=dcfg.test_frac))
    timings["direction"] = time.time() - t
    direction = load_direction(st.folder)

    k_steer = stage_key(k_dir, dataclasses.asdict(scfg), cfg.judge, seed, kb)
    st_s = Stage(root, "steering", k_steer, log)
    t = time.time()
    qs = as_questions(scfg.questions, limit=scfg.questions_limit)
    st_s.run(lambda f: steering_sweep(
        handle, direction, layers=scfg.layers, alphas=scfg.alphas, questions=qs,
        n_samples=scfg.samples, unit=scfg.unit, where=scfg.where, include_random=scfg.include_random,
        judge=cfg.judge, max_new_tokens=scfg.max_new_tokens, temperature=scfg.temperature, seed=seed,
        batch_size=scfg.batch_size, backend=backend, out=f))
    timings["steering"] = time.time() - t

    extras: dict[str, Any] = {}
    for name, enabled in dataclasses.asdict(cfg.routes).items():
        if enabled:
            extras[name] = run_route_stage(name, cfg, handle, direction, root, k_dir, log)

    sae_res = run_sae_stage(cfg, handle, direction, root, k_dir, log)
    if sae_res is not None:
        extras["sae"] = sae_res

    manifest = base_manifest("run", config=cfg.to_dict(), model=handle.info.to_dict(), stage_keys={
        "direction": k_dir, "steering": k_steer}, seconds=round(time.time() - t0, 1),
        stage_seconds={k: round(v, 1) for k, v in timings.items()})
    report = write_report(root, manifest, direction, extras)
    log(f"report: {root / 'report.html'}")
    return report
