"""Experiments: each route to EM (steering, ICL, persona prompts, triggers, fine-tuning) as a function
that writes JSON + plotly figures. They compose the science modules; they hold no math of their own.

`trait` derives a trait file's direction by the persona-vector method (generate, judge, filter, derive)."""

from persona_probe.experiments.trait import TraitDirectionResult, check_trait_run, trait_direction

__all__ = ["TraitDirectionResult", "check_trait_run", "trait_direction"]
