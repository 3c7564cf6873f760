"""Shared pieces of the `persona-probe` commands: model options and loading, JSON printing, argument types,
and the few CLI defaults that differ from the API's (kept for users' scripts)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from persona_probe.backends.vllm import VLLMOptions, get_vllm_engine, require_vllm
from persona_probe.cli.args import dataclass_args, dataclass_from_args
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.layers import parse_layers
from persona_probe.core.paths import checkpoints_dir
from persona_probe.evaluation.judging import check_judge_spec
from persona_probe.models.loading import ModelHandle, load_model

# ---- CLI defaults that differ from the API on purpose (one place each; the API default is in the comment)
MODEL = "smollm2"            # alias of models.loading.DEFAULT_MODEL (smollm2-135m-instruct)
DEVICE = "auto"              # load_model(device=None) means the same
DTYPE = "auto"               # load_model(dtype=None) means the same
JUDGE = "offline"            # evaluate / judge_file: judge=None, which make_judge reads as offline
EVAL_BATCH_SIZE = 32         # evaluation.evaluate.evaluate: batch_size=16
ICL_BATCH_SIZE = 16          # experiments.routes.icl_experiment: batch_size=8
JUDGE_HELP = ("offline | offline-residual (the embedded LM reads the answers: more accurate, slower) | offline:DIR "
              "(fitted by `judge fit`) | openai:MODEL | hf:MODEL")
BACKEND_HELP = "hf | transformer_lens | nnsight"


ENGINES = ("hf", "vllm")
VLLM_CLI_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")  # the rest: Python API


def check_layer_syntax(spec: str | None) -> None:
    """A bad --layers spelling fails before the model loads (the range is checked once the model is known)."""
    if spec and spec != "all":
        parse_layers(spec, 1 << 30)


def check_before_load(args: argparse.Namespace) -> None:
    """What every model command can check before the model loads: engine and its backend, judge, layer spelling."""
    engine = getattr(args, "engine", "hf") or "hf"
    if engine == "vllm":
        require_vllm()
        if getattr(args, "backend", "hf") not in (None, "hf"):
            raise PersonaProbeError(f"--backend {args.backend} applies to --engine hf only: the vllm engine hooks its "
                                    "own model (drop --backend or use --engine hf)")
    judge = getattr(args, "judge", None)
    if isinstance(judge, str) and judge != "none":
        check_judge_spec(judge)
    layers = getattr(args, "layers", None)
    if isinstance(layers, str):
        check_layer_syntax(layers)


def model_args(p: argparse.ArgumentParser, *, adapter: bool = True, revision: bool = True, engine: bool = False) -> None:
    """--model/--device/--dtype (+ --adapter, --revision, --engine): the model a command loads."""
    p.add_argument("--model", default=MODEL, help="embedded name/alias, local HF folder, .gguf file or hub id")
    if adapter:
        p.add_argument("--adapter", default=None, help="peft LoRA adapter folder applied on top of --model")
    p.add_argument("--device", default=DEVICE, help="auto (CUDA if present), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default=DTYPE, help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    if revision:
        p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    if engine:
        p.add_argument("--engine", default="hf", choices=ENGINES,
                       help="sampling engine: hf (reference) or vllm (serving speed; needs the vllm extra, README "
                            "'Engines'); interventions act on the same residual stream in both")
        dataclass_args(p, VLLMOptions, flags={f: "--vllm-" + f.replace("_", "-") for f in VLLM_CLI_OPTIONS},
                       skip=[f for f in VLLMOptions.__dataclass_fields__ if f not in VLLM_CLI_OPTIONS])


def force_arg(p: argparse.ArgumentParser, what: str = "a direction") -> None:
    """--force (old spelling --allow-other-model kept as an alias): use an artifact fitted to another model."""
    p.add_argument("--force", "--allow-other-model", dest="force", action="store_true",
                   help=f"allow {what} derived on another model")


def load_handle(args: argparse.Namespace) -> ModelHandle:
    """The model named by the model_args options. Commands call it as `common.load_handle(args)` (looked up
    at call time) so tests can substitute an already loaded model. `--engine vllm` without vLLM fails here,
    before the model loads."""
    check_before_load(args)
    engine = getattr(args, "engine", "hf") or "hf"
    h = load_model(args.model, adapter=getattr(args, "adapter", None), device=args.device, dtype=args.dtype,
                   revision=getattr(args, "revision", None))
    h.engine = engine
    opts = dataclass_from_args(VLLMOptions, args) if hasattr(args, VLLM_CLI_OPTIONS[0]) else None
    if engine == "vllm" and opts is not None and opts != VLLMOptions():  # else built on first use, with defaults
        h.engine = get_vllm_engine(h, opts)
    return h


def print_json(obj: Any, indent: int | None = 2) -> None:
    print(json.dumps(obj, indent=indent, default=str))


def rounded(x: Any, nd: int = 4) -> Any:
    """Floats rounded to `nd` places, through lists and dicts (for printed summaries)."""
    if isinstance(x, float):
        return round(x, nd)
    if isinstance(x, list):
        return [rounded(v, nd) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v, nd) for k, v in x.items()}
    return x


def print_line(obj: dict[str, Any]) -> None:
    """One JSON line with the top-level floats rounded to 4 places."""
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in obj.items()}, default=str))


def batch_size(v: str) -> int | str:
    """argparse type: a positive integer or 'auto'."""
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch size must be a positive integer or auto, not {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"batch size must be a positive integer or auto, not {v!r}")
    return n


def split_csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# file suffixes dropped from an input's name in a default folder name (a model id's dots are kept: Qwen2.5-7B)
_FILE_SUFFIXES = (".jsonl", ".json", ".yaml", ".yml", ".gguf", ".safetensors", ".txt")


def out_label(part: Any) -> str:
    """A short, safe folder-name piece naming one input: builtin:organisms/health/triggered ->
    organisms-health-triggered, checkpoints/directions/malicious -> malicious, q/one.yaml -> one,
    openai:gpt-4o -> openai-gpt-4o, HuggingFaceTB/SmolLM2-135M -> SmolLM2-135M."""
    s = str(part).strip().rstrip("/\\")
    scheme, sep, rest = s.partition(":")
    if sep and scheme == "builtin":
        s = rest.replace("/", "-")
    elif sep and len(scheme) > 1 and "/" not in scheme and "\\" not in scheme:  # a judge spec, not a drive letter
        s = f"{scheme}-{out_label(rest)}" if rest else scheme
    else:
        s = Path(s).name or s
        for suffix in _FILE_SUFFIXES:
            if s.lower().endswith(suffix):
                s = s[: -len(suffix)]
                break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_.-")


def default_out(kind: str, *parts: Any) -> Path:
    """The folder a command writes to when --out is not given: CHECKPOINTS/KIND/LABEL, LABEL naming the
    command's inputs (`out_label` of each non-empty part, joined by '-'; at most 120 characters), so
    nothing computed is only printed, and different inputs land in different folders."""
    label = "-".join(x for x in (out_label(p) for p in parts if p not in (None, "")) if x)
    return checkpoints_dir() / kind / (label[:120].strip("_.-") or "run")


def text_tag(prefix: str, text: str | None) -> str | None:
    """PREFIX + a 6-hex digest of a free-text input (a system prompt) for a folder name; None for no text."""
    return f"{prefix}{hashlib.sha256(text.encode()).hexdigest()[:6]}" if text else None


def out_or_default(out: str | None, kind: str, *parts: Any) -> Path:
    """--out when given, else `default_out(kind, *parts)`."""
    return Path(out) if out else default_out(kind, *parts)
