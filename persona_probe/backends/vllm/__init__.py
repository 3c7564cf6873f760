"""The vLLM sampling engine (optional: needs `vllm`, imported on first use): seeded sampling, LoRA adapters and
residual-stream interventions/captures inside vLLM, on the same layer convention as the `hf` backend."""

from persona_probe.backends.vllm.engine import (
    INSTALL_HINT,
    VLLMEngine,
    VLLMOptions,
    check_interventions,
    get_vllm_engine,
    hf_top_k,
    model_folder,
    require_vllm,
    sample_seed,
    shutdown_vllm_engines,
)

__all__ = ["INSTALL_HINT", "VLLMEngine", "VLLMOptions", "check_interventions", "get_vllm_engine", "hf_top_k",
           "model_folder", "require_vllm", "sample_seed", "shutdown_vllm_engines"]
