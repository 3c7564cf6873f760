"""Activations: residual-stream extraction through a backend — pooled positions (prompt_last, prompt_mean,
response_mean, all) streamed to safetensors shards with a manifest, and token-level capture for SAEs."""

from persona_probe.activations.extraction import ActivationSet, extract, load_activations
from persona_probe.activations.tokens import TokenActs, layer_token_activations, pooled_layer_rows

__all__ = ["ActivationSet", "TokenActs", "extract", "layer_token_activations", "load_activations",
           "pooled_layer_rows"]
