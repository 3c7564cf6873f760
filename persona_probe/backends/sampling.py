"""Batched, seeded sampling of responses (optionally under interventions, adapters, system prompts or
in-context prefixes — everything arrives as PromptRecords + Interventions), through one of two engines:

* `hf` (default, the reference): HF `generate` with forward hooks, batches re-seeded per batch index;
* `vllm`: vLLM with the same hooks on its decoder blocks, one seed per (record, sample) cell
  (backends/vllm/). Greedy generations agree token for token; sampled ones follow the same distribution
  (same temperature/top_p/top_k) but not the same random stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from persona_probe.backends import Intervention, get_backend
from persona_probe.backends.vllm import check_interventions, get_vllm_engine, hf_top_k, sample_seed
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


ENGINES = ("hf", "vllm")


@runtime_checkable
class Engine(Protocol):
    """A sampling engine other than `hf` (e.g. a configured `VLLMEngine`): token ids in, token ids out."""

    name: str

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, seeds: Sequence[int | None], max_new_tokens: int,
                     temperature: float, top_p: float, top_k: int, stop_ids: Sequence[int],
                     interventions: Sequence[Intervention], adapter: str | None,
                     progress: bool) -> list[tuple[list[int], bool]]: ...


def resolve_engine(engine: str | Engine, handle: ModelHandle) -> Engine | None:
    """None for the hf engine; else the engine object (`"vllm"`: the handle's cached default engine)."""
    if isinstance(engine, str):
        if engine not in ENGINES:
            raise PersonaProbeError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
        return None if engine == "hf" else get_vllm_engine(handle)
    if not isinstance(engine, Engine):
        raise PersonaProbeError(f"engine must be one of {', '.join(ENGINES)} or an engine object, not "
                                f"{type(engine).__name__}")
    return engine


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
    engine: str | Engine | None = None,
) -> list[Sample]:
    """`n_samples` responses per record. temperature 0 = greedy.

    Seeding: the generator is re-seeded per batch from (seed, batch index), and batches depend only on
    the records, so two calls that differ only by `interventions` draw the same random numbers. With
    engine="vllm" each (record id, sample) cell has its own seed, with the same guarantee. `engine=None` uses
    `handle.engine` (set by the CLI's --engine), so experiments sample through it without a parameter each.
    """
    if not records:
        raise PersonaProbeError("no prompts to generate from: the question/prompt set is empty")
    if n_samples < 1:
        raise PersonaProbeError(f"--samples must be >= 1, got {n_samples}")
    # a layer the model lacks, a vector of the wrong width: one-line errors before any sampling
    check_interventions(interventions, handle.n_layers, handle.d_model, handle.device, handle.dtype)
    chosen = handle.engine if engine is None else engine  # None: the handle's engine
    if chosen != "hf" and backend != "hf":  # checked before a vLLM engine is built
        raise PersonaProbeError(f"backend {backend!r} applies to the hf engine only: the {getattr(chosen, 'name', chosen)} "
                                "engine hooks its own model")
    eng = resolve_engine(chosen, handle)
    tok = handle.tokenizer
    expanded = [(r, s) for r in records for s in range(n_samples)]
    toks = [tokenize_record(tok, replace(r, assistant=None)) for r, _ in expanded]
    eos = {tok.eos_token_id} | ({tok.pad_token_id} if tok.pad_token_id is not None else set())
    if eng is not None:
        outs = eng.generate_ids([t.ids for t in toks], seeds=[sample_seed(seed, r.id, s) for r, s in expanded],
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=hf_top_k(handle), stop_ids=sorted(eos), interventions=interventions,
                                adapter=handle.info.adapter, progress=progress)
        return [_sample(tok, r, s, ids, finished) for (r, s), (ids, finished) in zip(expanded, outs)]
    be = get_backend(backend, handle)
    batches = length_sorted_batches(toks, batch_size, tok.pad_token_id, side="left")
    out: list[Sample | None] = [None] * len(expanded)
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
            out[idx] = _sample(tok, r, s, ids[:n], n < len(ids))
        bar.update(len(b.index))
    bar.close()
    return [s for s in out if s is not None]


def _sample(tok: Any, r: PromptRecord, s: int, ids: list[int], finished: bool) -> Sample:
    """ids: the response tokens before the first stop token."""
    return Sample(record_id=r.id, question=r.user, system=r.system, sample=s,
                  text=tok.decode(ids, skip_special_tokens=True).strip(), n_tokens=len(ids), finished=finished,
                  labels=dict(r.labels))


def with_responses(records: Sequence[PromptRecord], samples: Sequence[Sample]) -> list[PromptRecord]:
    """Records with their generated responses as the assistant turn (one record per sample)."""
    by_id = {r.id: r for r in records}
    return [replace(by_id[s.record_id], id=f"{s.record_id}-s{s.sample}", assistant=s.text or "...")
            for s in samples]
