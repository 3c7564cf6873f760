"""Character directions: difference of means, held-out layer selection, random control, comparisons.

Pure functions on tensors. Sign convention everywhere: **positive = character** (misaligned side).
A direction is stored raw (mean_pos - mean_neg, per layer, `[n_layers, d_model]`); projections use
the unit vector, so a projection is in residual-stream units along the direction.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from persona_probe.core.artifacts import base_manifest, load_tensors, read_manifest, save_tensors, write_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_write_json
from persona_probe.core.splits import seeded_split
from persona_probe.core.stats import auroc, auroc_columns, cohens_d
from persona_probe.core.types import LayerId
from persona_probe.report.figures import layer_separation_figure, write_figure

MIN_PER_SIDE = 6  # with test_frac=0.25 that leaves >= 2 held-out examples per side


# ----------------------------------------------------------------------------- vector math


def diff_of_means(pos: Tensor, neg: Tensor) -> Tensor:
    """[n_pos, L, d], [n_neg, L, d] -> [L, d] = mean(pos) - mean(neg)."""
    return pos.float().mean(0) - neg.float().mean(0)


def unit(v: Tensor, eps: float = 1e-12) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def project(x: Tensor, v: Tensor) -> Tensor:
    """Scalar projection of x [..., d] onto the unit direction of v [d] -> [...]."""
    return x.float() @ unit(v.float())


def project_layers(x: Tensor, v: Tensor) -> Tensor:
    """Per-layer projections: x [n, L, d], v [L, d] -> [n, L]."""
    return torch.einsum("nld,ld->nl", x.float(), unit(v.float()))


def random_like(v: Tensor, seed: int) -> Tensor:
    """Random directions with the same per-layer norm as v [L, d] (seeded control)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape, generator=g, dtype=torch.float32)
    return unit(r) * v.float().norm(dim=-1, keepdim=True)


def cosine(a: Tensor, b: Tensor) -> float:
    return float(unit(a.float().flatten()) @ unit(b.float().flatten()))


def cosine_matrix(vectors: dict[str, Tensor]) -> tuple[list[str], Tensor]:
    """Names and [k, k] cosine similarities between named directions (each [d])."""
    names = list(vectors)
    if not names:
        raise PersonaProbeError("no directions to compare")
    widths = {v.shape[-1] for v in vectors.values()}
    if len(widths) > 1:
        raise PersonaProbeError(f"directions of different widths {sorted(widths)} cannot be compared")
    m = unit(torch.stack([vectors[k].float().flatten() for k in names]))
    return names, m @ m.T


grouped_split = seeded_split  # the old name, kept for importers: use core.splits.seeded_split


# ----------------------------------------------------------------------------- layer selection


@dataclass
class LayerStats:
    layer: LayerId
    norm: float
    auroc: float
    cohens_d: float
    random_auroc: float
    random_cohens_d: float
    cos_prev: float | None
    cos_next: float | None
    # over N_RANDOM further random directions: mean AUROC (~0.5 by symmetry) and mean best-sign AUROC
    # max(AUROC, 1 - AUROC), i.e. how separable the two sides are along a *random* direction
    random_auroc_mean: float | None = None
    random_best_sign_auroc_mean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


SELECTION_RULE = ("best layer = highest held-out AUROC among decoder layers (not 'embed'); ties within 0.005 "
                  "broken by larger held-out Cohen's d, then by the earlier layer")


N_RANDOM = 32


def layer_stats(direction: Tensor, random: Tensor, pos_test: Tensor, neg_test: Tensor,
                layers: Sequence[LayerId], seed: int = 0) -> list[LayerStats]:
    """Per-layer held-out separation of the direction and of the random control(s)."""
    pp, pn = project_layers(pos_test, direction), project_layers(neg_test, direction)
    rp, rn = project_layers(pos_test, random), project_layers(neg_test, random)
    g = torch.Generator().manual_seed(seed + 2)
    many = torch.randn((N_RANDOM, direction.shape[-1]), generator=g)
    out = []
    for i, L in enumerate(layers):
        mp, mn = pos_test[:, i].float() @ many.T, neg_test[:, i].float() @ many.T  # [n, N_RANDOM]
        aucs = auroc_columns(mp, mn).tolist()
        out.append(LayerStats(
            layer=L, norm=float(direction[i].norm()), auroc=auroc(pp[:, i], pn[:, i]),
            cohens_d=cohens_d(pp[:, i], pn[:, i]), random_auroc=auroc(rp[:, i], rn[:, i]),
            random_cohens_d=cohens_d(rp[:, i], rn[:, i]),
            cos_prev=cosine(direction[i], direction[i - 1]) if i > 0 else None,
            cos_next=cosine(direction[i], direction[i + 1]) if i + 1 < len(layers) else None,
            random_auroc_mean=sum(aucs) / N_RANDOM,
            random_best_sign_auroc_mean=sum(max(a, 1 - a) for a in aucs) / N_RANDOM,
        ))
    return out


def select_layer(stats: Sequence[LayerStats]) -> LayerId:
    cands = [s for s in stats if s.layer != "embed"] or list(stats)
    best_auc = max(s.auroc for s in cands)
    top = [s for s in cands if s.auroc >= best_auc - 0.005]
    top.sort(key=lambda s: (-(s.cohens_d if not math.isnan(s.cohens_d) else -1e9), int(s.layer)))
    return top[0].layer


# ----------------------------------------------------------------------------- direction sets


@dataclass
class DirectionSet:
    """Per-layer directions `vectors` [L, d] (+ seeded random control), with stats and manifest."""

    vectors: Tensor
    layers: list[LayerId]
    manifest: dict[str, Any]
    random: Tensor | None = None
    stats: list[LayerStats] = field(default_factory=list)

    @property
    def best_layer(self) -> LayerId:
        return self.manifest["best_layer"]

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[-1])

    def at(self, layer: LayerId | None = None) -> Tensor:
        """Raw direction [d] at `layer` (default: the selected best layer)."""
        L = self.best_layer if layer is None else layer
        if L not in self.layers:
            raise PersonaProbeError(f"layer {L} has no direction here (layers: {self.layers})")
        return self.vectors[self.layers.index(L)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"directions": self.vectors}
        if self.random is not None:
            tensors["random"] = self.random
        save_tensors(folder / "directions.safetensors", tensors)
        report = {"best_layer": self.best_layer, "selection_rule": SELECTION_RULE,
                  "layers": [s.to_dict() for s in self.stats]}
        atomic_write_json(folder / "report.json", report)
        write_manifest(folder, self.manifest)
        if self.stats:
            write_figure(layer_separation_figure(self.stats, title=self.manifest.get("name", "direction")),
                         folder / "layers.html")
        return folder


def load_direction(folder: str | Path) -> DirectionSet:
    folder = Path(folder)
    m = read_manifest(folder, kind="direction")
    t = load_tensors(folder / "directions.safetensors")
    if "directions" not in t:
        raise PersonaProbeError(f"{folder}/directions.safetensors has no 'directions' tensor: recompute it")
    layers = [L if L == "embed" else int(L) for L in m["layers"]]
    if t["directions"].shape[0] != len(layers):
        raise PersonaProbeError(f"{folder}: {t['directions'].shape[0]} vectors but {len(layers)} layers in manifest")
    stats = []
    rp = folder / "report.json"
    if rp.exists():
        stats = [LayerStats(**s) for s in json.loads(rp.read_text())["layers"]]
    m["best_layer"] = m["best_layer"] if m["best_layer"] == "embed" else int(m["best_layer"])
    return DirectionSet(t["directions"], layers, m, t.get("random"), stats)


def _check_compatible(a: Any, b: Any, *, same_model: bool) -> None:
    ma, mb = a.manifest, b.manifest
    if ma["layers"] != mb["layers"]:
        raise PersonaProbeError("activation sets have different layers: extract both with the same --layers")
    if ma["model"]["d_model"] != mb["model"]["d_model"]:
        raise PersonaProbeError(f"activation widths differ ({ma['model']['d_model']} vs {mb['model']['d_model']}): "
                                "they come from different models")
    fa = (ma["model"]["fingerprint"], ma["model"].get("adapter_fingerprint"))
    fb = (mb["model"]["fingerprint"], mb["model"].get("adapter_fingerprint"))
    if same_model and fa != fb:
        raise PersonaProbeError("activation sets come from different models: use the model-diff route for that, "
                                "or extract both sides with the same --model/--adapter")
    if not same_model and fa == fb:
        raise PersonaProbeError("model diff needs two different models (e.g. base vs base + adapter); both sets "
                                "come from the same weights")


def derive(
    pos: Any,
    neg: Any,
    *,
    position: str = "prompt_last",
    method: str = "persona",
    name: str = "direction",
    groups_pos: Sequence[str] | None = None,
    groups_neg: Sequence[str] | None = None,
    test_frac: float = 0.25,
    seed: int = 0,
    extra_manifest: dict[str, Any] | None = None,
) -> DirectionSet:
    """Difference-of-means direction per layer from two ActivationSets, with held-out layer selection.

    method: "persona" (character vs neutral system prompt), "response" (misaligned vs aligned
    responses) — both need the same model — or "model_diff" (fine-tuned minus base on the same prompts).
    The direction is fit on the train split; AUROC/Cohen's d are measured on held-out groups.
    """
    _check_compatible(pos, neg, same_model=method != "model_diff")
    if method == "model_diff" and pos.manifest["prompt_set"]["hash"] != neg.manifest["prompt_set"]["hash"]:
        raise PersonaProbeError("model diff needs both models run on the same prompt set (prompt hashes differ)")
    xp, xn = pos.get(position), neg.get(position)
    for label, x in (("positive", xp), ("negative", xn)):
        if len(x) < MIN_PER_SIDE:
            raise PersonaProbeError(f"{label} side has {len(x)} prompts; a held-out split needs at least "
                                    f"{MIN_PER_SIDE} per side")
    gp = list(groups_pos) if groups_pos is not None else [_group(r) for r in pos.records]
    gn = list(groups_neg) if groups_neg is not None else [_group(r) for r in neg.records]
    # split by group across both sides: a held-out question is held out on both sides
    train_groups, _ = seeded_split(sorted(set(gp) | set(gn)), test_frac, seed)
    keep = {sorted(set(gp) | set(gn))[i] for i in train_groups}
    tr_p = [i for i, g in enumerate(gp) if g in keep]
    te_p = [i for i, g in enumerate(gp) if g not in keep]
    tr_n = [i for i, g in enumerate(gn) if g in keep]
    te_n = [i for i, g in enumerate(gn) if g not in keep]
    if min(len(tr_p), len(te_p), len(tr_n), len(te_n)) < 1:
        raise PersonaProbeError(f"too few distinct prompts/questions for a held-out split (need >= {MIN_PER_SIDE} "
                                "per side across at least 4 questions)")
    vec = diff_of_means(xp[tr_p], xn[tr_n])
    layers = pos.layers
    zero = [L for L, n in zip(layers, vec.norm(dim=-1).tolist()) if n == 0.0]
    if len(zero) == len(layers):
        raise PersonaProbeError("zero-norm difference of means at every layer: both sides have identical "
                                "activations (same prompts and model?)")
    rand = random_like(vec, seed + 1)
    stats = layer_stats(vec, rand, xp[te_p], xn[te_n], layers, seed=seed)
    best = select_layer(stats)
    manifest = base_manifest(
        "direction", name=name, method=method, position=position, layers=[str(L) for L in layers],
        best_layer=best, selection_rule=SELECTION_RULE, sign="positive = character (pos side)",
        normalisation="raw difference of means per layer; projections use the unit vector",
        split={"seed": seed, "test_frac": test_frac, "n_train": [len(tr_p), len(tr_n)],
               "n_test": [len(te_p), len(te_n)]},
        model=pos.manifest["model"], base_model=neg.manifest["model"] if method == "model_diff" else None,
        sources={"pos": _source(pos), "neg": _source(neg)}, seed=seed, random_control_seed=seed + 1,
        **(extra_manifest or {}),
    )
    return DirectionSet(vec, list(layers), manifest, rand, stats)


def _group(rec: Any) -> str:
    return str(rec.labels.get("question_id", rec.user))


def _source(acts: Any) -> dict[str, Any]:
    m = acts.manifest
    return {"folder": str(acts.folder) if acts.folder else None, "prompt_set": m.get("prompt_set"),
            "backend": m.get("backend"), "positions": m.get("positions")}


def check_direction_fits(direction: DirectionSet, handle: Any, *, force: bool = False) -> None:
    """Refuse a direction of another width; warn (or refuse without `force`) one from another model."""
    if direction.d_model != handle.d_model:
        raise PersonaProbeError(f"direction width {direction.d_model} does not match the model's d_model "
                                f"{handle.d_model}: derive the direction on this model")
    src = direction.manifest.get("model", {})
    if src and src.get("fingerprint") != handle.info.fingerprint:
        msg = (f"direction was derived on {src.get('model_id')} ({src.get('fingerprint')}), not on "
               f"{handle.info.model_id} ({handle.info.fingerprint})")
        if not force:
            raise PersonaProbeError(msg + ": pass --force to use it anyway")
        warnings.warn(msg, stacklevel=2)
