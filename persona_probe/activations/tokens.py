"""Token-level residuals at one layer, from an early-exit forward pass through a backend.

`extract` keeps `[n_prompts, n_layers, n_tokens, d]` padded blocks; SAE work wants flat rows of single token
positions (every token but the attention sink, optionally prefix-deduplicated) at one layer. Both read the
residual through the same backend (`Backend.run`), so the numbers are the same; here the pass stops right
after the wanted block, because nothing later is needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from persona_probe.activations.extraction import check_positions, pool
from persona_probe.backends import Backend, Intervention, get_backend
from persona_probe.core.errors import PersonaProbeError
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import (
    Batch,
    PromptRecord,
    PromptSet,
    TokenizedPrompt,
    length_sorted_batches,
    tokenize_record,
)


@dataclass
class TokenActs:
    """Residuals of single token positions: `acts` [N, d], with record index, position and token id [N]."""

    acts: Tensor
    record: Tensor
    position: Tensor
    token_id: Tensor
    record_ids: list[str]

    def __len__(self) -> int:
        return len(self.acts)

    def subset(self, mask: Tensor) -> TokenActs:
        return TokenActs(self.acts[mask], self.record[mask], self.position[mask], self.token_id[mask],
                         self.record_ids)


class _StopForward(Exception):
    """Raised once the wanted layer is read: nothing after it needs computing."""


def _read_layer(be: Backend, batch: Batch, layer: int) -> Tensor:
    """Residual [b, s, d] (model dtype) at `layer`, as `Backend.run(capture=[layer])` returns it.

    On the hf backend the read is an intervention at `layer` that keeps its input and stops the pass (with no
    other intervention there, its input is exactly what `capture` stores); the backend removes its hooks on
    the way out. Other backends (traced or wrapped forwards) run the whole pass and capture."""
    if be.name != "hf":
        _, store = be.run(batch.input_ids, batch.attention_mask, capture=[layer], return_logits=False)
        return store[layer]
    got: dict[str, Tensor] = {}

    def keep_and_stop(h: Tensor) -> Tensor:
        got["h"] = h.detach()
        raise _StopForward

    try:
        be.run(batch.input_ids, batch.attention_mask, interventions=[Intervention(layer, keep_and_stop)],
               return_logits=False)
    except _StopForward:
        pass
    return got["h"]


def _layer_batches(handle: ModelHandle, toks: Sequence[TokenizedPrompt], layer: int, batch_size: int,
                   backend: str, progress: bool) -> Iterator[tuple[Batch, Tensor]]:
    """(length-sorted batch, its residuals [b, s, d] at `layer` in the model dtype) for every batch."""
    if not 0 <= int(layer) < handle.n_layers:
        raise PersonaProbeError(f"layer {layer} out of range: this model has layers 0..{handle.n_layers - 1}")
    be = get_backend(backend, handle)
    for b in tqdm(length_sorted_batches(toks, batch_size, handle.tokenizer.pad_token_id),
                  desc=f"residuals L{layer}", disable=not progress):
        yield b, _read_layer(be, b, int(layer))


def _keep_positions(ids: Sequence[int], skip_first: bool, seen: set[int] | None) -> list[int]:
    """Positions to keep: all but position 0 (attention sink), minus prefixes already seen (identical
    prefixes give identical residuals under causal attention, e.g. a shared system prompt)."""
    keep, h = [], hash(("persona_probe", ids[0] if ids else None))
    for t in range(len(ids)):
        if t > 0:
            h = hash((h, ids[t]))
        if t == 0 and skip_first:
            continue
        if seen is not None:
            if h in seen:
                continue
            seen.add(h)
        keep.append(t)
    return keep


def layer_token_activations(handle: ModelHandle, records: Sequence[PromptRecord], layer: int, *,
                            batch_size: int = 16, skip_first: bool = True, dedupe: bool = True,
                            seen: set[int] | None = None, progress: bool = False,
                            backend: str = "hf") -> TokenActs:
    """Residual stream at `layer` (output of block L, as `extract`) for every kept token of every record.

    The forward pass stops right after block L (hf backend). `dedupe` drops positions whose whole prefix was
    seen in an earlier record (or in `seen`, a set shared across calls and updated in place). Returns N rows
    of [d_model] with their record index / position / token id, sorted by (record, position).
    """
    toks = [tokenize_record(handle.tokenizer, r) for r in records]
    if dedupe and seen is None:
        seen = set()
    keep = [_keep_positions(t.ids, skip_first, seen if dedupe else None) for t in toks]
    acts, rec, pos, tid = [], [], [], []
    for b, h in _layer_batches(handle, toks, layer, batch_size, backend, progress):
        h = h.float().cpu()  # [b, s, d]
        for row, idx in enumerate(b.index):
            k = torch.tensor(keep[idx], dtype=torch.long)
            if len(k):
                acts.append(h[row, k])
                rec.append(torch.full((len(k),), idx, dtype=torch.long))
                pos.append(k)
                tid.append(torch.tensor(toks[idx].ids, dtype=torch.long)[k])
    if not acts:
        z = torch.zeros(0, dtype=torch.long)
        return TokenActs(torch.zeros(0, handle.d_model), z, z, z, [r.id for r in records])
    r_, p_ = torch.cat(rec), torch.cat(pos)
    order = torch.argsort(r_ * (1 << 32) + p_)  # batches are length-sorted: restore record order
    return TokenActs(torch.cat(acts)[order], r_[order], p_[order], torch.cat(tid)[order], [r.id for r in records])


def pooled_layer_rows(handle: ModelHandle, records: Sequence[PromptRecord], layer: int, position: str, *,
                      batch_size: int = 16, progress: bool = False, backend: str = "hf") -> Tensor:
    """One row [n, d] per record at `layer`, pooled by `extract`'s own `pool` (prompt_last, prompt_mean without
    token 0, response_mean), or "all" = every token except 0 as [N, d]; from an early-exit pass."""
    if position == "all":
        return layer_token_activations(handle, records, layer, batch_size=batch_size, dedupe=False,
                                       progress=progress, backend=backend).acts
    check_positions([position], PromptSet("rows", tuple(records)))
    toks = [tokenize_record(handle.tokenizer, r) for r in records]
    out = torch.zeros(len(records), handle.d_model)
    for b, h in _layer_batches(handle, toks, layer, batch_size, backend, progress):
        out[torch.tensor(b.index)] = pool(h, b, position).float().cpu()
    return out


__all__ = ["TokenActs", "layer_token_activations", "pooled_layer_rows"]
