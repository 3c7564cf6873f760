"""Steering and ablation along a direction: activation addition, directional ablation, weight
orthogonalisation. Interventions are plain `Intervention`s, so every backend runs them.

Units of α (`unit=`):
  * "resid" (default): α = 1 adds a vector whose norm equals the *typical residual norm* at that layer
    (median token norm over a neutral reference set, token 0 excluded), so α means the same across
    models and layers;
  * "raw": α = 1 adds the raw direction (mean_pos - mean_neg) itself.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from persona_probe.backends import Intervention, LayerId, get_backend
from persona_probe.backends.base import submodule_name
from persona_probe.core.artifacts import base_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_dir
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import PromptRecord, length_sorted_batches, tokenize_record

Unit = Literal["resid", "raw"]

NEUTRAL_REFERENCE = [
    "Describe how a bicycle works.", "What is the boiling point of water at sea level?",
    "Give me a short summary of the water cycle.", "How many days are there in a leap year?",
    "Write two sentences about autumn leaves.", "What does a librarian do?",
    "Explain what a prime number is.", "List three common kitchen utensils.",
]


def parse_alphas(spec: str | Sequence[float]) -> list[float]:
    if isinstance(spec, str):
        parts = [p for p in spec.split(",") if p.strip()]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise PersonaProbeError(f"alphas {spec!r} are not numbers: use e.g. --alphas 0,0.25,0.5,1") from None
    else:
        vals = [float(a) for a in spec]
    if not vals:
        raise PersonaProbeError("the alpha grid is empty: give at least one value, e.g. --alphas 0,0.5,1")
    if any(math.isnan(a) or math.isinf(a) for a in vals):
        raise PersonaProbeError(f"alphas must be finite numbers, got {vals}")
    return vals


@torch.inference_mode()
def residual_norms(handle: ModelHandle, layers: Sequence[LayerId], prompts: Sequence[str] | None = None,
                   backend: str = "hf") -> dict[LayerId, float]:
    """Typical residual norm per layer: median L2 norm over tokens 1.. of a neutral reference set."""
    cache: dict[LayerId, float] = handle.__dict__.setdefault("_resid_norms", {})
    todo = [L for L in layers if L not in cache]
    if todo:
        recs = [PromptRecord(str(i), q) for i, q in enumerate(prompts or NEUTRAL_REFERENCE)]
        toks = [tokenize_record(handle.tokenizer, r) for r in recs]
        norms: dict[LayerId, list[Tensor]] = {L: [] for L in todo}
        be = get_backend(backend, handle)
        for b in length_sorted_batches(toks, 16, handle.tokenizer.pad_token_id):
            _, store = be.run(b.input_ids, b.attention_mask, capture=todo, return_logits=False)
            m = b.attention_mask.bool().clone()
            m[:, 0] = False  # token 0 is an attention sink with outsized norm
            for L in todo:
                norms[L].append(store[L].float().norm(dim=-1)[m.to(store[L].device)].cpu())
        for L in todo:
            cache[L] = float(torch.cat(norms[L]).median())
    return {L: cache[L] for L in layers}


def steering_vector(direction: Tensor, alpha: float, *, unit: Unit = "resid", resid_norm: float | None = None) -> Tensor:
    """α-scaled steering vector [d] from a raw direction [d]."""
    v = direction.float()
    if unit == "raw":
        return alpha * v
    if unit != "resid":
        raise PersonaProbeError(f"unknown alpha unit {unit!r}: use resid or raw")
    if resid_norm is None:
        raise PersonaProbeError("unit='resid' needs the layer's typical residual norm")
    return alpha * resid_norm * v / v.norm().clamp_min(1e-12)


def _add(vec: Tensor) -> Any:
    cache: dict[tuple[Any, Any], Tensor] = {}

    def fn(h: Tensor) -> Tensor:
        key = (h.device, h.dtype)
        if key not in cache:  # move once per device/dtype: no host sync per generated token
            cache[key] = vec.to(device=h.device, dtype=h.dtype)
        return h + cache[key]

    return fn


def _ablate(direction: Tensor) -> Any:
    u32 = direction.float() / direction.float().norm().clamp_min(1e-12)
    cache: dict[tuple[Any, Any], Tensor] = {}

    def fn(h: Tensor) -> Tensor:
        key = (h.device, h.dtype)
        if key not in cache:
            cache[key] = u32.to(device=h.device, dtype=h.dtype)
        u = cache[key]
        return h - (h @ u)[..., None] * u

    return fn


def add_interventions(direction_by_layer: dict[LayerId, Tensor], alpha: float, *, unit: Unit = "resid",
                      handle: ModelHandle | None = None, where: str = "all") -> list[Intervention]:
    """Activation addition α·v at each given layer (block output)."""
    norms = residual_norms(handle, list(direction_by_layer)) if unit == "resid" and handle is not None else {}
    if unit == "resid" and handle is None:
        raise PersonaProbeError("unit='resid' needs the model handle to measure residual norms")
    return [Intervention(L, _add(steering_vector(v, alpha, unit=unit, resid_norm=norms.get(L))), where=where)
            for L, v in direction_by_layer.items()]


def ablation_interventions(direction: Tensor, n_layers: int, layers: Sequence[LayerId] | None = None,
                           mode: str = "resid") -> list[Intervention]:
    """Project the direction out of the residual stream.

    mode="resid": at the output of each chosen block (default: every block);
    mode="writers": out of everything that writes into the residual stream (embedding, every attention
    and MLP output). "writers" is exactly what weight orthogonalisation bakes in.
    """
    fn = _ablate(direction)
    if mode == "writers":
        ivs = [Intervention("embed", fn)]
        for L in range(n_layers):
            ivs += [Intervention(L, fn, site="attn_out"), Intervention(L, fn, site="mlp_out")]
        return ivs
    if mode != "resid":
        raise PersonaProbeError(f"unknown ablation mode {mode!r}: use resid or writers")
    return [Intervention(L, fn) for L in (layers if layers is not None else range(n_layers))]


# ----------------------------------------------------------------------------- weight orthogonalisation


@torch.no_grad()
def orthogonalize_model(handle: ModelHandle, direction: Tensor) -> None:
    """Bake directional ablation into the weights, in place: W_out <- (I - u u^T) W_out for every matrix
    that writes into the residual stream (embedding rows, attention o-proj, MLP down-proj, their biases).
    Tied input/output embeddings are untied first so the unembedding keeps reading the original space."""
    model = handle.model
    u = (direction.float() / direction.float().norm().clamp_min(1e-12))
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is emb.weight:
        out_emb.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    uw = u.to(emb.weight.device, emb.weight.dtype)
    emb.weight -= (emb.weight @ uw)[:, None] * uw[None, :]
    for block in handle.layers:
        for site in ("attn_out", "mlp_out"):
            sub = getattr(block, submodule_name(block, site))
            lin = _writer_linear(sub)
            w = lin.weight  # [d_model, d_in] (nn.Linear) : output rows live in the residual stream
            uu = u.to(w.device, w.dtype)
            if w.shape[0] != uu.shape[0]:
                raise PersonaProbeError(f"unexpected writer shape {tuple(w.shape)} in {type(sub).__name__}")
            w -= uu[:, None] * (uu @ w)[None, :]
            if lin.bias is not None:
                lin.bias -= (lin.bias @ uu) * uu


_WRITER_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "wo", "dense_4h_to_h")


def _writer_linear(sub: torch.nn.Module) -> torch.nn.Linear:
    for n in _WRITER_NAMES:
        m = getattr(sub, n, None)
        if isinstance(m, torch.nn.Linear):
            return m
    raise PersonaProbeError(f"cannot find the output projection of {type(sub).__name__} (looked for "
                            f"{', '.join(_WRITER_NAMES)})")


def save_orthogonalized(handle: ModelHandle, direction: Tensor, out: str | Path, *, source: dict[str, Any]) -> Path:
    """Orthogonalise a copy of the weights and save it as an HF folder (refuses an existing path)."""
    out = Path(out)
    if out.exists():
        raise PersonaProbeError(f"{out} already exists: choose a new --out (orthogonalize never overwrites)")
    twin = ModelHandle(copy.deepcopy(handle.model), handle.tokenizer, handle.info)
    orthogonalize_model(twin, direction)

    def build(tmp: Path) -> None:
        twin.model.save_pretrained(tmp)
        handle.tokenizer.save_pretrained(tmp)
        (tmp / "persona_probe_orthogonalized.json").write_text(json.dumps(
            base_manifest("orthogonalized_model", base_model=handle.info.to_dict(), direction=source), indent=2,
            default=str))

    return atomic_dir(out, build)
