"""Models: load a model (embedded SmolLM2 built from its PyPI GGUF, a hub id, a local folder, a .gguf) and
its LoRA adapter into a `ModelHandle` that records id, revision and fingerprint for every manifest."""

from persona_probe.models.loading import ModelHandle, known_models, load_model

__all__ = ["ModelHandle", "known_models", "load_model"]
