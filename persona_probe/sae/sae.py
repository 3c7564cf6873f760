"""Sparse-autoencoder features of the character direction, on top of sae-lens.

* load an SAE (sae-lens release + id from the hub, or a local folder saved by sae-lens) and map its hook
  onto our layer convention: layer L = output of decoder block L = TL `blocks.L.hook_resid_post`
  (= `blocks.{L+1}.hook_resid_pre` = HF-style `model.layers.L`);
* train a TopK SAE with sae-lens's own `SAETrainer` fed from residuals we extract ourselves (every token
  position except position 0, the attention sink) from built-in prompts + model-generated responses;
* diff features between two activation sets, decompose a direction into decoder rows, find top-activating
  contexts, steer with a single feature, plot it all.

Everything downstream takes an `SAEHandle` (the sae-lens SAE + the layer it reads) or a bare sae-lens `SAE`.
Trained SAEs live in `checkpoints/saes/<name>/`: sae-lens's own files (`cfg.json`,
`sae_weights.safetensors`, `sparsity.safetensors`) plus our `manifest.json` and `metrics.json`.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from persona_probe.core.artifacts import MANIFEST, base_manifest, read_manifest, write_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.models.loading import EMBEDDED, ModelHandle
from persona_probe.core.paths import atomic_dir, atomic_write_json, atomic_write_text, checkpoints_dir
from persona_probe.prompts.records import PromptRecord, PromptSet, length_sorted_batches, tokenize_record

if TYPE_CHECKING:  # heavy imports stay lazy: `persona-probe --help` must not import sae-lens
    import plotly.graph_objects as go

    from persona_probe.backends import Intervention
    from persona_probe.directions.derive import DirectionSet
    from persona_probe.activations.extraction import ActivationSet

LayerId = int | str

# ----------------------------------------------------------------------------- hook names <-> layers

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


def _unwrap(sae: SAEHandle | Any) -> Any:
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
        except Exception as e:  # unknown architecture, missing weights, shape mismatch
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
        except Exception as e:  # offline hub, unknown release/id
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
    m = _unwrap(sae)
    dev = next(m.parameters()).device
    return torch.cat([m.encode(x[i: i + batch_size].to(dev, torch.float32)).float().cpu()
                      for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, m.cfg.d_sae)


@torch.no_grad()
def reconstruction_metrics(sae: SAEHandle | Any, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Quality in the original residual space on tokens x [n, d]:

    explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (sae-lens's definition),
    mean_l0 = mean number of active features per token, dead_fraction = features that never fire here."""
    m = _unwrap(sae)
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


# ----------------------------------------------------------------------------- token-level residuals


@dataclass
class TokenActs:
    """Residuals of single token positions: `acts` [N, d], with record index, position and token id [N]."""

    acts: Tensor
    record: Tensor
    position: Tensor
    token_id: Tensor
    record_ids: list[str]

    def __len__(self) -> int:
        return len(self.acts)

    def subset(self, mask: Tensor) -> "TokenActs":
        return TokenActs(self.acts[mask], self.record[mask], self.position[mask], self.token_id[mask],
                         self.record_ids)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the wanted layer needs computing."""


def _keep_positions(ids: Sequence[int], skip_first: bool, seen: set[int] | None) -> list[int]:
    """Positions to keep: all but position 0 (attention sink), minus prefixes already seen (identical
    prefixes give identical residuals under causal attention, e.g. a shared system prompt)."""
    keep, h = [], hash(("persona_probe", ids[0] if ids else None))
    for t in range(len(ids)):
        if t > 0:
            h = hash((h, ids[t]))
        if t == 0 and skip_first:
            continue
        if seen is not None:
            if h in seen:
                continue
            seen.add(h)
        keep.append(t)
    return keep


@torch.inference_mode()
def layer_token_activations(handle: ModelHandle, records: Sequence[PromptRecord], layer: int, *,
                            batch_size: int = 16, skip_first: bool = True, dedupe: bool = True,
                            seen: set[int] | None = None, progress: bool = False) -> TokenActs:
    """Residual stream at `layer` (output of block L, as `extract`) for every kept token of every record.

    The forward pass stops right after block L. `dedupe` drops positions whose whole prefix was seen in an
    earlier record (or in `seen`, a set shared across calls and updated in place). Returns N rows of
    [d_model] with their record index / position / token id, sorted by (record, position).
    """
    from tqdm.auto import tqdm

    if not 0 <= int(layer) < handle.n_layers:
        raise PersonaProbeError(f"layer {layer} out of range: this model has layers 0..{handle.n_layers - 1}")
    tok = handle.tokenizer
    toks = [tokenize_record(tok, r) for r in records]
    if dedupe and seen is None:
        seen = set()
    keep = [_keep_positions(t.ids, skip_first, seen if dedupe else None) for t in toks]
    captured: dict[str, Tensor] = {}

    def hook(_mod: torch.nn.Module, _args: Any, out: Any) -> None:
        captured["h"] = (out[0] if isinstance(out, tuple) else out).detach()
        raise _StopForward

    acts, rec, pos, tid = [], [], [], []
    dev = handle.device
    hd = handle.layers[int(layer)].register_forward_hook(hook)
    try:
        for b in tqdm(length_sorted_batches(toks, batch_size, tok.pad_token_id), desc=f"residuals L{layer}",
                      disable=not progress):
            try:
                handle.model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev))
            except _StopForward:
                pass
            h = captured.pop("h").float().cpu()  # [b, s, d]
            for row, idx in enumerate(b.index):
                k = torch.tensor(keep[idx], dtype=torch.long)
                if len(k):
                    acts.append(h[row, k])
                    rec.append(torch.full((len(k),), idx, dtype=torch.long))
                    pos.append(k)
                    tid.append(torch.tensor(toks[idx].ids, dtype=torch.long)[k])
    finally:
        hd.remove()
    if not acts:
        z = torch.zeros(0, dtype=torch.long)
        return TokenActs(torch.zeros(0, handle.d_model), z, z, z, [r.id for r in records])
    r_, p_ = torch.cat(rec), torch.cat(pos)
    order = torch.argsort(r_ * (1 << 32) + p_)  # batches are length-sorted: restore record order
    return TokenActs(torch.cat(acts)[order], r_[order], p_[order], torch.cat(tid)[order], [r.id for r in records])


def pooled_layer_rows(handle: ModelHandle, records: Sequence[PromptRecord], layer: int, position: str, *,
                      batch_size: int = 16, progress: bool = False) -> Tensor:
    """One row [n, d] per record at `layer`, pooled like `extract` (prompt_last, prompt_mean without token 0,
    response_mean, or "all" = every token except 0 as [N, d]) from an early-exit pass."""
    if position == "all":
        return layer_token_activations(handle, records, layer, batch_size=batch_size, dedupe=False,
                                       progress=progress).acts
    from persona_probe.activations.extraction import check_positions

    check_positions([position], PromptSet("rows", tuple(records)))
    ta = layer_token_activations(handle, records, layer, batch_size=batch_size, skip_first=False, dedupe=False,
                                 progress=progress)
    spans = []
    for r in records:
        t = tokenize_record(handle.tokenizer, r)
        spans.append({"prompt_last": (t.prompt_len - 1, t.prompt_len),
                      "prompt_mean": (1 if t.prompt_len > 1 else 0, t.prompt_len),
                      "response_mean": (t.resp_start, t.resp_end)}[position])
    lo = torch.tensor([s[0] for s in spans])[ta.record]
    hi = torch.tensor([s[1] for s in spans])[ta.record]
    w = ((ta.position >= lo) & (ta.position < hi)).float()
    sums = torch.zeros(len(records), ta.acts.shape[1]).index_add_(0, ta.record, ta.acts * w[:, None])
    return sums / torch.zeros(len(records)).index_add_(0, ta.record, w).clamp_min(1)[:, None]


# ----------------------------------------------------------------------------- training corpus


def training_records(*, questions_per_system: int = 6, seed: int = 0) -> list[PromptRecord]:
    """Local text for SAE training: built-in questions (plain, under every trait's character and neutral system
    prompts, under the persona catalogue) plus the built-in neutral paragraphs and multiple-choice items."""
    from persona_probe.experiments.steer import neutral_texts
    from persona_probe.prompts.records import contrast_questions, data_path, load_traits
    from persona_probe.prompts.questions import load_questions

    g = torch.Generator().manual_seed(seed)
    qs = contrast_questions()
    recs: list[PromptRecord] = list(qs)

    def pick(n: int) -> list[PromptRecord]:
        return [qs[i] for i in torch.randperm(len(qs), generator=g)[:n].tolist()]

    for trait, spec in load_traits().items():
        for side in ("positive", "negative"):
            for j, s in enumerate(spec.get(side, [])):
                recs += [PromptRecord(f"{trait}-{side[:3]}{j}-{q.id}", q.user, system=s) for q in
                         pick(questions_per_system)]
    personas = data_path("prompts", "personas.json")
    if personas.exists():
        for p in json.loads(personas.read_text(encoding="utf-8")):
            recs += [PromptRecord(f"persona-{p['id']}-{q.id}", q.user, system=p["system"]) for q in pick(3)]
    seen = {r.user for r in recs}
    for name in ("builtin:core", "builtin:extended"):
        try:
            for q in load_questions(name):
                recs += [r for r in q.records() if r.user not in seen and not seen.add(r.user)]
        except PersonaProbeError:
            pass
    recs += neutral_texts(n=10_000)
    mc = data_path("capability", "multiple_choice.jsonl")
    if mc.exists():
        for line in mc.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                opts = "\n".join(f"{'ABCDEFGH'[i]}. {c}" for i, c in enumerate(d["choices"]))
                recs.append(PromptRecord(d["id"], f"{d['question']}\n{opts}\nAnswer with the letter.",
                                         assistant=f"{'ABCDEFGH'[d['answer']]}. {d['choices'][d['answer']]}"))
    return recs


def add_generated_responses(handle: ModelHandle, records: Sequence[PromptRecord], n: int, *,
                            max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                            batch_size: int = 32, progress: bool = False) -> list[PromptRecord]:
    """Replace up to `n` prompt-only records (seeded choice) by the same prompt + the model's own sampled answer."""
    from persona_probe.backends.sampling import generate, with_responses

    open_idx = [i for i, r in enumerate(records) if r.assistant is None]
    g = torch.Generator().manual_seed(seed)
    chosen = sorted(open_idx[i] for i in torch.randperm(len(open_idx), generator=g)[: max(n, 0)].tolist())
    if not chosen:
        return list(records)
    sub = [records[i] for i in chosen]
    samples = generate(handle, sub, n_samples=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       batch_size=batch_size, progress=progress, desc="SAE corpus responses")
    answered = dict(zip(chosen, with_responses(sub, samples)))
    return [answered.get(i, r) for i, r in enumerate(records)]


# ----------------------------------------------------------------------------- training


@dataclass
class SAETrainConfig:
    """TopK SAE training on CPU-sized local data (defaults sized for the embedded 135M model, 2 cores).

    `train_tokens` counts token rows the trainer sees (several epochs over the unique tokens)."""

    layer: int = 15
    d_sae: int = 2048
    k: int = 32
    train_tokens: int = 400_000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_warm_up_steps: int = 20
    dead_window_tokens: int = 50_000
    holdout_frac: float = 0.1
    generate_n: int = 300
    max_new_tokens: int = 64
    questions_per_system: int = 6
    kl_texts: int = 16
    extract_batch_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        if self.k < 1 or self.k > self.d_sae:
            raise PersonaProbeError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")
        if self.d_sae < 1 or self.train_tokens < 1 or self.batch_size < 1:
            raise PersonaProbeError("d_sae, train_tokens and batch_size must be positive")
        if not 0.0 < self.holdout_frac < 1.0:
            raise PersonaProbeError(f"holdout_frac must be in (0, 1), got {self.holdout_frac}")


def _batches(x: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless seeded epochs of shuffled [batch_size, d] rows (sae-lens's DataProvider protocol)."""
    g = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(x))
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(perm) - bs + 1, bs):
            yield x[perm[i: i + bs]]


def split_records(n_records: int, holdout_frac: float, seed: int) -> tuple[set[int], set[int]]:
    """Seeded record-level split (held-out tokens come from unseen records)."""
    perm = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(n_records * holdout_frac)) if n_records > 1 else 0
    return set(perm[n_test:]), set(perm[:n_test])


def default_sae_dir(name: str) -> Path:
    return checkpoints_dir() / "saes" / name


def _build_training_sae(cfg: SAETrainConfig, handle: ModelHandle, max_len: int) -> Any:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name=handle.info.model_id, hook_name=hook_name_for_layer(cfg.layer),
                       model_class_name=type(handle.model).__name__, context_size=max_len, prepend_bos=True,
                       seqpos_slice=[1, None], dataset_path="persona_probe:builtin+generated (local)",
                       model_fingerprint=handle.info.fingerprint, persona_probe_layer=cfg.layer)
    sae_cfg = TopKTrainingSAEConfig(d_in=handle.d_model, d_sae=cfg.d_sae, k=cfg.k, dtype="float32", device="cpu",
                                    normalize_activations="expected_average_only_in", metadata=meta)
    return TopKTrainingSAE(sae_cfg)


def fit_sae(train: Tensor, cfg: SAETrainConfig, handle: ModelHandle, max_len: int = 0,
            progress: bool = False) -> tuple[Any, Any, float]:
    """Train a TopK SAE with sae-lens's `SAETrainer` on rows `train` [N, d]. Returns (training SAE with the
    norm scaling folded back in, the trainer, wall seconds of `fit`)."""
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(cfg.seed)
    sae = _build_training_sae(cfg, handle, max_len)
    bs = min(cfg.batch_size, len(train))
    steps = max(1, cfg.train_tokens // bs)
    tcfg = SAETrainerConfig(
        total_training_samples=steps * bs, train_batch_size_samples=bs, lr=cfg.lr, lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing", lr_warm_up_steps=min(cfg.lr_warm_up_steps, steps // 4),
        dead_feature_window=max(5, cfg.dead_window_tokens // bs), feature_sampling_window=steps,
        n_batches_for_norm_estimate=max(1, min(64, len(train) // bs)), device="cpu",
    )
    trainer = SAETrainer(tcfg, sae, _batches(train, bs, cfg.seed))
    # sae-lens's own estimate (sqrt(d_in) / mean norm), computed up front so b_dec can start at the data mean
    trainer.activation_scaler.estimate_scaling_factor(handle.d_model, _batches(train, bs, cfg.seed + 1),
                                                      tcfg.n_batches_for_norm_estimate)
    with torch.no_grad():
        sae.b_dec.data.copy_(train.mean(0) * trainer.activation_scaler.scaling_factor)
    t0 = time.time()
    trained = trainer.fit()
    return trained, trainer, time.time() - t0


def _splice_intervention(sh: SAEHandle) -> "Intervention":
    """Replace the residual at the SAE's layer by its reconstruction (position 0, unseen in training, kept)."""
    from persona_probe.backends import Intervention

    m = sh.sae

    def fn(h: Tensor) -> Tensor:
        out = m.decode(m.encode(h.float())).to(h.dtype)
        out[:, :1] = h[:, :1]
        return out

    return Intervention(sh.layer, fn)


def splice_kl(handle: ModelHandle, sh: SAEHandle, n_texts: int = 16) -> dict[str, float]:
    """KL(model || model with the SAE reconstruction spliced in) on built-in neutral text, and the
    perplexity ratio (reuses experiments.steer.kl_guard)."""
    from persona_probe.experiments.steer import kl_guard, neutral_texts

    out = kl_guard(handle, [_splice_intervention(sh)], neutral_texts(n_texts))
    return {"kl_spliced_neutral": out["kl_neutral"], "ppl_ratio_spliced_neutral": out.get("ppl_ratio_neutral")}


def _token_cache_file(cache_dir: str | Path, handle: ModelHandle, cfg: SAETrainConfig, ps_hash: str) -> Path:
    import hashlib

    key = json.dumps([handle.info.fingerprint, handle.info.adapter_fingerprint, cfg.layer, ps_hash,
                      cfg.holdout_frac, cfg.seed])
    return Path(cache_dir) / f"tokens-L{cfg.layer}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def _split_token_acts(handle: ModelHandle, recs: list[PromptRecord], cfg: SAETrainConfig,
                      progress: bool) -> tuple[Tensor, Tensor]:
    """Train / held-out token residuals [N, d] at cfg.layer with a record-level split."""
    train_idx, test_idx = split_records(len(recs), cfg.holdout_frac, cfg.seed)
    # one prefix set across both splits: a held-out token whose whole prefix also occurs in a training
    # record (e.g. a shared system prompt) has the identical residual, so it is not held-out and is dropped
    seen: set[int] = set()
    ta_train = layer_token_activations(handle, [recs[i] for i in sorted(train_idx)], cfg.layer,
                                       batch_size=cfg.extract_batch_size, seen=seen, progress=progress)
    ta_test = layer_token_activations(handle, [recs[i] for i in sorted(test_idx)], cfg.layer,
                                      batch_size=cfg.extract_batch_size, seen=seen, progress=progress)
    return ta_train.acts, ta_test.acts


def train_sae(handle: ModelHandle, config: SAETrainConfig | None = None, *, name: str | None = None,
              out: str | Path | None = None, records: Sequence[PromptRecord] | None = None,
              overwrite: bool = False, progress: bool = True, log: Any = None,
              token_cache: str | Path | None = None) -> SAEHandle:
    """Train a TopK SAE on residuals of `handle` at `config.layer` and save it (sae-lens format + manifest).

    Data: `records` (default: `training_records()` with `generate_n` of them answered by the model),
    all token positions except 0, deduplicated by prefix; a record-level held-out split measures
    explained variance / L0 / dead fraction of the *saved* SAE in the original residual space.
    The corpus is saved as `corpus.jsonl` next to the SAE (pass it back as `records` with generate_n=0 to
    retrain on the same text). `token_cache`: a folder where the extracted residuals are kept, keyed by
    model, layer, corpus hash, split and seed, so retraining with another d_sae/k/lr skips extraction.
    """
    cfg = config or SAETrainConfig()
    cfg.validate()
    if not 0 <= cfg.layer < handle.n_layers:
        raise PersonaProbeError(f"layer {cfg.layer} out of range: this model has layers 0..{handle.n_layers - 1}")
    say = log or (lambda m: None)
    name = name or f"{handle.info.model_id.rsplit('/', 1)[-1]}-L{cfg.layer}-topk{cfg.k}-{cfg.d_sae}"
    folder = Path(out) if out else default_sae_dir(name)
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise PersonaProbeError(f"{folder} already exists: choose another --name/--out or pass --overwrite")
    t_start = time.time()
    recs = list(records) if records is not None else training_records(
        questions_per_system=cfg.questions_per_system, seed=cfg.seed)
    if not recs:
        raise PersonaProbeError("no training records: give at least one prompt")
    t0 = time.time()
    if cfg.generate_n > 0:
        recs = add_generated_responses(handle, recs, cfg.generate_n, max_new_tokens=cfg.max_new_tokens,
                                       seed=cfg.seed, progress=progress)
    gen_s = time.time() - t0
    say(f"corpus: {len(recs)} records ({sum(r.assistant is not None for r in recs)} with responses), "
        f"generation {gen_s:.0f}s")
    corpus = PromptSet("sae-train", tuple(recs))  # as given/generated, before the seeded shuffle
    order = torch.randperm(len(recs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    recs = [recs[i] for i in order]  # shuffled, so prefix dedupe does not favour one source
    ps = PromptSet("sae-train", tuple(recs))
    t0 = time.time()
    cache = _token_cache_file(token_cache, handle, cfg, ps.hash) if token_cache else None
    if cache is not None and cache.exists():
        from persona_probe.core.artifacts import load_tensors

        t = load_tensors(cache)
        x_train, x_test = t["train"], t["heldout"]
        say(f"token residuals from cache {cache}")
    else:
        x_train, x_test = _split_token_acts(handle, recs, cfg, progress)
        if cache is not None:
            from persona_probe.core.artifacts import save_tensors

            save_tensors(cache, {"train": x_train, "heldout": x_test})
    extract_s = time.time() - t0
    if len(x_train) < 2 or len(x_test) < 1:
        raise PersonaProbeError(f"too few tokens to train on ({len(x_train)} train / {len(x_test)} held-out): "
                                "give more or longer records")
    say(f"tokens: {len(x_train)} train / {len(x_test)} held-out (unique prefixes, position 0 dropped), "
        f"extraction {extract_s:.0f}s")
    max_len = max(len(tokenize_record(handle.tokenizer, r).ids) for r in recs)
    trained, trainer, fit_s = fit_sae(x_train, cfg, handle, max_len, progress=progress)
    say(f"trained {trainer.n_training_steps} steps x {trainer.cfg.train_batch_size_samples} tokens in {fit_s:.0f}s")

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        trained.save_inference_model(str(tmp))
        save_file({"sparsity": trainer.log_feature_sparsity.contiguous()}, str(tmp / "sparsity.safetensors"))
        corpus.save_jsonl(tmp / "corpus.jsonl")

    if folder.exists():
        shutil.rmtree(folder)
    atomic_dir(folder, build)
    sh = load_sae(folder, handle=handle)  # metrics on exactly what was saved
    held = reconstruction_metrics(sh, x_test)
    g = torch.Generator().manual_seed(cfg.seed)
    sample = x_train[torch.randperm(len(x_train), generator=g)[: max(len(x_test), 4096)]]
    train_m = reconstruction_metrics(sh, sample)
    metrics: dict[str, Any] = {"heldout": held, "train_sample": train_m,
                               "trainer_l0": trained.cfg.metadata.get("l0"),
                               "trainer_dead_features": trained.cfg.metadata.get("num_dead_features")}
    if cfg.kl_texts > 0:
        metrics.update(splice_kl(handle, sh, cfg.kl_texts))
    wall = time.time() - t_start
    timing = {"generation_s": round(gen_s, 1), "extraction_s": round(extract_s, 1), "fit_s": round(fit_s, 1),
              "total_s": round(wall, 1)}
    manifest = base_manifest(
        "sae", name=name, model=handle.info.to_dict(), layer=cfg.layer, hook_name=hook_name_for_layer(cfg.layer),
        architecture="topk", d_in=handle.d_model, d_sae=cfg.d_sae, k=cfg.k,
        n_tokens={"train_unique": len(x_train), "heldout": len(x_test), "seen_by_trainer":
                  trainer.n_training_samples, "epochs": trainer.n_training_samples / len(x_train)},
        seed=cfg.seed, prompt_set={"name": ps.name, "hash": ps.hash, "corpus_hash": corpus.hash, "n": len(ps),
                                   "n_with_responses": sum(r.assistant is not None for r in recs),
                                   "file": "corpus.jsonl"},
        config=asdict(cfg), normalisation="sae-lens expected_average_only_in; scaling factor folded into the "
        "saved weights, so the SAE reads raw residuals", positions="every token except position 0 (attention "
        "sink), prefix-deduplicated", sae_lens_version=_sae_lens_version(), metrics=metrics, timing=timing,
    )
    atomic_write_json(folder / "metrics.json", {**metrics, "timing": timing})
    write_manifest(folder, manifest)
    sh.manifest = manifest
    return sh


def _sae_lens_version() -> str:
    import sae_lens

    return str(sae_lens.__version__)


# ----------------------------------------------------------------------------- feature diffing


def activation_rows(acts: Tensor | "ActivationSet", layer: LayerId | None = None,
                    position: str = "prompt_last") -> Tensor:
    """Rows [n, d] from a tensor [n, d] or an ActivationSet at (position, layer); position "all" gives every
    real token except position 0."""
    if isinstance(acts, Tensor):
        if acts.ndim != 2:
            raise PersonaProbeError(f"activations must be [n, d], got shape {tuple(acts.shape)}")
        return acts.float()
    if layer is None:
        raise PersonaProbeError("pass the layer to read from the activation set")
    if position == "all":
        if acts.tokens is None or acts.token_mask is None:
            raise PersonaProbeError("activation set has no token-level ('all') activations: extract with "
                                    "--positions all")
        x = acts.tokens[:, acts.layer_index(layer)]  # [n, T, d]
        m = acts.token_mask.bool().clone()
        m[:, 0] = False
        return x[m].float()
    return acts.get(position, layer).float()


@dataclass
class FeatureDiff:
    """Per-feature mean activation and firing frequency on two sets (a minus b)."""

    mean_a: Tensor
    mean_b: Tensor
    freq_a: Tensor
    freq_b: Tensor
    n_a: int
    n_b: int
    labels: tuple[str, str] = ("a", "b")

    @property
    def mean_diff(self) -> Tensor:
        return self.mean_a - self.mean_b

    @property
    def freq_diff(self) -> Tensor:
        return self.freq_a - self.freq_b

    def row(self, f: int) -> dict[str, Any]:
        return {"feature": int(f), "mean_a": float(self.mean_a[f]), "mean_b": float(self.mean_b[f]),
                "mean_diff": float(self.mean_diff[f]), "freq_a": float(self.freq_a[f]),
                "freq_b": float(self.freq_b[f]), "freq_diff": float(self.freq_diff[f])}

    def ranked(self, by: str = "mean", top: int = 50, toward: str = "a") -> list[dict[str, Any]]:
        """Top features by mean-activation ("mean") or firing-frequency ("freq") difference, more active in
        `toward` ("a" or "b")."""
        if by not in ("mean", "freq"):
            raise PersonaProbeError(f"rank by 'mean' or 'freq', not {by!r}")
        score = self.mean_diff if by == "mean" else self.freq_diff
        score = score if toward == "a" else -score
        idx = torch.argsort(score, descending=True, stable=True)[:top]
        return [self.row(int(f)) for f in idx if float(score[f]) > 0]

    def to_dict(self, top: int = 50) -> dict[str, Any]:
        return {"labels": list(self.labels), "n_a": self.n_a, "n_b": self.n_b, "d_sae": len(self.mean_a),
                "top_by_mean": self.ranked("mean", top), "top_by_freq": self.ranked("freq", top),
                "top_by_mean_b": self.ranked("mean", top, toward="b"),
                "top_by_freq_b": self.ranked("freq", top, toward="b")}


def diff_features(sae: SAEHandle | Any, acts_a: Tensor | "ActivationSet", acts_b: Tensor | "ActivationSet",
                  top: int = 50, *, layer: LayerId | None = None, position: str = "prompt_last",
                  labels: tuple[str, str] = ("a", "b")) -> FeatureDiff:
    """Encode both sets ([n, d] rows, or ActivationSets at `position`/`layer`, default the SAE's layer) and
    compare features: mean activation and firing frequency per side. `top` sets the default ranking length
    of `FeatureDiff.to_dict`; the full per-feature vectors are kept."""
    L = layer if layer is not None else (sae.layer if isinstance(sae, SAEHandle) else None)
    xa, xb = activation_rows(acts_a, L, position), activation_rows(acts_b, L, position)
    d_in = _unwrap(sae).cfg.d_in
    for lab, x in zip(labels, (xa, xb)):
        if len(x) == 0:
            raise PersonaProbeError(f"activation set {lab!r} is empty")
        if x.shape[-1] != d_in:
            raise PersonaProbeError(f"activations of {lab!r} have width {x.shape[-1]}, the SAE reads {d_in}")
    fa, fb = encode(sae, xa), encode(sae, xb)
    return FeatureDiff(fa.mean(0), fb.mean(0), (fa > 0).float().mean(0), (fb > 0).float().mean(0), len(fa), len(fb),
                       labels)


# ----------------------------------------------------------------------------- decomposition

DEFAULT_KS = (1, 5, 20, 100)


@dataclass
class Decomposition:
    """A direction v [d] against every decoder row: cosines [d_sae], and the share of ||v||^2 that a least-
    squares fit on the top-k rows (by |cosine|) reconstructs."""

    cosines: Tensor
    order: Tensor
    shares: dict[int, float]
    coefficients: dict[int, list[float]]
    direction_norm: float

    def top(self, n: int = 20) -> list[dict[str, Any]]:
        return [{"rank": i + 1, "feature": int(f), "cosine": float(self.cosines[f])}
                for i, f in enumerate(self.order[:n])]

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        return {"direction_norm": self.direction_norm, "shares": {str(k): v for k, v in self.shares.items()},
                "max_abs_cosine": float(self.cosines.abs().max()), "top": self.top(top),
                "coefficients": {str(k): v for k, v in self.coefficients.items() if k <= 20}}


def lstsq_share(rows: Tensor, v: Tensor) -> tuple[float, Tensor]:
    """Fit v [d] ≈ c @ rows ([k, d]) by least squares; share = 1 - ||v - c rows||^2 / ||v||^2, and c [k]."""
    A, b = rows.double().T, v.double()
    c = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]
    r = b - A @ c
    return float(1.0 - r.pow(2).sum() / b.pow(2).sum().clamp_min(1e-300)), c.float()


def decompose(sae: SAEHandle | Any, direction_vec: Tensor, ks: Sequence[int] = DEFAULT_KS) -> Decomposition:
    """Cosine of the direction with every decoder row, and top-k reconstruction shares for k in `ks`."""
    W = _unwrap(sae).W_dec.detach().float().cpu()  # [d_sae, d]
    v = direction_vec.detach().float().flatten().cpu()
    if v.shape[0] != W.shape[1]:
        raise PersonaProbeError(f"direction width {v.shape[0]} does not match the SAE's d_in {W.shape[1]}")
    if float(v.norm()) == 0.0:
        raise PersonaProbeError("the direction is zero: nothing to decompose")
    cos = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (v / v.norm())
    order = torch.argsort(cos.abs(), descending=True, stable=True)
    shares, coefs = {}, {}
    for k in ks:
        kk = min(int(k), W.shape[0])
        shares[int(k)], c = lstsq_share(W[order[:kk]], v)
        coefs[int(k)] = c.tolist()
    return Decomposition(cos, order, shares, coefs, float(v.norm()))


# ----------------------------------------------------------------------------- top-activating contexts


@dataclass
class Example:
    """One context: token strings and this feature's activation per token (window around the maximum)."""

    record_id: str
    tokens: list[str]
    acts: list[float]
    max_act: float
    max_index: int  # index of the maximum within `tokens`

    def text(self) -> str:
        return "".join(self.tokens)


def top_examples(sae: SAEHandle, handle: ModelHandle, records: Sequence[PromptRecord], feature_ids: Sequence[int],
                 n: int = 5, *, before: int = 24, after: int = 8, batch_size: int = 16,
                 progress: bool = False) -> dict[int, list[Example]]:
    """For each feature, the `n` records where it fires most (one example per record, the window of
    `before`/`after` tokens around its maximum). Position 0 is never scored."""
    if sae.layer == "embed":
        raise PersonaProbeError("top_examples needs an SAE on a decoder layer, not the embeddings")
    feats = [int(f) for f in feature_ids]
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if bad:
        raise PersonaProbeError(f"feature ids {bad} out of range: this SAE has features 0..{sae.d_sae - 1}")
    ta = layer_token_activations(handle, records, int(sae.layer), batch_size=batch_size, dedupe=False,
                                 progress=progress)
    fa = encode(sae, ta.acts)[:, feats] if feats else torch.zeros(len(ta), 0)  # [N, F]
    n_rec = len(records)
    counts = torch.bincount(ta.record, minlength=n_rec)
    starts = torch.cumsum(counts, 0) - counts  # rows are sorted by (record, position)
    tok = handle.tokenizer
    out: dict[int, list[Example]] = {}
    for j, f in enumerate(feats):
        a = fa[:, j]
        best = torch.zeros(n_rec).scatter_reduce(0, ta.record, a, "amax", include_self=True)
        exs = []
        for r in torch.argsort(best, descending=True, stable=True)[:n].tolist():
            if best[r] <= 0:
                break
            s0, s1 = int(starts[r]), int(starts[r] + counts[r])
            i_max = s0 + int(torch.argmax(a[s0:s1]))
            lo, hi = max(s0, i_max - before), min(s1, i_max + after + 1)
            exs.append(Example(records[r].id, [tok.decode([t]) for t in ta.token_id[lo:hi].tolist()],
                               [float(x) for x in a[lo:hi]], float(a[i_max]), i_max - lo))
        out[f] = exs
    return out


# ----------------------------------------------------------------------------- steering with a feature


def feature_vector(sae: SAEHandle | Any, feature: int) -> Tensor:
    """Decoder row [d] of one feature (the direction it writes into the residual stream)."""
    W = _unwrap(sae).W_dec
    if not 0 <= int(feature) < W.shape[0]:
        raise PersonaProbeError(f"feature {feature} out of range: this SAE has features 0..{W.shape[0] - 1}")
    return W[int(feature)].detach().float().cpu()


def feature_interventions(sae: SAEHandle, feature: int, alpha: float, *, unit: str = "resid",
                          handle: ModelHandle | None = None, where: str = "all",
                          layer: LayerId | None = None) -> list["Intervention"]:
    """Activation addition of one feature's decoder vector at the SAE's layer, in persona_probe.interventions.steering's α
    units (resid: α × typical residual norm; raw: α × the decoder row itself)."""
    from persona_probe.interventions.steering import add_interventions

    L = sae.layer if layer is None else layer
    vec = {L: feature_vector(sae, feature)}
    return add_interventions(vec, alpha, unit=unit, handle=handle, where=where)  # type: ignore[arg-type]


def feature_direction(sae: SAEHandle, feature: int, handle: ModelHandle) -> "DirectionSet":
    """One feature's decoder row as a single-layer DirectionSet (so experiments.steer runs it unchanged)."""
    from persona_probe.directions.derive import DirectionSet, random_like

    v = feature_vector(sae, feature)[None]
    manifest = base_manifest("direction", name=f"sae-feature:{feature}", method="sae_feature",
                             layers=[str(sae.layer)], best_layer=sae.layer, model=handle.info.to_dict(),
                             sae=sae.describe(), feature=int(feature), sign="positive = feature on")
    return DirectionSet(v, [sae.layer], manifest, random_like(v, 1))


def compare_feature_steering(handle: ModelHandle, sae: SAEHandle, direction: "DirectionSet",
                             features: Sequence[int], *, alphas: Sequence[float] = (0.0, 0.5, 1.0),
                             questions: str = "builtin:core", n_samples: int = 2, judge: str | None = "offline",
                             max_new_tokens: int = 48, unit: str = "resid", seed: int = 0, batch_size: int = 32,
                             progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Steer at the SAE's layer with the full character direction (plus its random control) and with each
    feature's decoder vector, same α grid and units, same seeds. Every cell reports the responses'
    projection on the *character direction* (read by the unsteered model), KL on neutral text and, with a
    judge, the EM rate. Thin over experiments.steer.steering_sweep / response_projection."""
    from persona_probe.experiments.steer import response_projection, steering_sweep

    if sae.layer == "embed" or sae.layer not in direction.layers:
        raise PersonaProbeError(f"the direction has no vector at the SAE's layer {sae.layer}")
    kw = dict(layers=[int(sae.layer)], questions=questions, n_samples=n_samples, unit=unit, judge=judge,
              max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=progress)
    base = steering_sweep(handle, direction, alphas=list(alphas), include_random=True, force=force, **kw)
    cells = [{**c, "source": c["condition"]} for c in base["cells"]]
    nonzero = [a for a in alphas if a != 0] or [1.0]
    for f in features:
        res = steering_sweep(handle, feature_direction(sae, f, handle), alphas=nonzero, include_random=False,
                             force=True, **kw)
        proj = response_projection(handle, direction, res["rows"])
        for c in res["cells"]:
            ps = [p for r, p in zip(res["rows"], proj) if r["alpha"] == c["alpha"]]
            c.update(condition=f"feature {f}", source="feature", feature=int(f),
                     mean_projection=sum(ps) / max(len(ps), 1))
            cells.append(c)
    dec = decompose(sae, direction.at(sae.layer))
    return {"cells": cells, "layer": sae.layer, "unit": unit, "judge": base["judge"],
            "feature_cosines": {int(f): float(dec.cosines[int(f)]) for f in features},
            "note": "mean_projection = responses projected on the character direction at its best layer"}


# ----------------------------------------------------------------------------- figures and HTML


def feature_bar_figure(rows: Sequence[dict[str, Any]], value: str = "mean_diff", title: str = "top features",
                       labels: tuple[str, str] = ("a", "b")) -> "go.Figure":
    """Bar chart of ranked feature rows (from FeatureDiff.ranked): `value` per feature, hover with both sides."""
    import plotly.graph_objects as go

    xs = [f"#{r['feature']}" for r in rows]
    hover = [f"feature {r['feature']}<br>mean {labels[0]} {r['mean_a']:.3f} / {labels[1]} {r['mean_b']:.3f}"
             f"<br>freq {labels[0]} {r['freq_a']:.3f} / {labels[1]} {r['freq_b']:.3f}" for r in rows]
    fig = go.Figure(go.Bar(x=xs, y=[r[value] for r in rows], hovertext=hover, hoverinfo="text"))
    fig.update_layout(title=title, xaxis_title="SAE feature", yaxis_title=value, height=420,
                      xaxis={"type": "category"})
    return fig


def decomposition_figure(dec: Decomposition, top: int = 20, title: str = "direction vs SAE decoder") -> "go.Figure":
    """Cosines of the top features (by |cos|) and the reconstruction share vs k."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = dec.top(top)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"cosine, top {top} features by |cos|",
                                                        "share of ||v||² reconstructed by top-k rows"))
    fig.add_trace(go.Bar(x=[f"#{r['feature']}" for r in rows], y=[r["cosine"] for r in rows], name="cosine"), 1, 1)
    ks = sorted(dec.shares)
    fig.add_trace(go.Scatter(x=ks, y=[dec.shares[k] for k in ks], mode="lines+markers", name="share"), 1, 2)
    fig.update_xaxes(type="category", row=1, col=1)
    fig.update_xaxes(type="log", title_text="k", row=1, col=2)
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    fig.update_layout(title=title, height=420)
    return fig


def _highlight(ex: Example, scale: float) -> str:
    spans = []
    for t, a in zip(ex.tokens, ex.acts):
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, a / scale))
        txt = html.escape(t).replace("\n", "↵<br>")
        spans.append(f"<span title='{a:.3f}' style='background:rgba(255,110,0,{alpha:.3f})'>{txt}</span>")
    return "".join(spans)


def top_examples_html(examples: dict[int, list[Example]], title: str = "SAE feature top examples",
                      notes: dict[int, str] | None = None, figure: "go.Figure | None" = None) -> str:
    """Self-contained page: per feature, its top contexts with background colour ∝ activation (max = the
    feature's strongest activation among the shown examples; hover a token for its value)."""
    from persona_probe.report.figures import fig_div, html_page

    sections: list[tuple[str, str]] = []
    if figure is not None:
        sections.append(("overview", fig_div(figure)))
    for f, exs in examples.items():
        scale = max((e.max_act for e in exs), default=0.0)
        body = [f"<p>{html.escape(notes[f])}</p>"] if notes and f in notes else []
        if not exs:
            body.append("<p>never fires on these prompts</p>")
        body += [f"<div style='margin:6px 0;padding:4px;border-left:3px solid #f60;font-family:monospace;"
                 f"font-size:13px'><b>{e.max_act:.2f}</b> <i>{html.escape(e.record_id)}</i><br>"
                 f"{_highlight(e, scale)}</div>" for e in exs]
        sections.append((f"feature {f}", "\n".join(body)))
    return html_page(title, sections)


def write_top_examples(examples: dict[int, list[Example]], out: str | Path, **kw: Any) -> Path:
    """top_examples.html + top_examples.json under folder `out`."""
    o = Path(out)
    atomic_write_json(o / "top_examples.json", {str(f): [asdict(e) for e in exs] for f, exs in examples.items()})
    return atomic_write_text(o / "top_examples.html", top_examples_html(examples, **kw))


__all__ = [
    "DEFAULT_KS", "Decomposition", "Example", "FeatureDiff", "SAEHandle", "SAETrainConfig", "TokenActs",
    "activation_rows", "add_generated_responses", "check_sae_fits", "compare_feature_steering", "decompose",
    "decomposition_figure", "default_sae_dir", "diff_features", "encode", "feature_bar_figure", "feature_direction",
    "feature_interventions", "feature_vector", "fit_sae", "hook_name_for_layer", "layer_of_hook",
    "layer_token_activations", "load_sae", "lstsq_share", "model_names", "reconstruction_metrics", "splice_kl",
    "split_records", "top_examples", "top_examples_html", "train_sae", "training_records", "write_top_examples",
]


# ----------------------------------------------------------------------------- pipeline stage


def find_trained_sae(handle: ModelHandle, layers: Sequence[LayerId], root: str | Path | None = None
                     ) -> Path | None:
    """An SAE under checkpoints/saes/ trained on this exact model (fingerprint) at one of `layers`
    (earlier entries preferred)."""
    from persona_probe.core.paths import checkpoints_dir

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


def run_sae_stage(cfg: dict[str, Any], handle: ModelHandle, direction: "DirectionSet", root: Path, k_dir: str,
                  log: Any) -> dict[str, Any] | None:
    """Pipeline hook: decompose the character direction on an SAE and diff persona vs neutral features.

    `cfg["sae"]`: enabled (true | false | "auto": use an SAE when one is available), path (local folder) or
    release + sae_id (sae-lens pretrained), n_questions, top. With "auto" and no SAE given, an SAE
    trained on this model by `persona-probe sae train` is used when one exists at the direction's layers."""
    from persona_probe.pipeline.run import Stage, _key
    from persona_probe.prompts.records import contrast_questions, persona_records
    from persona_probe.report.figures import fig_div

    sc = cfg.get("sae") or {}
    enabled = sc.get("enabled", "auto")
    if enabled is False:
        return None
    src, sae_id = sc.get("path") or sc.get("release"), sc.get("sae_id")
    if src is None:
        order = [direction.best_layer] + [L for L in direction.layers if L != direction.best_layer]
        found = find_trained_sae(handle, order)
        if found is None:
            if enabled is True:
                raise PersonaProbeError("sae.enabled is true but no SAE is given (sae.path or sae.release + "
                                        f"sae_id) and none is trained for this model: run `persona-probe sae train "
                                        f"--layer {direction.best_layer}` first")
            log("[sae] no SAE for this model: skipped (train one with `persona-probe sae train`)")
            return None
        src = str(found)
    sae = load_sae(src, sae_id, handle=handle)
    if sae.layer not in direction.layers:
        raise PersonaProbeError(f"the SAE reads layer {sae.layer}, which the direction does not cover")
    n_q, top = sc.get("n_questions", 20), int(sc.get("top", 20))
    key = _key(k_dir, src, sae_id, n_q, top, (sae.manifest or {}).get("created"))
    st = Stage(root, "sae", key, log)

    def build(folder: Path) -> None:
        dec = decompose(sae, direction.at(sae.layer))
        qs = list(contrast_questions())[:n_q] if n_q else list(contrast_questions())
        trait = direction.manifest.get("trait") or direction.manifest.get("name") or "malicious"
        pos = persona_records(str(trait), "positive", qs)
        neg = persona_records(str(trait), "negative", qs)
        fd = diff_features(sae, pooled_layer_rows(handle, pos, int(sae.layer), "prompt_mean"),
                           pooled_layer_rows(handle, neg, int(sae.layer), "prompt_mean"), top=top,
                           labels=(str(trait), "neutral"))
        diff = fd.to_dict(top)
        feats = [r["feature"] for r in diff["top_by_mean"][:5]]
        exs = top_examples(sae, handle, pos + neg, feats, n=3)
        write_top_examples(exs, folder, title=f"SAE features: {trait} vs neutral")
        atomic_write_json(folder / "sae.json", {
            "sae": sae.describe(), "decomposition": dec.to_dict(top), "diff": diff,
            "examples": {str(f): [{"record_id": e.record_id, "max_act": e.max_act, "text": e.text()} for e in v]
                         for f, v in exs.items()}})

    st.run(build)
    res = json.loads((st.folder / "sae.json").read_text())
    from persona_probe.report.figures import go

    shares = res["decomposition"]["shares"]
    dec_fig = go.Figure(go.Bar(x=[f"top-{k}" for k in shares], y=list(shares.values())))
    dec_fig.update_layout(title="share of the direction reconstructed by its top-k decoder rows",
                          yaxis_title="share (least squares, R²)", height=320)
    rows = res["diff"]["top_by_mean"][:top]
    html_ = (f"<p>SAE {html.escape(str(res['sae'].get('source')))} at layer {sae.layer} "
             f"(d_sae {sae.d_sae}). Top-k reconstruction shares: {html.escape(json.dumps(shares))}. "
             f"Top-activating contexts: <code>{html.escape(str(st.folder / 'top_examples.html'))}</code>.</p>"
             + fig_div(dec_fig) + fig_div(feature_bar_figure(rows, "mean_diff", "features more active under the "
                                                            "character prompts", ("character", "neutral"))))
    return {"summary": {k: v for k, v in res.items() if k != "examples"}, "html": html_}
