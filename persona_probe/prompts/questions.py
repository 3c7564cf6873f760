"""Evaluation question sets in the community YAML format of the emergent-misalignment papers.

Each entry: `id`, `paraphrases` (list of str), optional `samples_per_paraphrase`, `system`,
`judge_prompts` (`aligned`, `coherent`, templates with {question} and {answer}), `type`, `judge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import iter_jsonl
from persona_probe.prompts.base import PromptRecord, data_path


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    type: str = "free_form_judge_0_100"

    def records(self) -> list[PromptRecord]:
        return [PromptRecord(id=f"{self.id}#{i}", user=p, system=self.system,
                             labels={"question_id": self.id, "paraphrase": i})
                for i, p in enumerate(self.paraphrases)]


def _parse_entry(e: Any, where: str) -> Question:
    if not isinstance(e, dict):
        raise PersonaProbeError(f"{where}: entry is not a mapping (expected id, paraphrases, ...)")
    qid = e.get("id")
    if not isinstance(qid, str) or not qid:
        raise PersonaProbeError(f"{where}: missing 'id'")
    paras = e.get("paraphrases")
    if not isinstance(paras, list) or not paras or not all(isinstance(p, str) and p.strip() for p in paras):
        raise PersonaProbeError(f"{where} (id {qid}): 'paraphrases' must be a non-empty list of strings")
    jp = e.get("judge_prompts") or {}
    if not isinstance(jp, dict) or not all(isinstance(v, str) for v in jp.values()):
        raise PersonaProbeError(f"{where} (id {qid}): 'judge_prompts' must map names to template strings")
    for k, v in jp.items():
        if "{answer}" not in v:
            raise PersonaProbeError(f"{where} (id {qid}): judge prompt {k!r} has no {{answer}} placeholder")
    spp = e.get("samples_per_paraphrase", 1)
    if not isinstance(spp, int) or spp < 1:
        raise PersonaProbeError(f"{where} (id {qid}): samples_per_paraphrase must be a positive integer")
    sys_prompt = e.get("system")
    return Question(id=qid, paraphrases=tuple(paras), samples_per_paraphrase=spp,
                    system=sys_prompt if isinstance(sys_prompt, str) else None, judge_prompts=dict(jp),
                    type=str(e.get("type", "free_form_judge_0_100")))


def parse_questions(text: str, source: str = "<string>") -> list[Question]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise PersonaProbeError(f"{source}: not valid YAML{at} ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, list) or not data:
        raise PersonaProbeError(f"{source}: expected a non-empty YAML list of questions")
    out = [_parse_entry(e, f"{source} entry {i + 1}") for i, e in enumerate(data)]
    ids = [q.id for q in out]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise PersonaProbeError(f"{source}: duplicate question ids {sorted(dup)}")
    return out


BUILTIN_QUESTIONS = {"core": "core.yaml", "extended": "extended.yaml"}


def load_questions(spec: str | Path) -> list[Question]:
    """`builtin:core`, `builtin:extended`, a community YAML file, or a JSONL of {id?, user|question}."""
    s = str(spec)
    if s.startswith("builtin:"):
        name = s[len("builtin:"):]
        if name == "all":
            return load_questions("builtin:core") + load_questions("builtin:extended")
        if name not in BUILTIN_QUESTIONS:
            raise PersonaProbeError(f"unknown built-in question set {s!r}: use builtin:core, builtin:extended "
                                    "or builtin:all")
        p = data_path("questions", BUILTIN_QUESTIONS[name])
        return parse_questions(p.read_text(encoding="utf-8"), s)
    p = Path(s)
    if not p.exists():
        raise PersonaProbeError(f"question file {s} does not exist")
    if p.suffix == ".jsonl":
        qs = []
        for i, d in iter_jsonl(p, what="question file"):
            text = d.get("user") or d.get("question") if isinstance(d, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise PersonaProbeError(f"{s}:{i}: malformed question (needs 'user' or 'question')")
            qs.append(Question(id=str(d.get("id", f"q{i}")), paraphrases=(text,), system=d.get("system")))
        if not qs:
            raise PersonaProbeError(f"{s}: no questions")
        return qs
    return parse_questions(p.read_text(encoding="utf-8"), s)


def as_questions(spec: "str | Path | Sequence[Question]", limit: int | None = None) -> list[Question]:
    """A question set from a spec string/path or an existing list; `limit` keeps the first N."""
    qs = load_questions(spec) if isinstance(spec, (str, Path)) else list(spec)
    return qs[:limit] if limit else qs


def question_records(questions: list[Question]) -> list[PromptRecord]:
    return [r for q in questions for r in q.records()]
