"""Prompt sets: chat-format records, JSONL and built-in loading, chat-template tokenization.

A record is one conversation: optional `system`, a `user` turn, optional `assistant` turn, an
`id`, and free `labels`. The project tokenizes with the model's chat template itself and hands
ids + attention mask to every backend, so no backend re-tokenizes (and no BOS is doubled).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_write_text
from persona_probe.prompts.base import PromptRecord, data_path, read_records
from persona_probe.prompts.questions import load_questions, question_records

POSITIONS = ("prompt_last", "prompt_mean", "response_mean", "all")


@dataclass(frozen=True)
class PromptSet:
    name: str
    records: tuple[PromptRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.records)

    @property
    def hash(self) -> str:
        """Content hash of the records (order-sensitive), recorded in every manifest."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()[:16]

    @property
    def has_responses(self) -> bool:
        return all(r.assistant is not None for r in self.records)

    def subset(self, idx: Sequence[int], name: str | None = None) -> "PromptSet":
        return PromptSet(name or self.name, tuple(self.records[i] for i in idx))

    def save_jsonl(self, path: str | Path) -> None:
        atomic_write_text(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in self.records))


def records_from_jsonl(path: str | Path) -> list[PromptRecord]:
    """Records of a JSONL file in the schema shared with `--questions` (see `prompts.base`): `question` or
    `user`, or `messages`; a bad line is one error naming file, line and field."""
    return [r for _, _, r in read_records(path, what="prompt file")]


# ----------------------------------------------------------------------------- built-in sets


def load_traits() -> dict[str, dict[str, Any]]:
    return json.loads(data_path("traits", "traits.json").read_text(encoding="utf-8"))


def contrast_questions() -> list[PromptRecord]:
    return records_from_jsonl(data_path("prompts", "contrast_questions.jsonl"))


def persona_records(trait: str, side: str, questions: Sequence[PromptRecord] | None = None,
                    n_prompts: int | None = None) -> list[PromptRecord]:
    """Every question under every system prompt of one side ("positive" = character, "negative")."""
    traits = load_traits()
    if trait not in traits:
        raise PersonaProbeError(f"unknown trait {trait!r}: choose one of {', '.join(sorted(traits))}")
    if side not in ("positive", "negative"):
        raise PersonaProbeError(f"unknown side {side!r}: use positive or negative")
    systems = traits[trait][side][:n_prompts]
    qs = list(questions) if questions is not None else contrast_questions()
    return [
        PromptRecord(id=f"{trait}-{side[:3]}{j}-{q.id}", user=q.user, system=s,
                     labels={**q.labels, "trait": trait, "side": side, "system_idx": j, "question_id": q.id})
        for j, s in enumerate(systems) for q in qs
    ]


def _builtin(name: str) -> list[PromptRecord]:
    """`builtin:questions`, `builtin:persona/TRAIT/positive|negative`, `builtin:smoke`, `builtin:core` ..."""
    parts = name.split("/")
    if parts[0] in ("questions", "contrast"):
        return contrast_questions()
    if parts[0] == "smoke":  # tiny set for quick checks and tests
        return contrast_questions()[:6]
    if parts[0] == "persona" and len(parts) == 3:
        return persona_records(parts[1], parts[2])
    if parts[0] in ("core", "extended"):
        return [PromptRecord(id=f"{q.id}-{i}", user=p, system=q.system, labels={"question_id": q.id})
                for q in load_questions(f"builtin:{parts[0]}") for i, p in enumerate(q.paraphrases)]
    raise PersonaProbeError(
        f"unknown built-in prompt set {name!r}: use builtin:questions, builtin:smoke, builtin:core, builtin:extended "
        "or builtin:persona/TRAIT/positive|negative"
    )


def load_prompts(spec: str | Path | PromptSet | Iterable[PromptRecord], name: str | None = None) -> PromptSet:
    """Load a prompt set from `builtin:NAME`, a JSONL path (the schema of `prompts.base`), a question file
    (.yaml/.yml/.json, see `prompts.questions`), a PromptSet, or records."""
    if isinstance(spec, PromptSet):
        ps = spec
    elif isinstance(spec, (str, Path)):
        s = str(spec)
        if s.startswith("builtin:"):
            recs = _builtin(s[len("builtin:"):])
        elif Path(s).suffix in (".yaml", ".yml", ".json"):  # a question file (EM YAML, trait JSON): its questions
            recs = question_records(load_questions(s))
        else:
            recs = records_from_jsonl(s)
        ps = PromptSet(name or s, tuple(recs))
    else:
        ps = PromptSet(name or "records", tuple(spec))
    if len(ps) == 0:
        raise PersonaProbeError(f"prompt set {ps.name!r} is empty: give at least one record")
    return ps


# ----------------------------------------------------------------------------- tokenization


@dataclass
class TokenizedPrompt:
    """Token ids of one record; prompt = [0, prompt_len), response = [resp_start, resp_end)."""

    ids: list[int]
    prompt_len: int
    resp_start: int
    resp_end: int


def _fallback_format(msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs)
    return text + ("Assistant:" if add_generation_prompt else "")


def _apply_template(tokenizer: Any, msgs: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    text = _fallback_format(msgs, add_generation_prompt)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_record(tokenizer: Any, rec: PromptRecord) -> TokenizedPrompt:
    """Chat-template tokens; the response span excludes the template's end-of-turn tokens."""
    prompt = _apply_template(tokenizer, rec.messages(with_assistant=False), add_generation_prompt=True)
    if rec.assistant is None:
        return TokenizedPrompt(prompt, len(prompt), len(prompt), len(prompt))
    if getattr(tokenizer, "chat_template", None):
        full = _apply_template(tokenizer, rec.messages(with_assistant=True), add_generation_prompt=False)
        if full[: len(prompt)] != prompt:  # template not prefix-stable: build the response tokens ourselves
            full = prompt + tokenizer(rec.assistant, add_special_tokens=False)["input_ids"]
    else:
        full = prompt + tokenizer(" " + rec.assistant, add_special_tokens=False)["input_ids"]
    end = len(full)
    special = set(tokenizer.all_special_ids)
    # drop trailing end-of-turn tokens (e.g. "<|im_end|>", "\n") so response_mean covers only content
    while end > len(prompt) and (full[end - 1] in special or tokenizer.decode([full[end - 1]]).strip() == ""):
        end -= 1
    if end == len(prompt):
        end = len(full)
    return TokenizedPrompt(full, len(prompt), len(prompt), end)


@dataclass
class Batch:
    """Right-padded batch. Right padding keeps positions 0..n-1 identical to the unbatched run."""

    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [b, s]
    prompt_len: torch.Tensor  # [b]
    resp_start: torch.Tensor  # [b]
    resp_end: torch.Tensor  # [b]
    index: list[int]  # positions of these rows in the original record order

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_padded(self) -> int:
        return int(self.attention_mask.numel())


def collate(toks: Sequence[TokenizedPrompt], index: Sequence[int], pad_id: int, side: str = "right") -> Batch:
    width = max(len(t.ids) for t in toks)
    ids = torch.full((len(toks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(toks), width), dtype=torch.long)
    for i, t in enumerate(toks):
        n = len(t.ids)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, sl] = torch.tensor(t.ids)
        mask[i, sl] = 1
    shift = [0 if side == "right" else width - len(t.ids) for t in toks]
    return Batch(
        input_ids=ids, attention_mask=mask,
        prompt_len=torch.tensor([t.prompt_len + s for t, s in zip(toks, shift)]),
        resp_start=torch.tensor([t.resp_start + s for t, s in zip(toks, shift)]),
        resp_end=torch.tensor([t.resp_end + s for t, s in zip(toks, shift)]),
        index=list(index),
    )


def length_sorted_batches(toks: Sequence[TokenizedPrompt], batch_size: int, pad_id: int,
                          side: str = "right") -> list[Batch]:
    """Group similar lengths so padding waste stays small; `Batch.index` restores the order."""
    if batch_size < 1:
        raise PersonaProbeError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(toks)), key=lambda i: len(toks[i].ids))
    return [
        collate([toks[i] for i in order[s: s + batch_size]], order[s: s + batch_size], pad_id, side)
        for s in range(0, len(order), batch_size)
    ]


def padding_waste(batches: Sequence[Batch]) -> float:
    """Share of computed positions that are padding."""
    total = sum(b.n_padded for b in batches)
    return 1.0 - sum(b.n_tokens for b in batches) / max(total, 1)
