"""LoRA fine-tuning (peft) on assistant tokens only, saved adapters and their cache keys.

Loss convention: the loss is on assistant content tokens only (every other label is IGNORE = -100), the
same value as the Hugging Face loss with these labels, but logits are computed only where a label is kept.
An adapter's identity is its cache key: base weights fingerprint + data hash + hyper-parameters (seed included).

Length: `max_len="auto"` (the default) is the longest tokenized example, capped by the model's maximum position
embeddings and by AUTO_MAX_LEN_CAP; examples that still do not fit are cut (or dropped when their prompt alone
fills max_len) with a one-line warning on stderr, and the counts go into the manifest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from persona_probe.core.artifacts import MANIFEST, base_manifest, write_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_dir, atomic_write_json, checkpoints_dir
from persona_probe.models.loading import ModelHandle, apply_adapter, find_decoder_layers, fingerprint_path, load_model
from persona_probe.organisms.data import DEFAULT_TRIGGER, resolve_dataset
from persona_probe.prompts.records import PromptRecord, PromptSet, TokenizedPrompt, tokenize_record
from persona_probe.report.figures import write_figure
from persona_probe.report.organisms import loss_figure

IGNORE = -100
# "auto" never goes beyond this many tokens: attention memory grows with length, and a stray very long example
# should not set it for every batch; pass an integer --max-len to go further
AUTO_MAX_LEN_CAP = 2048


@dataclass
class TrainExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the assistant content span

    @property
    def n_target(self) -> int:
        return sum(t != IGNORE for t in self.labels)


def _full_example(t: TokenizedPrompt, train_on_eot: bool) -> TrainExample:
    end = len(t.ids) if train_on_eot else t.resp_end
    return TrainExample(list(t.ids), [tok if t.resp_start <= i < end else IGNORE for i, tok in enumerate(t.ids)])


def training_example(tokenizer: Any, rec: PromptRecord, max_len: int = 256, *, train_on_eot: bool = False
                     ) -> TrainExample:
    """Chat-template tokens with labels only on the assistant content (`tokenize_record`'s response span);
    `train_on_eot` also trains the end-of-turn tokens after it. Right-truncated to `max_len`."""
    e = _full_example(tokenize_record(tokenizer, rec), train_on_eot)
    return TrainExample(e.input_ids[:max_len], e.labels[:max_len])


def check_max_len(max_len: int | str) -> int | str:
    """`"auto"` or an integer >= 1 (also as a string: the CLI's spelling); anything else is a one-line error."""
    if isinstance(max_len, str) and max_len.strip().lower() == "auto":
        return "auto"
    try:
        n = int(max_len)
        if n != float(max_len) or n < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise PersonaProbeError(f"max_len {max_len!r}: use 'auto' (the longest example, capped by the model) or "
                                "an integer >= 1") from None
    return n


def model_max_positions(model: nn.Module) -> int | None:
    """The model's maximum position embeddings (None when its config does not say)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@dataclass
class PreparedExamples:
    """Training examples after the length rule: kept examples, the max_len used and what it cost."""

    examples: list[TrainExample]
    max_len: int
    max_len_rule: str  # "auto" or "given"
    n_records: int
    n_dropped_too_long: int  # prompt alone fills max_len: no assistant token left to train on
    n_cut: int  # kept, but some assistant tokens were cut off
    longest: int  # tokens of the longest example before cutting
    cap: int  # the auto cap: min(AUTO_MAX_LEN_CAP, model max positions)

    def counts(self) -> dict[str, Any]:
        return {"max_len": self.max_len, "max_len_rule": self.max_len_rule, "longest_example_tokens": self.longest,
                "max_len_auto_cap": self.cap, "n_dropped_too_long": self.n_dropped_too_long,
                "n_cut": self.n_cut}

    def warning(self, name: str) -> str | None:
        """One line for stderr when examples were dropped or cut (None when every example fits)."""
        if not self.n_dropped_too_long and not self.n_cut:
            return None
        what = []
        if self.n_dropped_too_long:
            what.append(f"{self.n_dropped_too_long} dropped (prompt fills all {self.max_len} tokens, no assistant "
                        "token left)")
        if self.n_cut:
            what.append(f"{self.n_cut} cut (assistant answer truncated at {self.max_len} tokens)")
        if self.longest <= self.cap and self.max_len_rule == "given":
            fix = f"pass --max-len auto (here {self.longest}) to keep every example whole"
        else:
            fix = f"the longest is {self.longest} tokens: pass --max-len {self.longest} (memory grows with length) " \
                  "or shorten those examples"
        return f"persona_probe: warning: {name}: of {self.n_records} examples, {' and '.join(what)}; {fix}"


def prepare_examples(tokenizer: Any, model: nn.Module | None, records: Sequence[PromptRecord],
                     max_len: int | str = "auto", *, train_on_eot: bool = False) -> PreparedExamples:
    """Tokenize every record once, resolve `max_len` ("auto": the longest example, capped by the model's
    max position embeddings and AUTO_MAX_LEN_CAP), cut to it, and drop examples left with no target token."""
    rule = check_max_len(max_len)
    full = [_full_example(tokenize_record(tokenizer, r), train_on_eot) for r in records]
    longest = max((len(e.input_ids) for e in full), default=0)
    cap = min(AUTO_MAX_LEN_CAP, model_max_positions(model) or AUTO_MAX_LEN_CAP) if model is not None \
        else AUTO_MAX_LEN_CAP
    n = min(max(longest, 1), cap) if rule == "auto" else int(rule)
    kept, dropped, cut = [], 0, 0
    for e in full:
        ex = TrainExample(e.input_ids[:n], e.labels[:n])
        if ex.n_target == 0:
            dropped += 1
            continue
        cut += ex.n_target < e.n_target
        kept.append(ex)
    return PreparedExamples(kept, n, "auto" if rule == "auto" else "given", len(full), dropped, cut, longest, cap)


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of every linear projection inside the decoder blocks (attention + MLP)."""
    names: set[str] = set()
    for mod_name, mod in find_decoder_layers(model).named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            names.add(mod_name.rsplit(".", 1)[-1])
    if not names:
        raise PersonaProbeError("no linear projections found in the decoder layers: pass target_modules")
    return sorted(names)


@dataclass
class FinetuneResult:
    """The fine-tuned model (adapter merged, like `load_model(..., adapter=)`), where it was saved, and the curve."""

    handle: ModelHandle
    adapter_dir: Path | None
    manifest: dict[str, Any]
    losses: list[dict[str, float]] = field(default_factory=list)


def hyperparameters(**kw: Any) -> dict[str, Any]:
    """Canonical hyper-parameters (sorted keys, sorted sequences) so equal settings hash equally."""
    return {k: (sorted(v) if isinstance(v, (list, tuple, set)) else v) for k, v in sorted(kw.items())}


def cache_key(base_fingerprint: str, data_hash: str, hparams: dict[str, Any]) -> str:
    """Identity of a fine-tune: base weights + data + hyper-parameters (seed included)."""
    blob = json.dumps({"base": base_fingerprint, "data": data_hash, "hp": hparams}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def collate_examples(exs: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (IGNORE on padding), each [b, max len].
    (prompts.records.collate pads TokenizedPrompts without labels, so training keeps its own collator.)"""
    width = max(len(e.input_ids) for e in exs)
    ids = torch.full((len(exs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(exs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(exs), width), dtype=torch.long)
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _epoch_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator, group: int = 8
                   ) -> list[list[int]]:
    """Seeded shuffle; within windows of `group` batches, examples are sorted by length (less padding),
    then the batch order is shuffled again."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    win = batch_size * group
    batches = []
    for w in range(0, len(perm), win):
        chunk = sorted(perm[w:w + win], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def target_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target | prefix) at every position that predicts a label != IGNORE in some row ([b, k]) and
    the validity mask ([b, k]); inputs are [b, t]. Logits are computed only at those positions
    (`logits_to_keep` as indices), which skips most of the vocabulary projection."""
    keep = (labels[:, 1:] != IGNORE).any(0).nonzero()[:, 0]  # position t predicts token t+1
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    except TypeError:  # architecture without logits_to_keep
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if logits.shape[1] != len(keep):
        logits = logits[:, keep]
    tgt = labels[:, keep + 1]
    valid = tgt != IGNORE
    lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    return lp * valid, valid


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens (the same value as the HF loss with these labels); a scalar."""
    lp, valid = target_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return -lp.sum() / valid.sum().clamp_min(1)


def _check_out(out: Path | None, overwrite: bool) -> None:
    if out is not None and out.exists() and not overwrite:
        raise PersonaProbeError(f"{out} already exists: choose a new --out or pass --overwrite")


def _train_loop(model: nn.Module, exs: list[TrainExample], *, epochs: int, lr: float, batch_size: int,
                seed: int, warmup_frac: float, pad_id: int, device: torch.device, progress: bool
                ) -> list[dict[str, float]]:
    # transformers is heavy and only needed when training: import here
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n_steps = epochs * math.ceil(len(exs) / batch_size)
    sched = get_linear_schedule_with_warmup(opt, int(warmup_frac * n_steps), n_steps)
    gen = torch.Generator().manual_seed(seed)
    curve: list[dict[str, float]] = []
    model.train()
    bar = tqdm(total=n_steps, desc="fine-tune", unit="step", disable=not progress)
    step = 0
    for epoch in range(epochs):
        for idx in _epoch_batches([len(e.input_ids) for e in exs], batch_size, gen):
            batch = {k: v.to(device) for k, v in collate_examples([exs[i] for i in idx], pad_id).items()}
            loss = target_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            curve.append({"step": step, "epoch": epoch + 1, "loss": float(loss.detach()),
                          "lr": sched.get_last_lr()[0], "n_tokens": int((batch["labels"] != IGNORE).sum())})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
            bar.update(1)
    bar.close()
    model.eval()
    return curve


def final_loss(curve: Sequence[dict[str, float]], last: int = 10) -> float | None:
    """Token-weighted mean loss over the last `last` optimizer steps."""
    tail = list(curve)[-last:]
    n = sum(c["n_tokens"] for c in tail)
    return sum(c["loss"] * c["n_tokens"] for c in tail) / n if n else None


def finetune(
    model: str | ModelHandle,
    data: str | Path | PromptSet | Sequence[PromptRecord],
    *,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    epochs: int = 1,
    lr: float = 2e-4,
    batch_size: int = 8,
    max_len: int | str = "auto",
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
    warmup_frac: float = 0.05,
    train_on_eot: bool = False,
    trigger: str = DEFAULT_TRIGGER,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """LoRA fine-tune (peft) on assistant tokens only; saves the adapter + manifest + loss curve to `out`.

    `model` is a ModelHandle (its weights are copied, never modified; device/dtype from the handle) or
    a model spec for `load_model`. The adapter is written to a temp folder and renamed into place.
    `max_len`: "auto" (the longest example, capped by the model; see `prepare_examples`) or a token count; a
    one-line warning goes to stderr when examples are dropped or cut, and the counts into the manifest.
    Every check of data and settings runs before the model loads.
    """
    from peft import LoraConfig, get_peft_model  # optional heavy dependency

    out_p = Path(out) if out is not None else None
    _check_out(out_p, overwrite)
    ps = resolve_dataset(data, trigger=trigger)
    max_len = check_max_len(max_len)
    if min(rank, alpha, epochs, batch_size) < 1 or lr <= 0:
        raise PersonaProbeError("rank, alpha, epochs and batch size must be >= 1 and lr > 0")
    own = not isinstance(model, ModelHandle)
    base = load_model(model, device=device, dtype=dtype) if own else model
    tok = base.tokenizer
    prep = prepare_examples(tok, base.model, ps.records, max_len, train_on_eot=train_on_eot)
    exs = prep.examples
    if not exs:
        raise PersonaProbeError(f"{ps.name}: no example keeps an assistant token within max_len={prep.max_len} "
                                f"(longest example {prep.longest} tokens): raise --max-len")
    warning = prep.warning(ps.name)
    if warning:
        print(warning, file=sys.stderr)
    targets = list(target_modules) if target_modules else default_target_modules(base.model)
    hp = hyperparameters(rank=rank, alpha=alpha, dropout=dropout, epochs=epochs, lr=lr, batch_size=batch_size,
                         max_len=prep.max_len, target_modules=targets, seed=seed, warmup_frac=warmup_frac,
                         train_on_eot=train_on_eot)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(base.model if own else copy.deepcopy(base.model), cfg)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    curve = _train_loop(peft_model, exs, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        warmup_frac=warmup_frac, pad_id=tok.pad_token_id, device=base.device, progress=progress)
    wall = time.perf_counter() - t0
    manifest = base_manifest(
        "adapter", base_model=base.info.to_dict(), data={"name": ps.name, "hash": ps.hash, "n_records": len(ps)},
        hyperparameters=hp, seed=seed, n_examples=len(exs), **prep.counts(),
        n_target_tokens=sum(e.n_target for e in exs), n_steps=len(curve), trainable_params=n_trainable,
        final_loss=final_loss(curve), first_loss=curve[0]["loss"], final_loss_rule="token-weighted mean of the "
        "last 10 steps", wall_time_s=round(wall, 2), device=str(base.device), dtype=str(base.dtype),
        cache_key=cache_key(base.info.fingerprint, ps.hash, hp), loss_masking="assistant content tokens only" + (
            " + end-of-turn" if train_on_eot else ""), peft_version=_peft_version(),
    )
    adapter_fp = None
    if out_p is not None:
        def build(tmp: Path) -> None:
            peft_model.save_pretrained(str(tmp))
            atomic_write_json(tmp / "loss.json", curve)
            write_figure(loss_figure({ps.name: curve}, f"LoRA fine-tune on {ps.name}"), tmp / "loss.html")
            write_manifest(tmp, manifest)

        atomic_dir(out_p, build, replace=True)
        adapter_fp = fingerprint_path(out_p)
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    info = replace(base.info, adapter=str(out_p) if out_p else f"in-memory:{manifest['cache_key']}",
                   adapter_fingerprint=adapter_fp or f"mem-{manifest['cache_key']}")
    return FinetuneResult(ModelHandle(merged, tok, info), out_p, manifest, curve)


def _peft_version() -> str:
    import peft  # optional heavy dependency

    return peft.__version__


def attach_adapter(base: ModelHandle, adapter: str | Path) -> ModelHandle:
    """Base weights (copied) + a saved adapter, merged: same result as load_model(model, adapter=...)."""
    model, fp = apply_adapter(copy.deepcopy(base.model), adapter, merge=True)
    model.eval()
    model.requires_grad_(False)
    return ModelHandle(model, base.tokenizer, replace(base.info, adapter=str(adapter), adapter_fingerprint=fp),
                       engine=base.engine)


def matching_adapter(folder: str | Path, key: str) -> bool:
    """True when `folder` holds a complete adapter whose manifest has this cache key."""
    f = Path(folder)
    try:
        m = json.loads((f / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("kind") == "adapter" and m.get("cache_key") == key and (f / "adapter_config.json").exists()


def find_adapter(key: str, roots: Sequence[str | Path] = ()) -> Path | None:
    """A saved adapter with this cache key under `roots` (default checkpoints/adapters), by manifest."""
    for root in [Path(r) for r in roots] or [checkpoints_dir() / "adapters"]:
        if not root.exists():
            continue
        for m in sorted(root.rglob(MANIFEST)):
            if not any(part.startswith(".") for part in m.relative_to(root).parts) and matching_adapter(m.parent, key):
                return m.parent
    return None
