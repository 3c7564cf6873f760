"""Train a TopK SAE with sae-lens's own `SAETrainer`, fed from residuals we extract ourselves.

Data: every token position except 0 (the attention sink) of the local corpus (`sae.corpus`), deduplicated by
prefix, at one layer; a record-level held-out split measures the *saved* SAE in the original residual space.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from persona_probe.activations.tokens import layer_token_activations
from persona_probe.backends import Intervention
from persona_probe.core.artifacts import base_manifest, load_tensors, save_tensors, write_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_dir, atomic_write_json
from persona_probe.core.splits import seeded_split
from persona_probe.interventions.guard import kl_guard, neutral_texts
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import PromptRecord, PromptSet, tokenize_record
from persona_probe.sae.corpus import add_generated_responses, training_records
from persona_probe.sae.handle import SAEHandle, default_sae_dir, hook_name_for_layer, load_sae, reconstruction_metrics


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class SAETrainConfig:
    """TopK SAE training on CPU-sized local data (defaults sized for the embedded 135M model, 2 cores).

    Every field's `metadata["help"]` is the help of its `persona-probe sae train` flag."""

    layer: int = field(default=15, metadata=_help("Layer whose residual stream (output of block L) the SAE reads."))
    d_sae: int = field(default=2048, metadata=_help("Number of SAE features (dictionary width)."))
    k: int = field(default=32, metadata=_help("Active features per token (TopK)."))
    train_tokens: int = field(default=400_000, metadata=_help(
        "Token rows the trainer sees (epochs x unique tokens)."))
    batch_size: int = field(default=1024, metadata=_help("Token rows per training step."))
    lr: float = field(default=1e-3, metadata=_help("Peak learning rate (cosine-annealed to a tenth of it)."))
    lr_warm_up_steps: int = field(default=20, metadata=_help(
        "Linear warm-up steps (at most a quarter of all steps)."))
    dead_window_tokens: int = field(default=50_000, metadata=_help(
        "Tokens a feature may stay silent before sae-lens counts it dead."))
    holdout_frac: float = field(default=0.1, metadata=_help(
        "Share of records held out to measure the saved SAE on unseen text."))
    generate_n: int = field(default=300, metadata=_help(
        "Prompts the model answers itself, to add response text to the corpus (0 = none)."))
    max_new_tokens: int = field(default=64, metadata=_help("Length cap of each generated answer in tokens."))
    questions_per_system: int = field(default=6, metadata=_help(
        "Built-in questions asked under each trait system prompt."))
    kl_texts: int = field(default=16, metadata=_help(
        "Neutral texts for the KL check with the reconstruction spliced in (0 = skip)."))
    extract_batch_size: int = field(default=16, metadata=_help("Records per forward pass when extracting residuals."))
    seed: int = field(default=0, metadata=_help("Seed of the corpus choice, split, generation and training."))

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
    train, test = seeded_split(range(n_records), holdout_frac, seed)
    return set(train), set(test)


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


def _splice_intervention(sh: SAEHandle) -> Intervention:
    """Replace the residual at the SAE's layer by its reconstruction (position 0, unseen in training, kept)."""
    m = sh.sae

    def fn(h: Tensor) -> Tensor:
        out = m.decode(m.encode(h.float())).to(h.dtype)
        out[:, :1] = h[:, :1]
        return out

    return Intervention(sh.layer, fn)


def splice_kl(handle: ModelHandle, sh: SAEHandle, n_texts: int = 16) -> dict[str, float]:
    """KL(model || model with the SAE reconstruction spliced in) on built-in neutral text, and the
    perplexity ratio (interventions.guard.kl_guard, the steering sweeps' own guard)."""
    out = kl_guard(handle, [_splice_intervention(sh)], neutral_texts(n_texts))
    return {"kl_spliced_neutral": out["kl_neutral"], "ppl_ratio_spliced_neutral": out.get("ppl_ratio_neutral")}


def _token_cache_file(cache_dir: str | Path, handle: ModelHandle, cfg: SAETrainConfig, ps_hash: str) -> Path:
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


def _sae_lens_version() -> str:
    import sae_lens

    return str(sae_lens.__version__)


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
    if folder.exists() and any(folder.iterdir()) and not overwrite:
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
        t = load_tensors(cache)
        x_train, x_test = t["train"], t["heldout"]
        say(f"token residuals from cache {cache}")
    else:
        x_train, x_test = _split_token_acts(handle, recs, cfg, progress)
        if cache is not None:
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


__all__ = ["SAETrainConfig", "fit_sae", "splice_kl", "split_records", "train_sae"]
