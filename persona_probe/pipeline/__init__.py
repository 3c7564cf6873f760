"""Pipeline: `persona-probe run` — the typed config (`PipelineConfig`), cached `Stage`s keyed by their
settings, and the direction → steering → routes → SAE → report sequence."""

from persona_probe.pipeline.config import PipelineConfig, load_config
from persona_probe.pipeline.run import run_pipeline
from persona_probe.pipeline.stage import Stage, stage_key

__all__ = ["PipelineConfig", "Stage", "load_config", "run_pipeline", "stage_key"]
