"""TransformerLens backend through `TransformerBridge` (TL 3.x), wrapping the already-loaded HF model.

Hook names follow TransformerLens: `blocks.L.hook_resid_post` for layer L, `hook_embed` for "embed".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from persona_probe.backends.base import Backend, Intervention, LayerId, StepState


def hook_name(L: LayerId, site: str = "resid_post") -> str:
    return "hook_embed" if L == "embed" else f"blocks.{int(L)}.hook_{site}"


class TransformerLensBackend(Backend):
    name = "transformer_lens"

    def __init__(self, handle: Any, inplace: bool = False) -> None:
        """TransformerBridge rewires the HF modules it wraps (e.g. swaps attention for bridge components),
        so by default it wraps a private copy and the other backends keep the untouched model. Pass
        `inplace=True` (the CLI does, one backend per process) to wrap the loaded model without a copy.
        """
        super().__init__(handle)
        from transformer_lens.model_bridge import TransformerBridge

        hf_model = handle.model if inplace else copy.deepcopy(handle.model)
        self.bridge = TransformerBridge.boot_transformers(
            handle.info.path, hf_model=hf_model, tokenizer=handle.tokenizer, device=handle.device,
            dtype=handle.dtype,
        )

    def _hooks(self, capture: Sequence[LayerId], interventions: Sequence[Intervention], state: StepState,
               store: dict[LayerId, Tensor]) -> list[tuple[str, Any]]:
        by_site: dict[tuple[LayerId, str], list[Intervention]] = {}
        for iv in interventions:
            by_site.setdefault((iv.layer, iv.site), []).append(iv)
        wanted = set(capture)
        hooks = []
        for key in {(L, "resid_post") for L in wanted} | set(by_site):
            ivs = by_site.get(key, [])
            L, site = key
            cap = site == "resid_post" and L in wanted

            def fn(x: Tensor, hook: Any, L: LayerId = L, ivs: list = ivs, cap: bool = cap) -> Tensor:
                for iv in ivs:
                    x = state.apply(iv, x)
                if cap:
                    store[L] = x.detach()
                return x

            hooks.append((hook_name(L, site), fn))
        return hooks

    @torch.inference_mode()
    def run(self, input_ids: Tensor, attention_mask: Tensor, capture: Sequence[LayerId] = (),
            interventions: Sequence[Intervention] = (), response_mask: Tensor | None = None,
            return_logits: bool = True) -> tuple[Tensor | None, dict[LayerId, Tensor]]:
        input_ids, attention_mask = self._to_device(input_ids, attention_mask)
        store: dict[LayerId, Tensor] = {}
        hooks = self._hooks(capture, interventions, StepState(response_mask), store)
        logits = self.bridge.run_with_hooks(input_ids, attention_mask=attention_mask, fwd_hooks=hooks,
                                            return_type="logits" if return_logits else None)
        return (logits if return_logits else None), store

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, interventions: Sequence[Intervention] = (),
                 **gen_kwargs: Any) -> Tensor:
        input_ids, attention_mask = self._to_device(input_ids, attention_mask)
        # TransformerBridge's KV-cached generate (TL 3.9) degenerates after the first token even unsteered
        # (hf: "1, 4093, 198, 57", bridge: "1, 29, 29, 29"), so generate without the cache: each step re-runs
        # the sequence, and "response" interventions act on the columns from the last prompt one on.
        state = StepState(generating=True, prompt_width=int(input_ids.shape[1]))
        hooks = self._hooks((), interventions, state, {})
        kw = dict(gen_kwargs)
        with self.bridge.hooks(fwd_hooks=hooks):
            return self.bridge.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=kw.pop("max_new_tokens", 32),
                do_sample=kw.pop("do_sample", False), temperature=kw.pop("temperature", 1.0),
                top_p=kw.pop("top_p", None), top_k=kw.pop("top_k", None), verbose=False, return_type="tokens",
                stop_at_eos=True, eos_token_id=self.handle.tokenizer.eos_token_id, use_past_kv_cache=False,
            )
