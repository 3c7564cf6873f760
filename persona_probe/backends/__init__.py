"""Backends behind one interface: `hf` (default), `transformer_lens` (TransformerBridge), `nnsight`."""

from __future__ import annotations

from persona_probe.core.errors import PersonaProbeError
from persona_probe.models.loading import ModelHandle
from persona_probe.backends.base import Backend, Intervention, LayerId, check_layers

BACKENDS = ("hf", "transformer_lens", "nnsight")
_ALIASES = {"tl": "transformer_lens", "transformerlens": "transformer_lens", "bridge": "transformer_lens"}


def get_backend(name: str, handle: ModelHandle, **kwargs: object) -> Backend:
    """Build a backend by name over a loaded model (cached on the handle: one bridge/envoy per model)."""
    key = _ALIASES.get(name, name)
    if key not in BACKENDS:
        raise PersonaProbeError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    cache = handle.__dict__.setdefault("_backends", {})
    if key not in cache or kwargs:
        if key == "hf":
            from persona_probe.backends.hf import HFBackend as cls
        elif key == "transformer_lens":
            from persona_probe.backends.tlens import TransformerLensBackend as cls  # type: ignore[assignment]
        else:
            from persona_probe.backends.nnsight_backend import NNsightBackend as cls  # type: ignore[assignment]
        backend = cls(handle, **kwargs)  # type: ignore[arg-type]
        if kwargs:
            return backend
        cache[key] = backend
    return cache[key]


__all__ = ["Backend", "BACKENDS", "Intervention", "LayerId", "check_layers", "get_backend"]
