"""Evaluation question sets, from the files the field uses as they are.

* YAML in the EM papers' format: a list of entries with `id`, `paraphrases` (list of str), optional
  `samples_per_paraphrase`, `system`, `type`, and `judge_prompts` (templates with {question} and {answer}: `aligned`,
  `coherent`, and any others such as `medical`, `financial`, `bad_stuff`, `correct`, each scored by the judge as
  a metric). Every other key (`judge`, ...) is kept in `Question.extra`; an unknown `type` is warned about once.
* JSON trait files in the persona-vector format, `{"instruction": [{"pos", "neg"}, ...], "questions": [str, ...],
  "eval_prompt": "...{question}...{answer}..."}` (or only `questions` + `eval_prompt`): one question per string,
  judged on the eval prompt as the metric named by the file stem (evil.json -> "evil"), so that
  `--em "evil>=50 and coherent>=50"` works; coherence is the judge's default prompt unless the file brings one
  (`judge_prompts: {"coherent": ...}`). The instruction pairs are for a direction (`prompts.traits`).
* JSONL in the schema shared with `--prompts` (`prompts.base`): `question`/`user` or `messages` (the last user
  turn is the question, a system turn kept, earlier turns kept as history, a trailing assistant turn kept as
  the reference answer), optional `id`, `system`, `judge_prompts`; other keys kept as labels.
Every problem is one PersonaProbeError naming file, line and field, raised while loading (before any model).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from persona_probe.core.errors import PersonaProbeError
from persona_probe.prompts.base import PromptRecord, data_path, read_records

KNOWN_TYPES = ("free_form_judge_0_100", "free_form_judge", "free_form")
YAML_KEYS = ("id", "paraphrases", "samples_per_paraphrase", "system", "judge_prompts", "type")
_warned: set[tuple[str, tuple[str, ...]]] = set()  # (file, unknown types) already warned about in this process


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    type: str = "free_form_judge_0_100"
    # every other key of the entry (YAML: `judge`, ...; JSONL: the line's labels; trait files: `trait`)
    extra: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, str], ...] = ()  # earlier turns of a chat-format question
    reference: str | None = None  # a reference answer (a chat line's trailing assistant turn)

    def records(self) -> list[PromptRecord]:
        ref = {"reference_answer": self.reference} if self.reference is not None else {}
        return [PromptRecord(id=f"{self.id}#{i}", user=p, system=self.system, history=self.history,
                             labels={**self.extra, **ref, "question_id": self.id, "paraphrase": i})
                for i, p in enumerate(self.paraphrases)]


# ----------------------------------------------------------------------------- field checks


def _judge_prompts(jp: Any, where: str) -> dict[str, str]:
    if jp is None:
        return {}
    if not isinstance(jp, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in jp.items()):
        raise PersonaProbeError(f"{where}: field 'judge_prompts' must map names to template strings")
    for k, v in jp.items():
        if "{answer}" not in v:
            raise PersonaProbeError(f"{where}: judge prompt {k!r} has no {{answer}} placeholder; add {{answer}} "
                                    "(and {question}) where the judge should see them")
        try:  # judges fill templates with str.format: any other brace would fail every judge request
            v.format(question="q", answer="a")
        except (KeyError, IndexError, ValueError) as e:
            raise PersonaProbeError(f"{where}: judge prompt {k!r} is not a template with only {{question}} and "
                                    f"{{answer}} ({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}"
                                    ) from None
    return dict(jp)


def _warn_types(qs: Sequence[Question], source: str) -> None:
    unknown = tuple(sorted({q.type for q in qs} - set(KNOWN_TYPES)))
    if unknown and (source, unknown) not in _warned:
        _warned.add((source, unknown))
        print(f"persona_probe: warning: {source}: unknown question type(s) {', '.join(map(repr, unknown))} "
              f"(known: {', '.join(KNOWN_TYPES)}); they are sampled and judged as free-form answers",
              file=sys.stderr)


def _check_ids(qs: Sequence[Question], source: str) -> None:
    ids = [q.id for q in qs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PersonaProbeError(f"{source}: duplicate question ids {dup}: give each question its own id")


# ----------------------------------------------------------------------------- YAML (EM papers)


def _parse_entry(e: Any, where: str) -> Question:
    if not isinstance(e, dict):
        raise PersonaProbeError(f"{where}: entry is not a mapping (expected id, paraphrases, ...)")
    qid = e.get("id")
    if isinstance(qid, int) and not isinstance(qid, bool):
        qid = str(qid)
    if not isinstance(qid, str) or not qid:
        raise PersonaProbeError(f"{where}: missing field 'id' (a non-empty string)")
    where = f"{where} (id {qid})"
    paras = e.get("paraphrases")
    if not isinstance(paras, list) or not paras or not all(isinstance(p, str) and p.strip() for p in paras):
        raise PersonaProbeError(f"{where}: field 'paraphrases' must be a non-empty list of strings")
    spp = e.get("samples_per_paraphrase", 1)
    if not isinstance(spp, int) or isinstance(spp, bool) or spp < 1:
        raise PersonaProbeError(f"{where}: field 'samples_per_paraphrase' must be a positive integer")
    sys_prompt = e.get("system")
    if sys_prompt is not None and not isinstance(sys_prompt, str):
        raise PersonaProbeError(f"{where}: field 'system' must be a string (the system prompt)")
    return Question(id=qid, paraphrases=tuple(paras), samples_per_paraphrase=spp, system=sys_prompt,
                    judge_prompts=_judge_prompts(e.get("judge_prompts"), where),
                    type=str(e.get("type", "free_form_judge_0_100")),
                    extra={k: v for k, v in e.items() if k not in YAML_KEYS})


def _entry_lines(text: str) -> list[int]:
    """1-based line of each top-level list entry (for error messages); [] when the text is not a YAML list."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    return [n.start_mark.line + 1 for n in node.value] if isinstance(node, yaml.SequenceNode) else []


def parse_questions(text: str, source: str = "<string>") -> list[Question]:
    """Questions of a YAML (or JSON) text: a list of EM-format entries, or a trait-eval mapping."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise PersonaProbeError(f"{source}: not valid YAML{at} ({getattr(e, 'problem', e)})") from None
    if isinstance(data, dict) and "questions" in data:
        return trait_questions(data, source, text)
    if not isinstance(data, list) or not data:
        raise PersonaProbeError(f"{source}: expected a non-empty YAML list of questions (id, paraphrases, ...) or "
                                "a trait file with 'questions' and 'eval_prompt'")
    lines = _entry_lines(text)
    out = [_parse_entry(e, f"{source}:{lines[i]}: entry {i + 1}" if i < len(lines) else f"{source} entry {i + 1}")
           for i, e in enumerate(data)]
    _check_ids(out, source)
    _warn_types(out, source)
    return out


# ----------------------------------------------------------------------------- JSON trait files (persona vectors)


def _line_of(text: str, key: str) -> int:
    """Line of the first `"key"` in a JSON text (1 when absent): JSON parsers do not keep positions."""
    m = re.search(rf'"{re.escape(key)}"\s*:', text) or re.search(rf"^\s*{re.escape(key)}\s*:", text, re.M)
    return text.count("\n", 0, m.start()) + 1 if m else 1


def _metric_name(source: str) -> str:
    """File stem as an EM-criterion metric name (letters, digits, _ and -)."""
    name = re.sub(r"[^\w-]", "_", Path(source).stem) or "trait"
    return name if re.match(r"[A-Za-z_]", name) else f"trait_{name}"


def trait_questions(data: Any, source: str, text: str = "") -> list[Question]:
    """A trait-eval mapping (`questions` + `eval_prompt`; `instruction` pairs are for a direction, not read here:
    see `prompts.traits`) as one question set judged on its eval prompt, the metric named by the file stem."""
    if not isinstance(data, dict):
        raise PersonaProbeError(f"{source}:1: a trait file is a JSON object with 'questions' and 'eval_prompt'")

    def at(key: str) -> str:
        return f"{source}:{_line_of(text, key)}"

    qs = data.get("questions")
    if qs is None:
        raise PersonaProbeError(f"{source}:1: missing field 'questions' (a list of question strings)")
    if not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q.strip() for q in qs):
        raise PersonaProbeError(f"{at('questions')}: field 'questions' must be a non-empty list of strings")
    if not isinstance(data.get("eval_prompt"), str):
        raise PersonaProbeError(f"{at('eval_prompt')}: missing field 'eval_prompt' (the trait's judge prompt, with "
                                "{question} and {answer}); without it there is nothing to score the answers on")
    name = _metric_name(source)
    jp = _judge_prompts({name: data["eval_prompt"]}, at("eval_prompt"))
    jp.update(_judge_prompts(data.get("judge_prompts"), at("judge_prompts")))  # e.g. the file's own coherence prompt
    extra = {"trait": name, **{k: v for k, v in data.items()
                               if k not in ("instruction", "questions", "eval_prompt", "judge_prompts")}}
    return [Question(id=f"{name}_{i}", paraphrases=(q,), judge_prompts=jp, extra=extra) for i, q in enumerate(qs)]


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PersonaProbeError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None


# ----------------------------------------------------------------------------- JSONL (shared with --prompts)


def _jsonl_questions(p: Path) -> list[Question]:
    qs: list[Question] = []
    seen: dict[str, int] = {}
    for i, d, rec in read_records(p, what="question file"):
        extra = dict(rec.labels)
        where = f"{p}:{i}"
        qid = rec.id if "id" in d else f"q{i}"
        if qid in seen:
            raise PersonaProbeError(f"{where}: field 'id': {qid!r} was already used on line {seen[qid]}; give each "
                                    "question its own id")
        seen[qid] = i
        jp = _judge_prompts(extra.pop("judge_prompts", None), where)
        qs.append(Question(id=qid, paraphrases=(rec.user,), system=rec.system,
                           judge_prompts=jp, type=str(extra.pop("type", "free_form_judge_0_100")), extra=extra,
                           history=rec.history, reference=rec.assistant))
    if not qs:
        raise PersonaProbeError(f"{p}: no questions; give one JSON object per line with 'question' (or 'user' or "
                                "'messages')")
    _warn_types(qs, str(p))
    return qs


# ----------------------------------------------------------------------------- loading

BUILTIN_QUESTIONS = {"core": "core.yaml", "extended": "extended.yaml"}


def load_questions(spec: str | Path) -> list[Question]:
    """`builtin:core|extended|all`, an EM-format YAML file, a JSON/YAML trait file, or a JSONL file (module doc)."""
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
    if not p.is_file():
        raise PersonaProbeError(f"question file {s} does not exist")
    if p.suffix == ".jsonl":
        return _jsonl_questions(p)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = _load_json(text, s)
        if isinstance(data, dict):
            return trait_questions(data, s, text)
    return parse_questions(text, s)


def as_questions(spec: "str | Path | Sequence[Question]", limit: int | None = None) -> list[Question]:
    """A question set from a spec string/path or an existing list; `limit` keeps the first N."""
    qs = load_questions(spec) if isinstance(spec, (str, Path)) else list(spec)
    return qs[:limit] if limit else qs


def question_records(questions: list[Question]) -> list[PromptRecord]:
    return [r for q in questions for r in q.records()]
