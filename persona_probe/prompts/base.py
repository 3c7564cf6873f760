"""The chat record every layer passes around (`PromptRecord`), the one JSONL line schema shared by `--prompts`
and `--questions` (`PromptRecord.from_dict`, `parse_record`, `read_records`), and the packaged data path.

Below `records` (prompt sets, built-in loading, tokenization) and `questions` (evaluation question sets),
which both build records through `read_records`.

One line of a prompt/question JSONL file is one of
  {"question": "..."} or {"user": "..."}          (optional "answer"/"assistant": the reference answer)
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
with optional `id`, `system`, `history`, `labels`; every other key is kept as a label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import iter_jsonl

ROLES = ("system", "user", "assistant")
# keys the record schema reads; every other key of a line is kept as a label
RECORD_KEYS = frozenset({"id", "user", "question", "system", "assistant", "answer", "labels", "history", "messages"})
SCHEMA_HINT = ('one JSON object per line: {"question": ...} or {"user": ...} (optional "answer"), or {"messages": '
               '[{"role": ..., "content": ...}, ...]}; optional id, system')


def data_path(*parts: str) -> Path:
    return Path(str(resources.files("persona_probe") / "data" / Path(*parts)))


@dataclass(frozen=True)
class PromptRecord:
    id: str
    user: str
    system: str | None = None
    assistant: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    # Earlier turns (e.g. in-context examples): list of {"role", "content"} before the final user turn.
    history: tuple[dict[str, str], ...] = ()

    def messages(self, with_assistant: bool = True) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        if self.system is not None:
            msgs.append({"role": "system", "content": self.system})
        msgs.extend(dict(m) for m in self.history)
        msgs.append({"role": "user", "content": self.user})
        if with_assistant and self.assistant is not None:
            msgs.append({"role": "assistant", "content": self.assistant})
        return msgs

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "user": self.user}
        if self.system is not None:
            d["system"] = self.system
        if self.assistant is not None:
            d["assistant"] = self.assistant
        if self.history:
            d["history"] = [dict(m) for m in self.history]
        if self.labels:
            d["labels"] = self.labels
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], default_id: str) -> "PromptRecord":
        """One line of the shared schema (module docstring). Raises ValueError naming the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"line is not a JSON object; expected {SCHEMA_HINT}")
        if "messages" in d:  # community chat format {"messages": [...]}
            return _from_messages(d, default_id)
        key = "user" if "user" in d else "question" if "question" in d else None
        if key is None:
            raise ValueError(f"no 'question', 'user' or 'messages' field; expected {SCHEMA_HINT}")
        user = d[key]
        if not isinstance(user, str) or not user.strip():
            raise ValueError(f"field {key!r} must be a non-empty string")
        akey = "assistant" if "assistant" in d else "answer" if "answer" in d else None
        assistant = d[akey] if akey else None
        if assistant is not None and not isinstance(assistant, str):
            raise ValueError(f"field {akey!r} must be a string (the reference answer)")
        labels = _labels(d)
        # the alias not used (a line with both user and question, or assistant and answer) stays a label
        labels.update({k: d[k] for k in ("question", "answer") if k in d and k not in (key, akey)})
        return PromptRecord(id=_id(d, default_id), user=user, system=_system(d.get("system")), assistant=assistant,
                            labels=labels, history=_history(d.get("history") or (), "history"))


def _id(d: dict[str, Any], default_id: str) -> str:
    v = d.get("id", default_id)
    if not isinstance(v, (str, int)) or isinstance(v, bool) or str(v) == "":
        raise ValueError("field 'id' must be a non-empty string or an integer")
    return str(v)


def _system(v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise ValueError("field 'system' must be a string (the system prompt)")
    return v


def _labels(d: dict[str, Any]) -> dict[str, Any]:
    lab = d.get("labels") or {}
    if not isinstance(lab, dict):
        raise ValueError("field 'labels' must be an object")
    return {**lab, **{k: v for k, v in d.items() if k not in RECORD_KEYS}}


def _content(m: Any, where: str) -> dict[str, str]:
    """{"role", "content"}; content given as OpenAI-style text parts is joined."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ValueError(f"field {where!r}: each turn needs role system, user or assistant")
    c = m.get("content")
    if isinstance(c, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in c):
        c = "".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise ValueError(f"field {where!r}: a {m['role']} turn needs string content")
    return {"role": m["role"], "content": c}


def _history(turns: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(turns, (list, tuple)):
        raise ValueError(f"field {where!r} must be a list of {{role, content}} turns")
    return tuple(_content(m, where) for m in turns)


def _from_messages(d: dict[str, Any], default_id: str) -> PromptRecord:
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("field 'messages' must be a non-empty list of {role, content} turns")
    msgs = list(_history(msgs, "messages"))
    system = _system(d.get("system"))
    if msgs[0]["role"] == "system":
        if system is not None and system != msgs[0]["content"]:
            raise ValueError("fields 'system' and 'messages' both give a system prompt: keep one")
        system, msgs = msgs[0]["content"], msgs[1:]
    assistant = None
    if msgs and msgs[-1]["role"] == "assistant":
        assistant = msgs[-1]["content"]
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("field 'messages': the conversation must end with a user turn (optionally followed by "
                         "one assistant turn)")
    labels = {k: v for k, v in _labels(d).items() if k != "messages"}
    labels.update({k: d[k] for k in ("question", "answer", "user", "assistant") if k in d})
    return PromptRecord(id=_id(d, default_id), user=msgs[-1]["content"], system=system, assistant=assistant,
                        labels=labels, history=tuple(msgs[:-1]))


def parse_record(d: Any, where: str, default_id: str) -> PromptRecord:
    """`PromptRecord.from_dict` with a bad line as one PersonaProbeError `WHERE: field ...; fix`."""
    try:
        return PromptRecord.from_dict(d, default_id)
    except (ValueError, TypeError) as e:
        raise PersonaProbeError(f"{where}: {e}") from None


def read_records(path: str | Path, *, what: str = "prompt file") -> list[tuple[int, Any, PromptRecord]]:
    """(line number, parsed line, record) for every line of a JSONL file in the shared schema: the one reader
    behind `--prompts` (`records.records_from_jsonl`) and `--questions` JSONL (`questions.load_questions`)."""
    p = Path(path)
    if not p.is_file():
        raise PersonaProbeError(f"{what} {p} does not exist")
    return [(i, d, parse_record(d, f"{p}:{i}", f"{p.stem}-{i}")) for i, d in iter_jsonl(p, what=what)]
