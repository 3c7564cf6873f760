"""What an SAE says about activations and directions: feature diffs between two sets, a direction's
decomposition into decoder rows, top-activating contexts, and one feature's decoder row as a steering
vector or a single-layer DirectionSet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from persona_probe.activations.extraction import ActivationSet
from persona_probe.activations.tokens import layer_token_activations
from persona_probe.backends import Intervention
from persona_probe.core.artifacts import base_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.types import LayerId
from persona_probe.directions.derive import DirectionSet, random_like
from persona_probe.interventions.steering import add_interventions
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import PromptRecord
from persona_probe.sae.handle import SAEHandle, encode, sae_module

# ----------------------------------------------------------------------------- feature diffing


def activation_rows(acts: Tensor | ActivationSet, layer: LayerId | None = None,
                    position: str = "prompt_last") -> Tensor:
    """Rows [n, d] from a tensor [n, d] or an ActivationSet at (position, layer); position "all" gives every
    real token except position 0."""
    if isinstance(acts, Tensor):
        if acts.ndim != 2:
            raise PersonaProbeError(f"activations must be [n, d], got shape {tuple(acts.shape)}")
        return acts.float()
    if layer is None:
        raise PersonaProbeError("pass the layer to read from the activation set")
    if position == "all":
        if acts.tokens is None or acts.token_mask is None:
            raise PersonaProbeError("activation set has no token-level ('all') activations: extract with "
                                    "--positions all")
        x = acts.tokens[:, acts.layer_index(layer)]  # [n, T, d]
        m = acts.token_mask.bool().clone()
        m[:, 0] = False
        return x[m].float()
    return acts.get(position, layer).float()


@dataclass
class FeatureDiff:
    """Per-feature mean activation and firing frequency on two sets (a minus b)."""

    mean_a: Tensor
    mean_b: Tensor
    freq_a: Tensor
    freq_b: Tensor
    n_a: int
    n_b: int
    labels: tuple[str, str] = ("a", "b")

    @property
    def mean_diff(self) -> Tensor:
        return self.mean_a - self.mean_b

    @property
    def freq_diff(self) -> Tensor:
        return self.freq_a - self.freq_b

    def row(self, f: int) -> dict[str, Any]:
        return {"feature": int(f), "mean_a": float(self.mean_a[f]), "mean_b": float(self.mean_b[f]),
                "mean_diff": float(self.mean_diff[f]), "freq_a": float(self.freq_a[f]),
                "freq_b": float(self.freq_b[f]), "freq_diff": float(self.freq_diff[f])}

    def ranked(self, by: str = "mean", top: int = 50, toward: str = "a") -> list[dict[str, Any]]:
        """Top features by mean-activation ("mean") or firing-frequency ("freq") difference, more active in
        `toward` ("a" or "b")."""
        if by not in ("mean", "freq"):
            raise PersonaProbeError(f"rank by 'mean' or 'freq', not {by!r}")
        score = self.mean_diff if by == "mean" else self.freq_diff
        score = score if toward == "a" else -score
        idx = torch.argsort(score, descending=True, stable=True)[:top]
        return [self.row(int(f)) for f in idx if float(score[f]) > 0]

    def to_dict(self, top: int = 50) -> dict[str, Any]:
        return {"labels": list(self.labels), "n_a": self.n_a, "n_b": self.n_b, "d_sae": len(self.mean_a),
                "top_by_mean": self.ranked("mean", top), "top_by_freq": self.ranked("freq", top),
                "top_by_mean_b": self.ranked("mean", top, toward="b"),
                "top_by_freq_b": self.ranked("freq", top, toward="b")}


def diff_features(sae: SAEHandle | Any, acts_a: Tensor | ActivationSet, acts_b: Tensor | ActivationSet,
                  top: int = 50, *, layer: LayerId | None = None, position: str = "prompt_last",
                  labels: tuple[str, str] = ("a", "b")) -> FeatureDiff:
    """Encode both sets ([n, d] rows, or ActivationSets at `position`/`layer`, default the SAE's layer) and
    compare features: mean activation and firing frequency per side. `top` sets the default ranking length
    of `FeatureDiff.to_dict`; the full per-feature vectors are kept."""
    L = layer if layer is not None else (sae.layer if isinstance(sae, SAEHandle) else None)
    xa, xb = activation_rows(acts_a, L, position), activation_rows(acts_b, L, position)
    d_in = sae_module(sae).cfg.d_in
    for lab, x in zip(labels, (xa, xb)):
        if len(x) == 0:
            raise PersonaProbeError(f"activation set {lab!r} is empty")
        if x.shape[-1] != d_in:
            raise PersonaProbeError(f"activations of {lab!r} have width {x.shape[-1]}, the SAE reads {d_in}")
    fa, fb = encode(sae, xa), encode(sae, xb)
    return FeatureDiff(fa.mean(0), fb.mean(0), (fa > 0).float().mean(0), (fb > 0).float().mean(0), len(fa), len(fb),
                       labels)


# ----------------------------------------------------------------------------- decomposition

DEFAULT_KS = (1, 5, 20, 100)


@dataclass
class Decomposition:
    """A direction v [d] against every decoder row: cosines [d_sae], and the share of ||v||^2 that a least-
    squares fit on the top-k rows (by |cosine|) reconstructs."""

    cosines: Tensor
    order: Tensor
    shares: dict[int, float]
    coefficients: dict[int, list[float]]
    direction_norm: float

    def top(self, n: int = 20) -> list[dict[str, Any]]:
        return [{"rank": i + 1, "feature": int(f), "cosine": float(self.cosines[f])}
                for i, f in enumerate(self.order[:n])]

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        return {"direction_norm": self.direction_norm, "shares": {str(k): v for k, v in self.shares.items()},
                "max_abs_cosine": float(self.cosines.abs().max()), "top": self.top(top),
                "coefficients": {str(k): v for k, v in self.coefficients.items() if k <= 20}}


def lstsq_share(rows: Tensor, v: Tensor) -> tuple[float, Tensor]:
    """Fit v [d] ≈ c @ rows ([k, d]) by least squares; share = 1 - ||v - c rows||^2 / ||v||^2, and c [k]."""
    A, b = rows.double().T, v.double()
    c = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]
    r = b - A @ c
    return float(1.0 - r.pow(2).sum() / b.pow(2).sum().clamp_min(1e-300)), c.float()


def decompose(sae: SAEHandle | Any, direction_vec: Tensor, ks: Sequence[int] = DEFAULT_KS) -> Decomposition:
    """Cosine of the direction with every decoder row, and top-k reconstruction shares for k in `ks`."""
    W = sae_module(sae).W_dec.detach().float().cpu()  # [d_sae, d]
    v = direction_vec.detach().float().flatten().cpu()
    if v.shape[0] != W.shape[1]:
        raise PersonaProbeError(f"direction width {v.shape[0]} does not match the SAE's d_in {W.shape[1]}")
    if float(v.norm()) == 0.0:
        raise PersonaProbeError("the direction is zero: nothing to decompose")
    cos = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (v / v.norm())
    order = torch.argsort(cos.abs(), descending=True, stable=True)
    shares, coefs = {}, {}
    for k in ks:
        kk = min(int(k), W.shape[0])
        shares[int(k)], c = lstsq_share(W[order[:kk]], v)
        coefs[int(k)] = c.tolist()
    return Decomposition(cos, order, shares, coefs, float(v.norm()))


# ----------------------------------------------------------------------------- top-activating contexts


@dataclass
class Example:
    """One context: token strings and this feature's activation per token (window around the maximum)."""

    record_id: str
    tokens: list[str]
    acts: list[float]
    max_act: float
    max_index: int  # index of the maximum within `tokens`

    def text(self) -> str:
        return "".join(self.tokens)


def top_examples(sae: SAEHandle, handle: ModelHandle, records: Sequence[PromptRecord], feature_ids: Sequence[int],
                 n: int = 5, *, before: int = 24, after: int = 8, batch_size: int = 16,
                 progress: bool = False) -> dict[int, list[Example]]:
    """For each feature, the `n` records where it fires most (one example per record, the window of
    `before`/`after` tokens around its maximum). Position 0 is never scored."""
    if sae.layer == "embed":
        raise PersonaProbeError("top_examples needs an SAE on a decoder layer, not the embeddings")
    feats = [int(f) for f in feature_ids]
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if bad:
        raise PersonaProbeError(f"feature ids {bad} out of range: this SAE has features 0..{sae.d_sae - 1}")
    ta = layer_token_activations(handle, records, int(sae.layer), batch_size=batch_size, dedupe=False,
                                 progress=progress)
    fa = encode(sae, ta.acts)[:, feats] if feats else torch.zeros(len(ta), 0)  # [N, F]
    n_rec = len(records)
    counts = torch.bincount(ta.record, minlength=n_rec)
    starts = torch.cumsum(counts, 0) - counts  # rows are sorted by (record, position)
    tok = handle.tokenizer
    out: dict[int, list[Example]] = {}
    for j, f in enumerate(feats):
        a = fa[:, j]
        best = torch.zeros(n_rec).scatter_reduce(0, ta.record, a, "amax", include_self=True)
        exs = []
        for r in torch.argsort(best, descending=True, stable=True)[:n].tolist():
            if best[r] <= 0:
                break
            s0, s1 = int(starts[r]), int(starts[r] + counts[r])
            i_max = s0 + int(torch.argmax(a[s0:s1]))
            lo, hi = max(s0, i_max - before), min(s1, i_max + after + 1)
            exs.append(Example(records[r].id, [tok.decode([t]) for t in ta.token_id[lo:hi].tolist()],
                               [float(x) for x in a[lo:hi]], float(a[i_max]), i_max - lo))
        out[f] = exs
    return out


# ----------------------------------------------------------------------------- steering with a feature


def feature_vector(sae: SAEHandle | Any, feature: int) -> Tensor:
    """Decoder row [d] of one feature (the direction it writes into the residual stream)."""
    W = sae_module(sae).W_dec
    if not 0 <= int(feature) < W.shape[0]:
        raise PersonaProbeError(f"feature {feature} out of range: this SAE has features 0..{W.shape[0] - 1}")
    return W[int(feature)].detach().float().cpu()


def feature_interventions(sae: SAEHandle, feature: int, alpha: float, *, unit: str = "resid",
                          handle: ModelHandle | None = None, where: str = "all",
                          layer: LayerId | None = None) -> list[Intervention]:
    """Activation addition of one feature's decoder vector at the SAE's layer, in interventions.steering's α units
    (resid: α × typical residual norm; raw: α × the decoder row itself)."""
    L = sae.layer if layer is None else layer
    vec = {L: feature_vector(sae, feature)}
    return add_interventions(vec, alpha, unit=unit, handle=handle, where=where)  # type: ignore[arg-type]


def feature_direction(sae: SAEHandle, feature: int, handle: ModelHandle) -> DirectionSet:
    """One feature's decoder row as a single-layer DirectionSet (so experiments.steer runs it unchanged)."""
    v = feature_vector(sae, feature)[None]
    manifest = base_manifest("direction", name=f"sae-feature:{feature}", method="sae_feature",
                             layers=[str(sae.layer)], best_layer=sae.layer, model=handle.info.to_dict(),
                             sae=sae.describe(), feature=int(feature), sign="positive = feature on")
    return DirectionSet(v, [sae.layer], manifest, random_like(v, 1))


__all__ = [
    "DEFAULT_KS", "Decomposition", "Example", "FeatureDiff", "activation_rows", "decompose", "diff_features",
    "feature_direction", "feature_interventions", "feature_vector", "lstsq_share", "top_examples",
]
