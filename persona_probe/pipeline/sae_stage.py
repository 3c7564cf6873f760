"""The pipeline's SAE stage: decompose the character direction on an SAE and diff persona vs neutral features."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona_probe.activations.tokens import pooled_layer_rows
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_write_json
from persona_probe.directions.derive import DirectionSet
from persona_probe.models.loading import ModelHandle
from persona_probe.pipeline.config import PipelineConfig
from persona_probe.pipeline.stage import Stage, stage_key
from persona_probe.prompts.records import contrast_questions, persona_records
from persona_probe.report.sae import sae_section_html, write_top_examples
from persona_probe.sae.features import decompose, diff_features, top_examples
from persona_probe.sae.handle import SAEHandle, find_trained_sae, load_sae


def _resolve(sc: dict[str, Any], enabled: Any, handle: ModelHandle, direction: DirectionSet,
             log: Callable[[str], None]) -> tuple[str, str | None] | None:
    """(source, sae_id) of the SAE to use, or None to skip the stage."""
    src, sae_id = sc.get("path") or sc.get("release"), sc.get("sae_id")
    if src is not None:
        return str(src), sae_id
    order = [direction.best_layer] + [L for L in direction.layers if L != direction.best_layer]
    found = find_trained_sae(handle, order)
    if found is not None:
        return str(found), sae_id
    if enabled is True:
        raise PersonaProbeError("sae.enabled is true but no SAE is given (sae.path or sae.release + "
                                f"sae_id) and none is trained for this model: run `persona-probe sae train "
                                f"--layer {direction.best_layer}` first")
    log("[sae] no SAE for this model: skipped (train one with `persona-probe sae train`)")
    return None


def _build(folder: Path, sae: SAEHandle, handle: ModelHandle, direction: DirectionSet, n_q: Any, top: int) -> None:
    """Write sae.json (decomposition, persona-vs-neutral diff, top contexts) and the top-examples page."""
    dec = decompose(sae, direction.at(sae.layer))
    qs = list(contrast_questions())[:n_q] if n_q else list(contrast_questions())
    trait = direction.manifest.get("trait") or direction.manifest.get("name") or "malicious"
    pos = persona_records(str(trait), "positive", qs)
    neg = persona_records(str(trait), "negative", qs)
    fd = diff_features(sae, pooled_layer_rows(handle, pos, int(sae.layer), "prompt_mean"),
                       pooled_layer_rows(handle, neg, int(sae.layer), "prompt_mean"), top=top,
                       labels=(str(trait), "neutral"))
    diff = fd.to_dict(top)
    feats = [r["feature"] for r in diff["top_by_mean"][:5]]
    exs = top_examples(sae, handle, pos + neg, feats, n=3)
    write_top_examples(exs, folder, title=f"SAE features: {trait} vs neutral")
    atomic_write_json(folder / "sae.json", {
        "sae": sae.describe(), "decomposition": dec.to_dict(top), "diff": diff,
        "examples": {str(f): [{"record_id": e.record_id, "max_act": e.max_act, "text": e.text()} for e in v]
                     for f, v in exs.items()}})


def run_sae_stage(cfg: PipelineConfig | dict[str, Any], handle: ModelHandle, direction: DirectionSet, root: Path,
                  k_dir: str, log: Any) -> dict[str, Any] | None:
    """Pipeline hook: decompose the character direction on an SAE and diff persona vs neutral features.

    `cfg.sae` (or `cfg["sae"]` of a plain mapping): enabled (true | false | "auto": use an SAE when one is
    available), path (local folder) or release + sae_id (sae-lens pretrained), n_questions, top. With "auto"
    and no SAE given, an SAE trained on this model by `persona-probe sae train` is used when one exists at
    the direction's layers.
    Returns {"summary": sae.json without the examples, "html": the report section}, or None when skipped."""
    sc = dataclasses.asdict(cfg.sae) if isinstance(cfg, PipelineConfig) else dict(cfg.get("sae") or {})
    enabled = sc.get("enabled", "auto")
    if enabled is False:
        return None
    which = _resolve(sc, enabled, handle, direction, log)
    if which is None:
        return None
    src, sae_id = which
    sae = load_sae(src, sae_id, handle=handle)
    if sae.layer not in direction.layers:
        raise PersonaProbeError(f"the SAE reads layer {sae.layer}, which the direction does not cover")
    n_q, top = sc.get("n_questions", 20), int(sc.get("top", 20))
    key = stage_key(k_dir, src, sae_id, n_q, top, (sae.manifest or {}).get("created"))
    st = Stage(root, "sae", key, log)
    st.run(lambda folder: _build(folder, sae, handle, direction, n_q, top))
    res = json.loads((st.folder / "sae.json").read_text())
    html_ = sae_section_html(res["sae"].get("source"), sae.layer, sae.d_sae, res["decomposition"]["shares"],
                             res["diff"]["top_by_mean"][:top], st.folder / "top_examples.html")
    return {"summary": {k: v for k, v in res.items() if k != "examples"}, "html": html_}


__all__ = ["run_sae_stage"]
