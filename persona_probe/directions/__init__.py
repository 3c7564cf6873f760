"""Directions: difference-of-means character directions with held-out layer selection and a random control
(`derive`), the persona-prompt and fine-tune model-diff recipes (`workflows`), and the projection monitor."""

from persona_probe.directions.derive import DirectionSet, cosine_matrix, derive, load_direction, project
from persona_probe.directions.monitor import compare_directions, project_prompts
from persona_probe.directions.workflows import model_diff_direction, persona_direction

__all__ = ["DirectionSet", "compare_directions", "cosine_matrix", "derive", "load_direction",
           "model_diff_direction", "persona_direction", "project", "project_prompts"]
