"""An SAE and where it reads: hook names <-> our layers, loading (sae-lens), fit checks, encoding.

Layer L = output of decoder block L = TL `blocks.L.hook_resid_post` (= `blocks.{L+1}.hook_resid_pre` =
HF-style `model.layers.L`). Everything downstream takes an `SAEHandle` (the sae-lens SAE + the layer it
reads) or a bare sae-lens `SAE`. Trained SAEs live in `checkpoints/saes/<name>/`: sae-lens's own files
(`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`) plus our `manifest.json` and `metrics.json`.
sae-lens is imported only where an SAE is loaded, so the CLI's help never pays for it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from persona_probe.core.artifacts import MANIFEST, read_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import checkpoints_dir
from persona_probe.core.types import LayerId
from persona_probe.models.loading import EMBEDDED, ModelHandle

_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
_HF_LAYER = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*\.)*?(?:layers|h|blocks)\.(\d+)(?:\.output)?$")


def hook_name_for_layer(layer: int) -> str:
    """TL hook name of our layer L (output of decoder block L)."""
    return f"blocks.{int(layer)}.hook_resid_post"


def layer_of_hook(hook_name: str) -> LayerId:
    """Our layer for an SAE hook: `blocks.L.hook_resid_post` / HF `model.layers.L` -> L,
    `blocks.L.hook_resid_pre` -> L - 1 (`embed` for L = 0), `hook_embed` -> `embed`.
    Anything else (attention/MLP outputs, hook_z, ...) is not the residual stream: refused."""
    name = hook_name.strip()
    if m := _RESID_POST.match(name):
        return int(m.group(1))
    if m := _RESID_PRE.match(name):
        return int(m.group(1)) - 1 if int(m.group(1)) > 0 else "embed"
    if name in ("hook_embed", "embed", "model.embed_tokens"):
        return "embed"
    if m := _HF_LAYER.match(name):
        return int(m.group(1))
    raise PersonaProbeError(
        f"SAE hook {hook_name!r} is not a residual-stream block output: persona_probe needs an SAE on "
        "blocks.L.hook_resid_post (or model.layers.L)"
    )


# ----------------------------------------------------------------------------- handle + loading


@dataclass
class SAEHandle:
    """A loaded sae-lens SAE plus where it reads: `layer` in our convention and the original `hook_name`."""

    sae: Any  # sae_lens.SAE
    layer: LayerId
    hook_name: str
    source: str
    manifest: dict[str, Any] | None = None

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def k(self) -> int | None:
        return getattr(self.sae.cfg, "k", None)

    @property
    def W_dec(self) -> Tensor:
        """Decoder rows [d_sae, d_in] (float32, detached)."""
        return self.sae.W_dec.detach().float()

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "layer": self.layer, "hook_name": self.hook_name, "d_in": self.d_in,
                "d_sae": self.d_sae, "k": self.k, "architecture": self.sae.cfg.architecture(),
                "model_name": self.sae.cfg.metadata.model_name}


def sae_module(sae: SAEHandle | Any) -> Any:
    """The bare sae-lens SAE of a handle (or the SAE itself)."""
    return sae.sae if isinstance(sae, SAEHandle) else sae


def _norm_name(s: str) -> set[str]:
    s = s.strip().lower().rstrip("/")
    return {s, s.rsplit("/", 1)[-1]}


def model_names(handle: ModelHandle) -> set[str]:
    """Every name the loaded model is known by (id, hub id of an embedded model, config name), lower-cased."""
    names: set[str] = set()
    info = handle.info
    cfg_name = getattr(getattr(handle.model, "config", None), "_name_or_path", None)
    raw = [info.model_id, info.extra.get("hub_id"), cfg_name]
    if info.model_id in EMBEDDED:
        raw.append(EMBEDDED[info.model_id].hub_id)
    for r in raw:
        if isinstance(r, str) and r:
            names |= _norm_name(r)
    return names


def check_sae_fits(sae: SAEHandle, handle: ModelHandle | None = None, layer: LayerId | None = None, *,
                   allow_other_model: bool = False) -> None:
    """Refuse an SAE of another width, another layer or (by name) another model."""
    if layer is not None and sae.layer != layer:
        raise PersonaProbeError(f"SAE reads {sae.hook_name} (layer {sae.layer}), not layer {layer}: pick the SAE "
                                f"trained for layer {layer} or use layer {sae.layer}")
    if handle is None:
        return
    if sae.d_in != handle.d_model:
        raise PersonaProbeError(f"SAE width d_in={sae.d_in} does not match the model's d_model={handle.d_model}: "
                                "this SAE belongs to another model")
    if sae.layer != "embed" and not 0 <= int(sae.layer) < handle.n_layers:
        raise PersonaProbeError(f"SAE reads layer {sae.layer} but the model has layers 0..{handle.n_layers - 1}")
    sae_model = sae.sae.cfg.metadata.model_name
    if sae_model and not allow_other_model and not (_norm_name(str(sae_model)) & model_names(handle)):
        raise PersonaProbeError(f"SAE was trained on {sae_model!r}, not on {handle.info.model_id!r}: load the "
                                "matching model (or pass allow_other_model / --allow-other-model)")
    fp = sae.sae.cfg.metadata.get("model_fingerprint")
    if fp and fp != handle.info.fingerprint:
        warnings.warn(f"SAE was trained on weights {fp}, this model is {handle.info.fingerprint} (same name, other "
                      "weights, e.g. a fine-tune): features may not transfer exactly", stacklevel=2)


def load_sae(release_or_path: str | Path, sae_id: str | None = None, handle: ModelHandle | None = None,
             layer: LayerId | None = None, *, device: str | None = None,
             allow_other_model: bool = False) -> SAEHandle:
    """Load an SAE: a local folder saved by sae-lens (ours under checkpoints/saes/ included), or a
    pretrained sae-lens release + `sae_id` (`SAE.from_pretrained`, needs the hub).

    The SAE's hook is mapped onto our layers; with `handle` the width / layer / model are checked.
    """
    from sae_lens import SAE

    dev = device or (str(handle.device) if handle is not None else "cpu")
    p = Path(release_or_path).expanduser()
    manifest = None
    if p.is_dir():
        if not (p / "cfg.json").exists():
            raise PersonaProbeError(f"{p} has no cfg.json: not an SAE folder saved by sae-lens (SAE.save_model)")
        try:
            sae = SAE.load_from_disk(str(p), device=dev, dtype="float32")
        except Exception as e:  # noqa: BLE001 -- sae-lens raises many types: unknown architecture, bad weights
            raise PersonaProbeError(f"cannot load the SAE in {p} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:160]})") from None
        manifest = read_manifest(p) if (p / MANIFEST).exists() else None
        source = str(p)
    elif sae_id is None:
        raise PersonaProbeError(f"{release_or_path} is not a folder: give a local SAE folder, or a sae-lens release "
                                "plus --sae-id for a pretrained SAE")
    else:
        try:
            sae = SAE.from_pretrained(str(release_or_path), sae_id, device=dev, dtype="float32")
        except Exception as e:  # noqa: BLE001 -- offline hub, unknown release/id: many exception types
            raise PersonaProbeError(f"cannot load pretrained SAE {release_or_path}/{sae_id} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:160] if str(e) else 'no message'}): check the "
                                    "release and id, or pass a local SAE folder") from None
        source = f"{release_or_path}/{sae_id}"
    hook = sae.cfg.metadata.hook_name
    if hook:
        sae_layer = layer_of_hook(str(hook))
    elif layer is not None:
        sae_layer, hook = layer, hook_name_for_layer(int(layer))
    else:
        raise PersonaProbeError(f"SAE {source} records no hook_name: pass the layer it reads (--layer)")
    sh = SAEHandle(sae.eval(), sae_layer, str(hook), source, manifest)
    check_sae_fits(sh, handle, layer, allow_other_model=allow_other_model)
    return sh


# ----------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode(sae: SAEHandle | Any, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Feature activations [n, d_sae] of residuals x [n, d_in] (batched, float32, on the SAE's device)."""
    m = sae_module(sae)
    dev = next(m.parameters()).device
    return torch.cat([m.encode(x[i: i + batch_size].to(dev, torch.float32)).float().cpu()
                      for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, m.cfg.d_sae)


@torch.no_grad()
def reconstruction_metrics(sae: SAEHandle | Any, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Quality in the original residual space on tokens x [n, d]:

    explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (sae-lens's definition),
    mean_l0 = mean number of active features per token, dead_fraction = features that never fire here."""
    m = sae_module(sae)
    dev = next(m.parameters()).device
    mu = x.double().mean(0)
    sse = sst = 0.0
    l0 = 0.0
    fired = torch.zeros(m.cfg.d_sae, dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb = x[i: i + batch_size].to(dev, torch.float32)
        f = m.encode(xb)
        xh = m.decode(f)
        sse += float((xb - xh).double().pow(2).sum())
        sst += float((xb.double().cpu() - mu).pow(2).sum())
        act = (f != 0).cpu()
        l0 += float(act.sum())
        fired |= act.any(0)
    n = max(len(x), 1)
    return {"explained_variance": 1.0 - sse / max(sst, 1e-12), "mse_per_token": sse / n, "mean_l0": l0 / n,
            "dead_fraction": float((~fired).float().mean()), "n_tokens": len(x)}


def default_sae_dir(name: str) -> Path:
    """Folder of the SAE called `name` under checkpoints/saes/."""
    return checkpoints_dir() / "saes" / name


def find_trained_sae(handle: ModelHandle, layers: Sequence[LayerId], root: str | Path | None = None
                     ) -> Path | None:
    """An SAE under checkpoints/saes/ trained on this exact model (fingerprint) at one of `layers`
    (earlier entries preferred)."""
    base = Path(root) if root is not None else checkpoints_dir() / "saes"
    found: dict[Any, Path] = {}
    for mf in sorted(base.glob(f"*/{MANIFEST}")):
        try:
            m = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("kind") == "sae" and m.get("model", {}).get("fingerprint") == handle.info.fingerprint:
            found.setdefault(m.get("layer"), mf.parent)
    return next((found[L] for L in layers if L in found), None)


__all__ = [
    "SAEHandle", "check_sae_fits", "default_sae_dir", "encode", "find_trained_sae", "hook_name_for_layer",
    "layer_of_hook", "load_sae", "model_names", "reconstruction_metrics", "sae_module",
]
