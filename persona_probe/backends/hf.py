"""Default backend: plain PyTorch forward hooks on the HF decoder blocks (fastest, no wrapper)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from persona_probe.backends.base import Backend, Intervention, LayerId, StepState, gen_defaults, submodule_name


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class HFBackend(Backend):
    name = "hf"

    def _module(self, L: LayerId, site: str = "resid_post") -> torch.nn.Module:
        if L == "embed":
            return self.handle.model.get_input_embeddings()
        block = self.handle.layers[int(L)]
        return block if site == "resid_post" else getattr(block, submodule_name(block, site))

    @contextmanager
    def hooked(self, capture: Sequence[LayerId], interventions: Sequence[Intervention], state: StepState,
               store: dict[LayerId, Tensor]) -> Iterator[None]:
        """Register hooks for the duration of the block (always removed, even on error)."""
        by_site: dict[tuple[LayerId, str], list[Intervention]] = {}
        for iv in interventions:
            by_site.setdefault((iv.layer, iv.site), []).append(iv)
        wanted = set(capture)
        handles = []
        for key in {(L, "resid_post") for L in wanted} | set(by_site):
            ivs = by_site.get(key, [])
            L, site = key
            cap = site == "resid_post" and L in wanted

            def hook(_mod: torch.nn.Module, _args: Any, out: Any, L: LayerId = L, ivs: list = ivs,
                     cap: bool = cap) -> Any:
                h = out[0] if isinstance(out, tuple) else out
                for iv in ivs:
                    h = state.apply(iv, h)
                if cap:
                    store[L] = h.detach()
                if not ivs:
                    return None  # unchanged output: let torch skip the replacement
                return (h, *out[1:]) if isinstance(out, tuple) else h

            handles.append(self._module(L, site).register_forward_hook(hook))
        if state.generating:
            def count(_mod: torch.nn.Module, _args: Any, _out: Any) -> None:
                state.step += 1

            handles.append(self.handle.model.register_forward_hook(count))
        try:
            yield
        finally:
            for hd in handles:
                hd.remove()

    @torch.inference_mode()
    def run(self, input_ids: Tensor, attention_mask: Tensor, capture: Sequence[LayerId] = (),
            interventions: Sequence[Intervention] = (), response_mask: Tensor | None = None,
            return_logits: bool = True) -> tuple[Tensor | None, dict[LayerId, Tensor]]:
        input_ids, attention_mask = self._to_device(input_ids, attention_mask)
        store: dict[LayerId, Tensor] = {}
        with self.hooked(capture, interventions, StepState(response_mask), store):
            kw = {} if return_logits or not _accepts_logits_to_keep(self.handle.model) else {"logits_to_keep": 1}
            out = self.handle.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return (out.logits if return_logits else None), store

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, interventions: Sequence[Intervention] = (),
                 **gen_kwargs: Any) -> Tensor:
        input_ids, attention_mask = self._to_device(input_ids, attention_mask)
        state = StepState(generating=True)
        with self.hooked((), interventions, state, {}):
            return self.handle.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                              **gen_defaults(self.handle, gen_kwargs))
