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
from persona_probe.core.types import LayerId
from persona_probe.directions.derive import (
    DirectionSet,
    check_direction_fits,
    cosine_matrix,
    load_direction,
    project,
    unit,
)
from persona_probe.models.loading import ModelHandle
from persona_probe.report.figures import fig_div, heatmap_figure, write_figure, write_page


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


def parse_direction_spec(arg: str) -> tuple[str, str, str | None]:
    """FOLDER | NAME=FOLDER | NAME=FOLDER@LAYER -> (name, folder, layer or None); name defaults to the folder's."""
    name, _, rest = arg.partition("=") if "=" in arg else (None, "", arg)
    folder, _, layer = rest.partition("@")
    return (name or Path(folder).name), folder, (layer or None)


def _layer_id(layer: Any) -> LayerId:
    """A layer given on the command line or in Python (15, "15", "embed") as a LayerId."""
    if layer == "embed" or isinstance(layer, int):
        return layer
    try:
        return int(layer)
    except (TypeError, ValueError):
        raise PersonaProbeError(f"layer {layer!r} must be an integer or 'embed'") from None


def _layer_span(layers: Sequence[LayerId]) -> str:
    """[embed, 0, 1, 2, 5] -> 'embed, 0-2, 5' (the layers a direction covers, for error messages)."""
    parts: list[str] = ["embed"] if "embed" in layers else []
    ints = sorted(L for L in layers if isinstance(L, int))
    i = 0
    while i < len(ints):
        j = i
        while j + 1 < len(ints) and ints[j + 1] == ints[j] + 1:
            j += 1
        parts.append(str(ints[i]) if i == j else f"{ints[i]}-{ints[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


def compare_directions(specs: Sequence[str], *, layer: Any = None, per_layer: bool = False,
                       out: str | Path | None = None) -> dict[str, Any]:
    """Cosine similarities between directions (FOLDER, NAME=FOLDER or NAME=FOLDER@LAYER), all at ONE layer.

    Comparing each direction at its own selected layer would mix layers (deceptive@14 vs malicious@4 says
    little), so every direction is taken at `layer` (default: the first direction's selected layer; a spec's
    @LAYER pins that one direction on purpose). `per_layer=True` gives one matrix per layer every direction
    covers instead. A direction that lacks the layer is a one-line error naming the layers it covers.
    The first direction's random control (same norm) is included as a row. `out`: cosine.json + cosine.html.

    Returns {"layer", "names", "cosine" [k][k]} or, per layer, {"layers", "names", "cosine": {layer: [k][k]}}.
    """
    if not specs:
        raise PersonaProbeError("no directions to compare")
    loaded = [(name, folder, L, load_direction(folder)) for name, folder, L in map(parse_direction_spec, specs)]
    seen = [name for name, *_ in loaded]
    if len(set(seen)) < len(seen):
        raise PersonaProbeError(f"two directions are named {next(n for n in seen if seen.count(n) > 1)!r}: "
                                "name them apart with NAME=FOLDER")
    first = loaded[0][3]
    if per_layer:
        if layer is not None or any(L is not None for _, _, L, _ in loaded):
            raise PersonaProbeError("per-layer comparison takes every shared layer: drop --layer and @LAYER")
        layers = [L for L in first.layers if all(L in d.layers for *_, d in loaded)]
        if not layers:
            raise PersonaProbeError("the directions share no layer: " + "; ".join(
                f"{name} covers {_layer_span(d.layers)}" for name, _, _, d in loaded))
        mats = {L: _matrix(loaded, {name: L for name, *_ in loaded}) for L in layers}
        names = mats[layers[0]][0]
        res: dict[str, Any] = {"layers": layers, "names": names,
                               "cosine": {str(L): _rounded(m) for L, (_, m) in mats.items()}}
        if out:  # one page, one heatmap per layer
            write_page(Path(out) / "cosine.html", "cosine similarity between directions, per layer",
                       [(f"layer {L}", fig_div(heatmap_figure(names, m, f"cosine similarity at layer {L}")))
                        for L, (_, m) in mats.items()])
    else:
        at = _layer_id(layer if layer is not None else (loaded[0][2] or first.best_layer))
        chosen = {name: _layer_id(L) if L is not None else at for name, _, L, _ in loaded}
        missing = [f"{name} has no layer {chosen[name]} (it covers {_layer_span(d.layers)})"
                   for name, _, _, d in loaded if chosen[name] not in d.layers]
        if missing:
            raise PersonaProbeError(f"cannot compare at layer {at}: " + "; ".join(missing) + " (choose with --layer)")
        names, m = _matrix(loaded, chosen, suffix=True)
        res = {"layer": at, "names": names, "cosine": _rounded(m)}
        if out:
            write_figure(heatmap_figure(names, m, f"cosine similarity between directions at layer {at}"),
                         Path(out) / "cosine.html")
    if out:
        atomic_write_json(Path(out) / "cosine.json", res)
    return res


def _matrix(loaded: Sequence[tuple[str, str, Any, DirectionSet]], layer_of: dict[str, LayerId], *,
            suffix: bool = False) -> tuple[list[str], Tensor]:
    """Names and cosine matrix of the directions at their layers (+ the first direction's random control)."""
    vecs: dict[str, Tensor] = {}
    for i, (name, _, _, d) in enumerate(loaded):
        L = layer_of[name]
        vecs[f"{name}@{L}" if suffix else name] = d.at(L)
        if i == 0 and d.random is not None:
            vecs[f"random-control@{L}" if suffix else "random-control"] = d.random[d.layers.index(L)]
    return cosine_matrix(vecs)


def _rounded(m: Tensor) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in m]
