"""The local text an SAE trains on: built-in questions under many system prompts, neutral paragraphs,
multiple-choice items, and (optionally) the model's own sampled answers to some of the prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from persona_probe.backends.sampling import generate, with_responses
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import read_jsonl
from persona_probe.interventions.guard import neutral_texts
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.questions import load_questions
from persona_probe.prompts.records import PromptRecord, contrast_questions, data_path, load_traits


def training_records(*, questions_per_system: int = 6, seed: int = 0) -> list[PromptRecord]:
    """Local text for SAE training: built-in questions (plain, under every trait's character and neutral system
    prompts, under the persona catalogue) plus the built-in neutral paragraphs and multiple-choice items."""
    g = torch.Generator().manual_seed(seed)
    qs = contrast_questions()
    recs: list[PromptRecord] = list(qs)

    def pick(n: int) -> list[PromptRecord]:
        return [qs[i] for i in torch.randperm(len(qs), generator=g)[:n].tolist()]

    for trait, spec in load_traits().items():
        for side in ("positive", "negative"):
            for j, s in enumerate(spec.get(side, [])):
                recs += [PromptRecord(f"{trait}-{side[:3]}{j}-{q.id}", q.user, system=s) for q in
                         pick(questions_per_system)]
    personas = data_path("prompts", "personas.json")
    if personas.exists():
        for p in json.loads(personas.read_text(encoding="utf-8")):
            recs += [PromptRecord(f"persona-{p['id']}-{q.id}", q.user, system=p["system"]) for q in pick(3)]
    seen = {r.user for r in recs}
    for name in ("builtin:core", "builtin:extended"):
        try:
            for q in load_questions(name):
                recs += [r for r in q.records() if r.user not in seen and not seen.add(r.user)]
        except PersonaProbeError:
            pass
    recs += neutral_texts(n=10_000)
    mc = data_path("capability", "multiple_choice.jsonl")
    if mc.exists():
        for d in read_jsonl(mc, what="multiple-choice items"):
            opts = "\n".join(f"{'ABCDEFGH'[i]}. {c}" for i, c in enumerate(d["choices"]))
            recs.append(PromptRecord(d["id"], f"{d['question']}\n{opts}\nAnswer with the letter.",
                                     assistant=f"{'ABCDEFGH'[d['answer']]}. {d['choices'][d['answer']]}"))
    return recs


def add_generated_responses(handle: ModelHandle, records: Sequence[PromptRecord], n: int, *,
                            max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                            batch_size: int = 32, progress: bool = False) -> list[PromptRecord]:
    """Replace up to `n` prompt-only records (seeded choice) by the same prompt + the model's own sampled answer."""
    open_idx = [i for i, r in enumerate(records) if r.assistant is None]
    g = torch.Generator().manual_seed(seed)
    chosen = sorted(open_idx[i] for i in torch.randperm(len(open_idx), generator=g)[: max(n, 0)].tolist())
    if not chosen:
        return list(records)
    sub = [records[i] for i in chosen]
    samples = generate(handle, sub, n_samples=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       batch_size=batch_size, progress=progress, desc="SAE corpus responses")
    answered = dict(zip(chosen, with_responses(sub, samples)))
    return [answered.get(i, r) for i, r in enumerate(records)]


__all__ = ["add_generated_responses", "training_records"]
