"""nnsight backend: envoy tracing over the already-loaded HF model.

`model.model.layers[L].output` is the block's output tensor (transformers >= 5 returns a tensor,
so `.output[0]` would be batch row 0, not the hidden state: we never index it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..loading import decoder_layer_path
from .base import Backend, Intervention, LayerId, StepState, gen_defaults, layer_order


class NNsightBackend(Backend):
    name = "nnsight"

    def __init__(self, handle: Any, remote: bool = False) -> None:
        super().__init__(handle)
        import warnings

        from nnsight import TransformersModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.lm = TransformersModel(handle.model, task="text-generation", tokenizer=handle.tokenizer)
        self.remote = remote
        self._layers_path = decoder_layer_path(handle.model).split(".")
        emb = handle.model.get_input_embeddings()
        self._embed_path = next(n for n, m in handle.model.named_modules() if m is emb).split(".")

    def _envoy(self, L: LayerId) -> Any:
        env: Any = self.lm
        for part in (self._embed_path if L == "embed" else self._layers_path):
            env = getattr(env, part)
        return env if L == "embed" else env[int(L)]

    @torch.inference_mode()
    def run(self, input_ids: Tensor, attention_mask: Tensor, capture: Sequence[LayerId] = (),
            interventions: Sequence[Intervention] = (), response_mask: Tensor | None = None,
            return_logits: bool = True) -> tuple[Tensor | None, dict[LayerId, Tensor]]:
        import nnsight

        input_ids, attention_mask = self._to_device(input_ids, attention_mask)
        state = StepState(response_mask)
        layers = sorted(set(capture) | {iv.layer for iv in interventions}, key=layer_order)  # run order
        wanted = set(capture)
        with self.lm.trace({"input_ids": input_ids, "attention_mask": attention_mask}, remote=self.remote):
            store = nnsight.save({})
            for L in layers:
                env = self._envoy(L)
                ivs = [iv for iv in interventions if iv.layer == L]
                if ivs:
                    h = env.output
                    for iv in ivs:
                        h = state.apply(iv, h)
                    env.output = h
                if L in wanted:
                    store[L] = env.output
            logits = self.lm.output.logits.save() if return_logits else None
        return logits, dict(store)

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, interventions: Sequence[Intervention] = (),
                 **gen_kwargs: Any) -> Tensor:
        input_ids, attention_mask = self._to_device(input_ids, attention_mask)
        state = StepState(generating=True)
        kw = gen_defaults(self.handle, gen_kwargs)
        layers = sorted({iv.layer for iv in interventions}, key=layer_order)
        import warnings

        with warnings.catch_warnings():
            # the open `iter[:]` loop "outruns" the generation by design; nnsight warns about it
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self.lm.generate(remote=self.remote, **kw) as tracer:
                with tracer.invoke({"input_ids": input_ids, "attention_mask": attention_mask}):
                    if layers:
                        for step in tracer.iter[:]:  # open loop: ends when generation ends (by design)
                            state.step = step
                            for L in layers:
                                env = self._envoy(L)
                                h = env.output
                                for iv in interventions:
                                    if iv.layer == L:
                                        h = state.apply(iv, h)
                                env.output = h
                with tracer.invoke():
                    out = tracer.result.save()
            return out
