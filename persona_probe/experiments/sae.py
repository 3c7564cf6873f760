"""Steering with single SAE features against the full character direction (same layer, α units, seeds)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from persona_probe.core.errors import PersonaProbeError
from persona_probe.directions.derive import DirectionSet
from persona_probe.experiments.steer import response_projection, steering_sweep
from persona_probe.models.loading import ModelHandle
from persona_probe.sae.features import decompose, feature_direction
from persona_probe.sae.handle import SAEHandle


def compare_feature_steering(handle: ModelHandle, sae: SAEHandle, direction: DirectionSet,
                             features: Sequence[int], *, alphas: Sequence[float] = (0.0, 0.5, 1.0),
                             questions: str = "builtin:core", n_samples: int = 2, judge: str | None = "offline",
                             max_new_tokens: int = 48, unit: str = "resid", seed: int = 0, batch_size: int = 32,
                             progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Steer at the SAE's layer with the full character direction (plus its random control) and with each
    feature's decoder vector, same α grid and units, same seeds. Every cell reports the responses'
    projection on the *character direction* (read by the unsteered model), KL on neutral text and, with a
    judge, the EM rate. Thin over experiments.steer.steering_sweep / response_projection."""
    if sae.layer == "embed" or sae.layer not in direction.layers:
        raise PersonaProbeError(f"the direction has no vector at the SAE's layer {sae.layer}")
    kw: dict[str, Any] = {"layers": [int(sae.layer)], "questions": questions, "n_samples": n_samples, "unit": unit,
                          "judge": judge, "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size,
                          "progress": progress}
    base = steering_sweep(handle, direction, alphas=list(alphas), include_random=True, force=force, **kw)
    cells = [{**c, "source": c["condition"]} for c in base["cells"]]
    nonzero = [a for a in alphas if a != 0] or [1.0]
    for f in features:
        res = steering_sweep(handle, feature_direction(sae, f, handle), alphas=nonzero, include_random=False,
                             force=True, **kw)
        proj = response_projection(handle, direction, res["rows"])
        for c in res["cells"]:
            ps = [p for r, p in zip(res["rows"], proj) if r["alpha"] == c["alpha"]]
            cells.append({**c, "condition": f"feature {f}", "source": "feature", "feature": int(f),
                          "mean_projection": sum(ps) / max(len(ps), 1)})
    dec = decompose(sae, direction.at(sae.layer))
    return {"cells": cells, "layer": sae.layer, "unit": unit, "judge": base["judge"],
            "feature_cosines": {int(f): float(dec.cosines[int(f)]) for f in features},
            "note": "mean_projection = responses projected on the character direction at its best layer"}


__all__ = ["compare_feature_steering"]
