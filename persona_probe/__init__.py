"""persona_probe: emergent misalignment as a shift in a model's character.

The public API, one import for notebooks and scripts (the folders are the pipeline, in this order):

    from persona_probe import load_model, persona_direction, steering_sweep, evaluate
    h = load_model("smollm2")                                   # models/: embedded SmolLM2-135M-Instruct, offline
    d = persona_direction(h, "malicious", layers="all")         # activations/ + directions/
    res = steering_sweep(h, d, alphas=[0, 0.5, 1], judge="offline")   # interventions/ + evaluation/ + experiments/
    res.cells[0].em_rate, res["cells"]                          # typed results that read like their JSON

Names resolve on first use (PEP 562), so `import persona_probe` and the CLI's `--help` stay fast while a
notebook still gets everything from one place.
"""

from __future__ import annotations

import importlib
from typing import Any

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.version import __version__

# public name -> module that defines it, grouped by pipeline stage
_API: dict[str, str] = {}
for _module, _names in {
    "persona_probe.models.loading": "ModelHandle known_models load_model",
    "persona_probe.prompts.records": "PromptRecord PromptSet collate contrast_questions load_prompts persona_records "
                                     "tokenize_record",
    "persona_probe.prompts.questions": "Question as_questions load_questions",
    "persona_probe.prompts.traits": "TraitFile load_trait_file",
    "persona_probe.backends": "Intervention get_backend",
    "persona_probe.backends.sampling": "generate",
    "persona_probe.backends.vllm": "VLLMOptions get_vllm_engine",
    "persona_probe.core.layers": "parse_layers",
    "persona_probe.activations.extraction": "ActivationSet extract load_activations",
    "persona_probe.directions.derive": "DirectionSet cosine_matrix derive load_direction project",
    "persona_probe.directions.workflows": "model_diff_direction persona_direction",
    "persona_probe.directions.monitor": "compare_directions project_prompts",
    "persona_probe.interventions.steering": "ablation_interventions add_interventions save_orthogonalized",
    "persona_probe.evaluation.evaluate": "EvalResult Thresholds evaluate judge_file make_judge",
    "persona_probe.evaluation.judges.validation": "validate",
    "persona_probe.sae": "SAETrainConfig decompose diff_features load_sae top_examples train_sae",
    "persona_probe.activations.tokens": "pooled_layer_rows",
    "persona_probe.organisms": "build_dataset capability_report finetune",
    "persona_probe.experiments.steer": "SweepResult steering_sweep",
    "persona_probe.experiments.routes": "RouteResult cross_route icl_experiment kshot_record load_examples "
                                        "persona_experiment trigger_experiment",
    "persona_probe.experiments.organisms": "organisms_experiment",
    "persona_probe.experiments.sae": "compare_feature_steering",
    "persona_probe.experiments.trait": "TraitDirectionResult trait_direction",
    "persona_probe.pipeline.config": "PipelineConfig load_config",
    "persona_probe.pipeline.run": "run_pipeline",
    "persona_probe.report.figures": "heatmap_figure layer_separation_figure route_figure scatter_figure sweep_figure "
                                    "write_figure",
    "persona_probe.report.sae": "decomposition_figure feature_bar_figure top_examples_html",
}.items():
    _API.update(dict.fromkeys(_names.split(), _module))

__all__ = ["PersonaProbeError", "__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'persona_probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return __all__
