"""Typed results that still read like the JSON they are saved as.

Experiments return dataclasses (`SweepResult`, `RouteResult`, ...) deriving from `Result`: attributes are
typed for new code, and the Mapping protocol (`res["cells"]`, `{**cell}`) keeps notebooks and scripts written
against the old dicts working. `to_dict()` is exactly the JSON that lands on disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar


def plain(v: Any) -> Any:
    """Results, dataclasses, tuples inside a value -> JSON-ready dicts and lists."""
    if isinstance(v, Result):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return plain(dataclasses.asdict(v))
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


class Result(Mapping[str, Any]):
    """Mixin for result dataclasses. Fields starting with `_` are private; fields named in `optional` are
    left out of the dict while None (they were absent from the old JSON, e.g. judge columns without a judge)."""

    optional: ClassVar[tuple[str, ...]] = ()

    def _omit(self, name: str) -> bool:
        return name in self.optional and getattr(self, name) is None

    def _keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if not f.name.startswith("_") and not self._omit(f.name)]

    def to_dict(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        return {k: plain(getattr(self, k)) for k in self._keys() if k not in exclude}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())
