"""A cached pipeline stage: the unit `persona-probe run` resumes from."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona_probe.core.paths import atomic_write_json


def stage_key(*parts: Any) -> str:
    """Hash of a stage's settings and the keys of the stages it depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """A cached pipeline stage: runs `fn(folder)` unless `folder/stage.json` carries the same key."""

    def __init__(self, root: Path, name: str, key: str, log: Callable[[str], None]) -> None:
        self.folder, self.name, self.key, self.log = root / name, name, key, log

    def cached(self) -> bool:
        f = self.folder / "stage.json"
        return f.exists() and json.loads(f.read_text()).get("key") == self.key

    def run(self, fn: Callable[[Path], Any], force: bool = False) -> bool:
        if self.cached() and not force:
            self.log(f"[{self.name}] cached ({self.key})")
            return False
        t = time.time()
        self.log(f"[{self.name}] running ...")
        self.folder.mkdir(parents=True, exist_ok=True)
        fn(self.folder)
        atomic_write_json(self.folder / "stage.json", {"key": self.key, "seconds": round(time.time() - t, 1)})
        self.log(f"[{self.name}] done in {time.time() - t:.0f}s")
        return True
