"""Manifests and safetensors artifacts: every artifact is traceable and written atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_write, atomic_write_json
from persona_probe.core.version import __version__

MANIFEST = "manifest.json"


def package_version() -> str:
    return __version__


def base_manifest(kind: str, **fields: Any) -> dict[str, Any]:
    """Common manifest header: kind, package version, creation time, plus the caller's fields."""
    return {"kind": kind, "package_version": package_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **fields}


def read_manifest(folder: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The manifest of an artifact folder (checked to be of `kind`); a missing folder, a file, a folder
    without a manifest and a corrupt manifest are each a one-line error saying which."""
    f = Path(folder)
    if not f.exists():
        raise PersonaProbeError(f"{folder} does not exist" + (f" (expected a {kind} folder)" if kind else ""))
    if not f.is_dir():
        raise PersonaProbeError(f"{folder} is a file, not an artifact folder" + (f" ({kind})" if kind else ""))
    p = f / MANIFEST
    if not p.exists():
        raise PersonaProbeError(f"{folder} has no {MANIFEST}: not a persona_probe artifact (or an interrupted write)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PersonaProbeError(f"{p} is corrupt ({e.msg} at line {e.lineno}): delete the folder and recompute") from None
    if kind is not None and m.get("kind") != kind:
        raise PersonaProbeError(f"{folder} holds a {m.get('kind')!r} artifact, expected {kind!r}")
    return m


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / MANIFEST, manifest)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(clean, str(p), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise PersonaProbeError(f"missing artifact file {path}: rerun the command that produces it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PersonaProbeError(
            f"corrupt artifact {path} ({str(e).splitlines()[0][:100]}): delete it and rerun to recompute"
        ) from None
