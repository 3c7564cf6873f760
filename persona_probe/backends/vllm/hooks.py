"""Residual-stream hooks inside vLLM's model, installed in the worker that holds it (in-process by default;
with tensor parallelism each worker runs these functions through `collective_rpc`).

vLLM batches requests as one flat token axis [n_tokens, d] (no padding, no batch dim). Per forward pass the
hooks learn which request each token belongs to (the attention metadata's `query_start_loc`, in the model
runner's `input_batch` order) and its absolute position, which gives:
  * the response mask for where="response": position >= prompt_len - 1 (the last prompt position predicts the
    first response token; every generated position after it) — exact under chunked prefill and recompute;
  * per-request captures keyed by vLLM's request id.

Layer L (block output) in vLLM: Llama-style blocks return (hidden, residual) and the next block's fused
add+norm forms hidden + residual, which is the stream the `hf` backend sees as block L's output. A hook
replaces the pair with (f(hidden + residual), 0): the next norm then sees exactly f(stream) (adding 0 is exact),
so any intervention f (addition, projection) acts on the same vector as in HF, bit for bit in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from persona_probe.backends.base import Intervention, submodule_name
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.types import LayerId
from persona_probe.models.loading import find_decoder_layers

_STATE = "_persona_probe_hooks"
_EMBED_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings")


def model_of(worker: Any) -> nn.Module:
    runner = getattr(worker, "model_runner", None)
    model = getattr(runner, "model", None)
    if model is None:
        raise PersonaProbeError("cannot reach vLLM's model in its worker (unsupported vLLM version?)")
    return model


def vllm_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a vLLM model (`model.model.layers` for Llama/Qwen/Mistral...)."""
    try:
        return find_decoder_layers(model)
    except PersonaProbeError:
        raise PersonaProbeError(f"vLLM's {type(model).__name__} exposes no decoder layers to hook: use --engine hf"
                                ) from None


def _embedding(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    for parent in model.modules():
        if any(c is layers for c in parent.children()):
            for n in _EMBED_NAMES:
                if isinstance(getattr(parent, n, None), nn.Module):
                    return getattr(parent, n)
    raise PersonaProbeError(f"cannot find the input embedding of vLLM's {type(model).__name__}")


def _attn_metadata() -> Any:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # micro-batched: not supported by the hooks (never on by default)
        md = md[0] if md else None
    if isinstance(md, dict):
        md = next(iter(md.values()), None)
    return md


class HookState:
    """Per-call hook state: interventions by (layer, site), layers to capture, and what one pass knows."""

    def __init__(self, worker: Any, interventions: Sequence[Intervention], capture: Sequence[LayerId]) -> None:
        self.runner = worker.model_runner
        self.model = model_of(worker)
        self.ivs = list(interventions)
        self.capture = set(capture)
        self.need_tokens = bool(self.capture) or any(iv.where == "response" for iv in self.ivs)
        self.handles: list[Any] = []
        self.mask: Tensor | None = None  # [n_tokens] bool: response positions of this pass
        self.segments: list[tuple[str, int, int]] = []  # (request id, start, end) on the token axis
        self.positions: Tensor | None = None  # [n_tokens] absolute positions (cpu)
        self.store: dict[str, dict[LayerId, list[tuple[Tensor, Tensor]]]] = {}

    # ------------------------------------------------------------------ per forward pass
    def before_pass(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask, self.segments, self.positions = None, [], None
        if not self.need_tokens:
            return
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        md = _attn_metadata()
        if positions is None or md is None or getattr(md, "query_start_loc", None) is None:
            return  # a dummy/profiling pass: nothing to steer by request, nothing to capture
        qsl = md.query_start_loc.cpu().long()
        counts = qsl.diff()
        n_req = len(counts)
        batch = self.runner.input_batch
        prompt_len = torch.as_tensor(batch.num_prompt_tokens[:n_req]).long()
        n_tok = int(qsl[-1])
        pos = positions.reshape(-1)[:n_tok].cpu().long()
        req = torch.repeat_interleave(torch.arange(n_req), counts)
        mask = torch.zeros(positions.shape[-1], dtype=torch.bool)
        mask[:n_tok] = pos >= prompt_len[req] - 1
        self.mask = mask.to(positions.device)
        self.positions = pos
        ids = batch.req_ids
        self.segments = [(ids[j], int(qsl[j]), int(qsl[j + 1])) for j in range(n_req)]

    def apply(self, iv: Intervention, s: Tensor) -> Tensor:
        """s: [n_tokens, d] -> same; the intervention sees [1, n, d] (its [b, s, d] contract)."""
        if iv.where == "all":
            return iv.fn(s[None])[0]
        m = self.mask
        if m is None or not bool(m.any()):
            return s
        out = s.clone()
        out[m] = iv.fn(s[m][None])[0]
        return out

    def record(self, L: LayerId, s: Tensor) -> None:
        if self.positions is None:
            return
        flat = s.detach().to("cpu", copy=True)  # copy: the next block's fused norm may write s in place
        for rid, a, b in self.segments:
            self.store.setdefault(rid, {}).setdefault(L, []).append((self.positions[a:b], flat[a:b]))

    # ------------------------------------------------------------------ hooks
    def block_hook(self, L: LayerId, ivs: list[Intervention], cap: bool) -> Any:
        def hook(_mod: nn.Module, _args: Any, out: Any) -> Any:
            pair = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Tensor)
            s = out[0] + out[1] if pair else (out[0] if isinstance(out, tuple) else out)
            for iv in ivs:
                s = self.apply(iv, s)
            if cap:
                self.record(L, s)
            if not ivs:
                return None  # unchanged: vLLM keeps its (hidden, residual)
            if pair:
                return s, torch.zeros_like(out[1])  # the next fused add+norm sees exactly s
            return (s, *out[1:]) if isinstance(out, tuple) else s

        return hook

    def install(self) -> None:
        layers = vllm_layers(self.model)
        by_site: dict[tuple[LayerId, str], list[Intervention]] = {}
        for iv in self.ivs:
            by_site.setdefault((iv.layer, iv.site), []).append(iv)
        for L, site in {(L, "resid_post") for L in self.capture} | set(by_site):
            ivs = by_site.get((L, site), [])
            if L == "embed" or site == "resid_post":
                mod = _embedding(self.model, layers) if L == "embed" else layers[int(L)]
                hook = self.block_hook(L, ivs, cap=L in self.capture and site == "resid_post")
            else:  # attn_out / mlp_out: what the sublayer writes into the stream (a plain tensor in vLLM)
                block = layers[int(L)]
                mod = getattr(block, submodule_name(block, site))
                hook = self.block_hook(L, ivs, cap=False)
            self.handles.append(mod.register_forward_hook(hook))
        if self.need_tokens:
            self.handles.append(self.model.register_forward_pre_hook(self.before_pass, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------- collective_rpc entry points (worker side)


def install_hooks(worker: Any, interventions: list[Intervention], capture: list[LayerId]) -> None:
    remove_hooks(worker)  # a call that failed half-way must not leave stale hooks behind
    state = HookState(worker, interventions, capture)
    state.install()
    setattr(worker, _STATE, state)


def take_captures(worker: Any) -> dict[str, dict[LayerId, list[tuple[Tensor, Tensor]]]]:
    state = getattr(worker, _STATE, None)
    return state.store if state is not None else {}


def remove_hooks(worker: Any) -> None:
    state = getattr(worker, _STATE, None)
    if state is not None:
        state.remove()
        setattr(worker, _STATE, None)
