"""Capability checks of a (fine-tuned) model: perplexity on neutral text and multiple-choice accuracy,
with bootstrap / Wilson intervals, and paired base-vs-fine-tuned deltas.

Texts (not tokens) and items are the bootstrap resampling units: tokens within one text are correlated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_probe.core.artifacts import base_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import iter_jsonl, raise_errors
from persona_probe.core.paths import atomic_write_json
from persona_probe.core.stats import bootstrap_idx, percentile_ci, wilson
from persona_probe.models.loading import ModelHandle
from persona_probe.organisms.training import IGNORE, TrainExample, collate_examples, target_logprobs
from persona_probe.prompts.records import PromptRecord, data_path, tokenize_record


def load_neutral_texts(path: str | Path | None = None, n: int | None = None) -> list[str]:
    """Held-out neutral paragraphs ({"id", "text"} JSONL; default the built-in set)."""
    p = Path(path) if path is not None else data_path("capability", "neutral_text.jsonl")
    rows = _read_rows(p, lambda d: isinstance(d.get("text"), str) and d["text"].strip() != "", "a non-empty 'text'")
    return [r["text"] for r in rows][:n]


def load_mc_items(path: str | Path | None = None, n: int | None = None) -> list[dict[str, Any]]:
    """Multiple-choice items ({"id", "question", "choices", "answer": index}); default the built-in set."""
    p = Path(path) if path is not None else data_path("capability", "multiple_choice.jsonl")

    def ok(d: dict[str, Any]) -> bool:
        ch = d.get("choices")
        return (isinstance(d.get("question"), str) and isinstance(ch, list) and len(ch) >= 2
                and all(isinstance(c, str) and c.strip() for c in ch) and isinstance(d.get("answer"), int)
                and 0 <= d["answer"] < len(ch))

    return _read_rows(p, ok, "'question', a list of >= 2 string 'choices' and an in-range integer 'answer'")[:n]


def _read_rows(p: Path, ok: Callable[[dict[str, Any]], bool], need: str) -> list[dict[str, Any]]:
    """The objects of a capability JSONL file that pass `ok`; every other line is reported at once."""
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for i, d in iter_jsonl(p, errors=errors, what="capability data"):
        if not isinstance(d, dict) or not ok(d):
            errors.append(f"{p}:{i}: needs {need}")
            continue
        rows.append(d)
    raise_errors(errors, f"file {p}")
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
        batch = {k: v.to(handle.device) for k, v in collate_examples([exs[i] for i in idx],
                                                                     handle.tokenizer.pad_token_id).items()}
        lp, valid = target_logprobs(handle.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        for r, i in enumerate(idx):
            out[i] = (float(lp[r].sum()), int(valid[r].sum()))
    return out


# Percentile bootstrap over resampling units (core.stats has no bootstrap helper yet); one index matrix
# [n_boot, n] so paired comparisons resample the same units for both models.
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
    b = bootstrap_idx(len(texts), n_boot, seed)
    boot = nll[b].sum(1) / np.maximum(cnt[b].sum(1), 1)
    mean = float(nll.sum() / cnt.sum())
    lo, hi = percentile_ci(boot)
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
    b = bootstrap_idx(len(nb), n_boot, seed)
    d_nll = nf[b].sum(1) / cf[b].sum(1) - nb[b].sum(1) / cb[b].sum(1)
    d_ppl = np.exp(nf[b].sum(1) / cf[b].sum(1)) - np.exp(nb[b].sum(1) / cb[b].sum(1))
    xb = np.array([p["correct"] for p in base["multiple_choice"]["per_item"]], float)
    xf = np.array([p["correct"] for p in ft["multiple_choice"]["per_item"]], float)
    bm = bootstrap_idx(len(xb), n_boot, seed + 1)
    d_acc = xf[bm].mean(1) - xb[bm].mean(1)
    return {"nll_delta": pf["nll"] - pb["nll"], "nll_delta_ci95": percentile_ci(d_nll),
            "ppl_delta": pf["ppl"] - pb["ppl"], "ppl_delta_ci95": percentile_ci(d_ppl), "ppl_ratio": pf["ppl"] / pb["ppl"],
            "mc_accuracy_delta": float(xf.mean() - xb.mean()), "mc_accuracy_delta_ci95": percentile_ci(d_acc),
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
