"""persona_probe: emergent misalignment as a shift in a model's character.

Public API (everything the CLI and notebooks use):

    from persona_probe import load_model, extract, load_activations
    h = load_model("smollm2")                      # embedded SmolLM2-135M-Instruct, offline
    acts = extract(h, "builtin:persona/malicious/positive", layers="all", positions="prompt_last")
"""

from __future__ import annotations

__version__ = "0.1.0"

from persona_probe.core.errors import PersonaProbeError
from persona_probe.activations.extraction import ActivationSet, extract, load_activations, parse_layers
from persona_probe.models.loading import ModelHandle, load_model
from persona_probe.prompts.records import PromptRecord, PromptSet, load_prompts

__all__ = [
    "__version__", "ActivationSet", "ModelHandle", "PersonaProbeError", "PromptRecord", "PromptSet", "extract",
    "load_activations", "load_model", "load_prompts", "parse_layers",
]
