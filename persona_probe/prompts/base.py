"""The chat record every layer passes around (`PromptRecord`) and the path of the packaged data files.

Below `records` (prompt sets, JSONL/built-in loading, tokenization) and `questions` (evaluation question sets),
which both build records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


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
        if "messages" in d:  # community chat format {"messages": [...]}
            return _from_messages(d, default_id)
        if not isinstance(d.get("user"), str) or not d["user"].strip():
            raise ValueError("missing non-empty 'user' field (or a 'messages' list)")
        known = {"id", "user", "system", "assistant", "labels", "history"}
        labels = dict(d.get("labels") or {})
        labels.update({k: v for k, v in d.items() if k not in known})
        return PromptRecord(
            id=str(d.get("id", default_id)), user=d["user"], system=d.get("system"), assistant=d.get("assistant"),
            labels=labels, history=tuple(d.get("history") or ()),
        )


def _from_messages(d: dict[str, Any], default_id: str) -> PromptRecord:
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in {"system", "user", "assistant"} or not isinstance(
            m.get("content"), str
        ):
            raise ValueError("each message needs role system|user|assistant and string content")
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    rest = msgs[1:] if system is not None else msgs
    assistant = None
    if rest and rest[-1]["role"] == "assistant":
        assistant = rest[-1]["content"]
        rest = rest[:-1]
    if not rest or rest[-1]["role"] != "user":
        raise ValueError("conversation must end with a user turn (optionally followed by one assistant turn)")
    labels = {k: v for k, v in d.items() if k not in {"messages", "id"}}
    return PromptRecord(id=str(d.get("id", default_id)), user=rest[-1]["content"], system=system,
                        assistant=assistant, labels=labels, history=tuple(rest[:-1]))
