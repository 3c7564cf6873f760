"""The one small interface every backend implements.

Layer convention (everywhere in persona_probe):
    layer L   = output of decoder block L  (0-based)
              = HF `hidden_states[L + 1]` for L < n_layers - 1 (HF's last entry is post-final-norm!)
              = TransformerBridge `blocks.L.hook_resid_post`
              = nnsight `model.model.layers[L].output`
    "embed"   = input embeddings (= HF `hidden_states[0]`, TL `hook_embed`).

A backend can (a) capture the residual stream at chosen layers and (b) apply interventions
(functions resid -> resid) at chosen layers, during a forward pass and during `generate`.
Captured values are taken *after* the interventions at that layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.layers import check_layers  # noqa: F401 (part of the backend interface)
from persona_probe.core.types import LayerId
from persona_probe.models.loading import ModelHandle

Where = Literal["all", "response"]
Site = Literal["resid_post", "attn_out", "mlp_out"]
SITES = ("resid_post", "attn_out", "mlp_out")


@dataclass
class Intervention:
    """Apply `fn` ([b, s, d] -> [b, s, d]) to the residual stream at `layer`.

    where="all": every position. where="response": only positions that predict response tokens,
    i.e. the last prompt position and every generated position (in `generate`), or the positions
    given by `response_mask` (in `run`).
    """

    layer: LayerId
    fn: Callable[[Tensor], Tensor]
    where: Where = "all"
    # resid_post = block output (default); attn_out / mlp_out = what the attention / MLP writes into the
    # residual stream (TL hook_attn_out / hook_mlp_out): ablating every writer equals weight orthogonalisation
    site: Site = "resid_post"


def layer_order(L: LayerId) -> int:
    return -1 if L == "embed" else int(L)


def site_order(key: tuple[LayerId, str]) -> tuple[int, int]:
    """Execution order of (layer, site) within a forward pass."""
    return layer_order(key[0]), SITES.index(key[1]) if key[1] != "resid_post" else 9


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def submodule_name(layer_module: torch.nn.Module, site: str) -> str:
    """Attribute name of the attention / MLP submodule of a decoder block."""
    for n in (_ATTN_NAMES if site == "attn_out" else _MLP_NAMES):
        if isinstance(getattr(layer_module, n, None), torch.nn.Module):
            return n
    raise PersonaProbeError(f"cannot find the {site} submodule of {type(layer_module).__name__}")


class StepState:
    """Tracks prefill vs decode steps of a generate call (for where="response")."""

    def __init__(self, response_mask: Tensor | None = None, generating: bool = False,
                 prompt_width: int | None = None) -> None:
        self.response_mask = response_mask
        self.generating = generating
        # generate() without a KV cache re-runs the whole sequence each step: with the (left-padded) prompt
        # width known, "response" = columns from the last prompt column on, whatever the pass's length
        self.prompt_width = prompt_width
        self.step = 0

    def apply(self, iv: Intervention, h: Tensor) -> Tensor:
        if iv.where == "all":
            return iv.fn(h)
        if self.generating:
            if self.prompt_width is not None:
                if h.shape[1] < self.prompt_width:  # a cached decode step: only generated positions
                    return iv.fn(h)
                start = self.prompt_width - 1
            elif self.step > 0:  # decode steps: every position is generated
                return iv.fn(h)
            else:
                start = h.shape[1] - 1
            # the last prompt column predicts the first response token (prompts are left-padded)
            out = h.clone()
            out[:, start:] = iv.fn(h[:, start:])
            return out
        if self.response_mask is None:
            return h
        m = self.response_mask.to(h.device)[..., None]
        return torch.where(m.bool(), iv.fn(h), h)


class Backend(ABC):
    name: ClassVar[str]

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle

    @abstractmethod
    def run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        capture: Sequence[LayerId] = (),
        interventions: Sequence[Intervention] = (),
        response_mask: Tensor | None = None,
        return_logits: bool = True,
    ) -> tuple[Tensor | None, dict[LayerId, Tensor]]:
        """One forward pass. Returns (logits [b, s, vocab] or None, {layer: resid [b, s, d]})."""

    @abstractmethod
    def generate(
        self, input_ids: Tensor, attention_mask: Tensor, interventions: Sequence[Intervention] = (), **gen_kwargs: Any
    ) -> Tensor:
        """Generate from left-padded prompts. Returns [b, s_prompt + new] token ids."""

    def _to_device(self, *ts: Tensor) -> list[Tensor]:
        dev = self.handle.device
        return [t.to(dev) for t in ts]


def gen_defaults(handle: ModelHandle, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    tok = handle.tokenizer
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    kw.update(gen_kwargs)
    if not kw.get("do_sample", False):
        kw.pop("temperature", None)
        kw.pop("top_p", None)
        kw.pop("top_k", None)
    return kw
