"""The one JSONL reader: every line-oriented input file goes through here, so every bad line is reported
the same way (`FILE:LINE: problem; fix`) and before any model loads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from persona_probe.core.errors import PersonaProbeError


def iter_jsonl(path: str | Path, *, errors: list[str] | None = None, what: str = "JSONL file"
               ) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of `path`.

    A line that is not JSON raises a one-line PersonaProbeError naming file and line; with `errors` given it is
    appended there instead and skipped, so a validator can report every bad line at once."""
    p = Path(path)
    if not p.is_file():
        raise PersonaProbeError(f"{what} {p} does not exist")
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            msg = f"{p}:{i}: not JSON ({e.msg}); expected JSONL, one object per line"
            if errors is None:
                raise PersonaProbeError(msg) from None
            errors.append(msg)


def read_jsonl(path: str | Path, *, what: str = "JSONL file") -> list[dict[str, Any]]:
    """All objects of a JSONL file; a line that is not a JSON object is a one-line error."""
    rows = []
    for i, d in iter_jsonl(path, what=what):
        if not isinstance(d, dict):
            raise PersonaProbeError(f"{path}:{i}: expected a JSON object, got {type(d).__name__}")
        rows.append(d)
    return rows


def raise_errors(errors: list[str], what: str) -> None:
    """Raise one PersonaProbeError listing the first five collected problems."""
    if errors:
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise PersonaProbeError(f"bad {what}: " + "; ".join(errors[:5]) + more)
