"""Where artifacts live, and atomic writes so no artifact is ever half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import platformdirs


def checkpoints_dir() -> Path:
    """Root for artifacts: activations, directions, runs, ... (`$PERSONA_PROBE_HOME` or `./checkpoints`)."""
    root = os.environ.get("PERSONA_PROBE_HOME")
    return Path(root).expanduser() if root else Path.cwd() / "checkpoints"


def cache_dir() -> Path:
    """Root for what is rebuilt identically anywhere (the embedded model, the fitted default judge), shared by
    every working directory: `$PERSONA_PROBE_HOME/cache`, else the platform's user cache folder
    (`~/.cache/persona-probe` on Linux, honouring `XDG_CACHE_HOME`)."""
    root = os.environ.get("PERSONA_PROBE_HOME")
    if root:
        return Path(root).expanduser() / "cache"
    return Path(platformdirs.user_cache_dir("persona-probe", appauthor=False))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then rename onto `path`; a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` for typed results (anything with `to_dict`), other mappings, then str."""
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Mapping):
        return dict(o)
    return str(o)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def atomic_dir(final: str | Path, build: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Build a directory in a sibling temp dir, then rename it into place, so a crash never leaves a
    half-written artifact. An existing `final` is refused (OSError) unless `replace`, in which case it is swapped
    out only after the build succeeded. The folder gets normal permissions (mkdtemp makes it private)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    old: Path | None = None
    try:
        build(tmp)
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / "x")
        os.chmod(tmp, 0o755)
        os.replace(tmp, final)
    finally:
        for d in (tmp, old):
            if d is not None and d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return final
