"""Batched, seeded sampling of responses (optionally under interventions, adapters, system prompts or
in-context prefixes — everything arrives as PromptRecords + Interventions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from persona_probe.backends import Intervention, get_backend
from persona_probe.core.errors import PersonaProbeError
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import PromptRecord, length_sorted_batches, tokenize_record


@dataclass
class Sample:
    record_id: str
    question: str
    system: str | None
    sample: int
    text: str
    n_tokens: int
    finished: bool  # ended with EOS (False = hit max_new_tokens)
    labels: dict[str, Any]

    @property
    def truncated(self) -> bool:
        """Cut off at max_new_tokens (no EOS): its end is missing."""
        return not self.finished

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate(
    handle: ModelHandle,
    records: Sequence[PromptRecord],
    *,
    n_samples: int = 1,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    backend: str = "hf",
    interventions: Sequence[Intervention] = (),
    progress: bool = True,
    desc: str = "generate",
) -> list[Sample]:
    """`n_samples` responses per record. temperature 0 = greedy.

    Seeding: the generator is re-seeded per batch from (seed, batch index), and batches depend only on
    the records, so two calls that differ only by `interventions` draw the same random numbers.
    """
    if not records:
        raise PersonaProbeError("no prompts to generate from: the question/prompt set is empty")
    if n_samples < 1:
        raise PersonaProbeError(f"--samples must be >= 1, got {n_samples}")
    be = get_backend(backend, handle)
    tok = handle.tokenizer
    expanded = [(r, s) for r in records for s in range(n_samples)]
    toks = [tokenize_record(tok, replace(r, assistant=None)) for r, _ in expanded]
    batches = length_sorted_batches(toks, batch_size, tok.pad_token_id, side="left")
    out: list[Sample | None] = [None] * len(expanded)
    eos = {tok.eos_token_id} | ({tok.pad_token_id} if tok.pad_token_id is not None else set())
    bar = tqdm(total=len(expanded), desc=desc, unit="sample", disable=not progress)
    for bi, b in enumerate(batches):
        torch.manual_seed(seed * 100_003 + bi)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed * 100_003 + bi)
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False)
        seqs = be.generate(b.input_ids, b.attention_mask, interventions=interventions, **kw).cpu()
        new = seqs[:, b.input_ids.shape[1]:]
        for row, idx in enumerate(b.index):
            ids = new[row].tolist()
            n = next((i for i, t in enumerate(ids) if t in eos), len(ids))
            r, s = expanded[idx]
            out[idx] = Sample(record_id=r.id, question=r.user, system=r.system, sample=s,
                              text=tok.decode(ids[:n], skip_special_tokens=True).strip(), n_tokens=n,
                              finished=n < len(ids), labels=dict(r.labels))
        bar.update(len(b.index))
    bar.close()
    return [s for s in out if s is not None]


def with_responses(records: Sequence[PromptRecord], samples: Sequence[Sample]) -> list[PromptRecord]:
    """Records with their generated responses as the assistant turn (one record per sample)."""
    by_id = {r.id: r for r in records}
    return [replace(by_id[s.record_id], id=f"{s.record_id}-s{s.sample}", assistant=s.text or "...")
            for s in samples]
