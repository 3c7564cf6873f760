"""Backends behind one interface: `hf` (default), `transformer_lens` (TransformerBridge), `nnsight`; and the
optional `vllm` sampling engine (backends/vllm/, vllm itself imported on first use)."""

from __future__ import annotations

from persona_probe.backends.base import Backend, Intervention, LayerId, check_layers
from persona_probe.backends.hf import HFBackend
from persona_probe.backends.nnsight_backend import NNsightBackend  # nnsight itself loads on first use
from persona_probe.backends.tlens import TransformerLensBackend  # transformer_lens itself loads on first use
from persona_probe.backends.vllm import VLLMEngine, VLLMOptions, get_vllm_engine  # vllm itself loads on first use
from persona_probe.core.errors import PersonaProbeError
from persona_probe.models.loading import ModelHandle

BACKENDS = ("hf", "transformer_lens", "nnsight")
_ALIASES = {"tl": "transformer_lens", "transformerlens": "transformer_lens", "bridge": "transformer_lens"}


def get_backend(name: str, handle: ModelHandle, **kwargs: object) -> Backend:
    """Build a backend by name over a loaded model (cached on the handle: one bridge/envoy per model)."""
    key = _ALIASES.get(name, name)
    if key not in BACKENDS:
        raise PersonaProbeError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    cache = handle.__dict__.setdefault("_backends", {})
    if key not in cache or kwargs:
        cls = {"hf": HFBackend, "transformer_lens": TransformerLensBackend, "nnsight": NNsightBackend}[key]
        backend = cls(handle, **kwargs)  # type: ignore[abstract]
        if kwargs:
            return backend
        cache[key] = backend
    return cache[key]


__all__ = ["BACKENDS", "Backend", "Intervention", "LayerId", "VLLMEngine", "VLLMOptions", "check_layers", "get_backend",
           "get_vllm_engine"]
