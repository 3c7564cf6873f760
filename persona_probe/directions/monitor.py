"""Projection monitor: score prompts/responses along a direction; compare directions by cosine."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from persona_probe.activations.extraction import ActivationSet, extract, parse_layers
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_write_json, atomic_write_text
from persona_probe.core.stats import pearson
from persona_probe.directions.derive import (
    DirectionSet,
    check_direction_fits,
    cosine_matrix,
    load_direction,
    project,
    unit,
)
from persona_probe.models.loading import ModelHandle
from persona_probe.report.figures import heatmap_figure, write_figure


def projections(acts: ActivationSet, direction: DirectionSet, position: str = "prompt_last",
                layers: Sequence[Any] | None = None) -> tuple[list[Any], Tensor]:
    """Projection of each record onto the direction at each layer -> (layers, [n, n_layers]).

    position="all" gives per-token projections [n, n_layers, T] (padding = nan).
    """
    Ls = list(layers) if layers is not None else [direction.best_layer]
    if direction.d_model != acts.d_model:
        raise PersonaProbeError(f"direction width {direction.d_model} != activation width {acts.d_model}")
    cols = []
    for L in Ls:
        v = unit(direction.at(L).float())
        if position == "all":
            if acts.tokens is None:
                raise PersonaProbeError("token-level projections need activations extracted with position 'all'")
            x = acts.tokens[:, acts.layer_index(L)].float() @ v  # [n, T]
            cols.append(torch.where(acts.token_mask.bool(), x, torch.nan))
        else:
            cols.append(project(acts.get(position, L), v))
    return Ls, torch.stack(cols, 1)


def project_prompts(handle: ModelHandle, direction: str | Path | DirectionSet, prompts: Any, *,
                    layers: Any = None, position: str = "prompt_last", backend: str = "hf", batch_size: int = 16,
                    out: str | Path | None = None, force: bool = False,
                    judge_key: str | None = "aligned") -> dict[str, Any]:
    """Extract, project, and (when records carry judge scores in labels[judge_key]) correlate."""
    d = direction if isinstance(direction, DirectionSet) else load_direction(direction)
    check_direction_fits(d, handle, force=force)
    Ls = [d.best_layer] if layers is None else parse_layers(layers, handle.n_layers)
    pos = "prompt_last" if position == "all" else position
    acts = extract(handle, prompts, layers=Ls, positions=[pos] + (["all"] if position == "all" else []),
                   backend=backend, batch_size=batch_size, progress=True)
    Ls, proj = projections(acts, d, position, Ls)
    rows = []
    for i, r in enumerate(acts.records):
        row: dict[str, Any] = {"id": r.id, "user": r.user, "system": r.system, "labels": r.labels}
        if position == "all":
            row["per_token"] = {str(L): [None if torch.isnan(v) else round(float(v), 4) for v in proj[i, j]]
                                for j, L in enumerate(Ls)}
        else:
            row["projection"] = {str(L): float(proj[i, j]) for j, L in enumerate(Ls)}
        rows.append(row)
    pooled = proj if position != "all" else torch.nanmean(proj, dim=-1)
    summary: dict[str, Any] = {"n": len(rows), "position": position, "layers": [str(L) for L in Ls],
                               "mean": {str(L): float(pooled[:, j].mean()) for j, L in enumerate(Ls)},
                               "std": {str(L): float(pooled[:, j].std()) for j, L in enumerate(Ls)}}
    if judge_key and all(judge_key in r.labels for r in acts.records):
        summary["pearson_with_" + judge_key] = {
            str(L): pearson(pooled[:, j].tolist(), [float(r.labels[judge_key]) for r in acts.records])
            for j, L in enumerate(Ls)}
    if out:
        o = Path(out)
        atomic_write_text(o / "projections.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(o / "summary.json", {**summary, "direction": d.manifest.get("name"),
                                               "model": handle.info.to_dict()})
    return {"rows": rows, "summary": summary}


def _parse_direction_arg(arg: str) -> tuple[str, str, str | None]:
    name, _, rest = arg.partition("=") if "=" in arg else (None, "", arg)
    folder, _, layer = rest.partition("@")
    return (name or Path(folder).name), folder, (layer or None)


def compare_directions(specs: Sequence[str], *, layer: Any = None, out: str | Path | None = None) -> dict[str, Any]:
    """Cosine matrix between directions given as FOLDER, NAME=FOLDER or NAME=FOLDER@LAYER."""
    vecs: dict[str, Tensor] = {}
    for s in specs:
        name, folder, L = _parse_direction_arg(s)
        d = load_direction(folder)
        at = L if L is not None else layer
        at = at if at in (None, "embed") else int(at)
        vecs[f"{name}@{at if at is not None else d.best_layer}"] = d.at(at)
        if d.random is not None and s == specs[0]:
            idx = d.layers.index(at if at is not None else d.best_layer)
            vecs[f"random-control@{at if at is not None else d.best_layer}"] = d.random[idx]
    names, m = cosine_matrix(vecs)
    res = {"names": names, "cosine": [[round(float(v), 4) for v in row] for row in m]}
    if out:
        atomic_write_json(Path(out) / "cosine.json", res)
        write_figure(heatmap_figure(names, m, "cosine similarity between directions"), Path(out) / "cosine.html")
    return res
