"""Interventions on the residual stream: activation addition (steering), directional ablation, weight
orthogonalisation, and the neutral-text guard that measures what an intervention costs elsewhere."""

from persona_probe.interventions.guard import kl_guard, neutral_texts
from persona_probe.interventions.steering import ablation_interventions, add_interventions, save_orthogonalized

__all__ = ["ablation_interventions", "add_interventions", "kl_guard", "neutral_texts", "save_orthogonalized"]
