"""Sparse-autoencoder features of the character direction, on top of sae-lens.

* `handle`: hook names <-> our layers, loading an SAE (local folder or sae-lens release), fit checks,
  encoding, reconstruction quality, trained SAEs under checkpoints/saes/;
* `corpus` + `train`: the local training text and TopK training with sae-lens's own `SAETrainer`;
* `features`: feature diffs between two activation sets, a direction's decomposition into decoder rows,
  top-activating contexts, single-feature steering vectors.

Token-level residual capture lives in `activations.tokens`, figures/HTML in `report.sae`, feature-vs-direction
steering in `experiments.sae`, the pipeline stage in `pipeline.sae_stage`. sae-lens itself is imported only
when an SAE is loaded or trained.
"""

from persona_probe.sae.corpus import add_generated_responses, training_records
from persona_probe.sae.features import (
    DEFAULT_KS,
    Decomposition,
    Example,
    FeatureDiff,
    activation_rows,
    decompose,
    diff_features,
    feature_direction,
    feature_interventions,
    feature_vector,
    lstsq_share,
    top_examples,
)
from persona_probe.sae.handle import (
    SAEHandle,
    check_sae_fits,
    default_sae_dir,
    encode,
    find_trained_sae,
    hook_name_for_layer,
    layer_of_hook,
    load_sae,
    model_names,
    reconstruction_metrics,
)
from persona_probe.sae.train import SAETrainConfig, fit_sae, splice_kl, split_records, train_sae

__all__ = [
    "DEFAULT_KS", "Decomposition", "Example", "FeatureDiff", "SAEHandle", "SAETrainConfig", "activation_rows",
    "add_generated_responses", "check_sae_fits", "decompose", "default_sae_dir", "diff_features", "encode",
    "feature_direction", "feature_interventions", "feature_vector", "find_trained_sae", "fit_sae",
    "hook_name_for_layer", "layer_of_hook", "load_sae", "lstsq_share", "model_names", "reconstruction_metrics",
    "splice_kl", "split_records", "top_examples", "train_sae", "training_records",
]
