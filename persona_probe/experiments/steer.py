"""Steering sweeps: α × layer grid along a direction, with a random control, a neutral-text KL guard,
response projections and (optionally) judged EM rates per cell."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from persona_probe.core.artifacts import base_manifest
from persona_probe.backends import Intervention, get_backend
from persona_probe.directions.derive import DirectionSet, check_direction_fits, project
from persona_probe.evaluation.evaluate import Thresholds, add_corrected, judge_rows, make_judge, question_prompt_records, summarize
from persona_probe.activations.extraction import extract
from persona_probe.models.loading import ModelHandle
from persona_probe.core.paths import atomic_write_json, atomic_write_text
from persona_probe.prompts.records import PromptRecord, PromptSet, data_path, length_sorted_batches, tokenize_record
from persona_probe.prompts.questions import as_questions
from persona_probe.backends.sampling import generate
from persona_probe.interventions.steering import NEUTRAL_REFERENCE, ablation_interventions, add_interventions, parse_alphas


def neutral_texts(n: int = 16) -> list[PromptRecord]:
    """Neutral reference text for the KL guard (built-in encyclopedic paragraphs when present)."""
    p = data_path("capability", "neutral_text.jsonl")
    if p.exists():
        rows = [json.loads(l) for l in p.read_text(encoding="utf-8").splitlines() if l.strip()][:n]
        return [PromptRecord(r["id"], "Tell me something interesting.", assistant=r["text"]) for r in rows]
    return [PromptRecord(str(i), q) for i, q in enumerate(NEUTRAL_REFERENCE)]


@torch.inference_mode()
def kl_guard(handle: ModelHandle, interventions: Sequence[Intervention], records: Sequence[PromptRecord],
             backend: str = "hf") -> dict[str, float]:
    """Mean per-token KL(plain || intervened) of next-token distributions on neutral text, and the
    intervened model's perplexity ratio on the neutral responses (1.0 = unchanged)."""
    be = get_backend(backend, handle)
    toks = [tokenize_record(handle.tokenizer, r) for r in records]
    kls, nll_p, nll_i, n = [], 0.0, 0.0, 0
    for b in length_sorted_batches(toks, 16, handle.tokenizer.pad_token_id):
        lp, _ = be.run(b.input_ids, b.attention_mask)
        li, _ = be.run(b.input_ids, b.attention_mask, interventions=interventions)
        m = b.attention_mask.bool().to(lp.device)
        lp, li = lp.float().log_softmax(-1), li.float().log_softmax(-1)
        kl = (lp.exp() * (lp - li)).sum(-1)
        kls.append(kl[m].cpu())
        # perplexity over response tokens (teacher-forced next-token NLL)
        tgt = b.input_ids.to(lp.device)[:, 1:]
        ar = torch.arange(tgt.shape[1], device=lp.device)[None]
        rm = (ar + 1 >= b.resp_start.to(lp.device)[:, None]) & (ar + 1 < b.resp_end.to(lp.device)[:, None])
        nll_p += float(-lp[:, :-1].gather(-1, tgt[..., None])[..., 0][rm].sum())
        nll_i += float(-li[:, :-1].gather(-1, tgt[..., None])[..., 0][rm].sum())
        n += int(rm.sum())
    out = {"kl_neutral": float(torch.cat(kls).mean())}
    if n:
        out["ppl_ratio_neutral"] = float(torch.exp(torch.tensor((nll_i - nll_p) / n)))
    return out


def response_projection(handle: ModelHandle, direction: DirectionSet, rows: Sequence[dict[str, Any]],
                        backend: str = "hf", batch_size: int = 16) -> list[float]:
    """Project each (question, answer) — read by the *unsteered* model — onto the direction at its best
    layer, averaged over response tokens: the character of the text itself."""
    recs = [PromptRecord(str(i), r["question"], system=r.get("system"), assistant=r["answer"] or "...")
            for i, r in enumerate(rows)]
    if not recs:
        return []
    acts = extract(handle, PromptSet("responses", tuple(recs)), layers=[direction.best_layer],
                   positions="response_mean", backend=backend, batch_size=batch_size, progress=False)
    return project(acts.get("response_mean", direction.best_layer), direction.at()).tolist()


def steering_sweep(
    handle: ModelHandle,
    direction: DirectionSet,
    *,
    layers: Sequence[int] | None = None,
    alphas: str | Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    questions: Any = "builtin:core",
    n_samples: int = 3,
    unit: str = "resid",
    where: str = "all",
    include_random: bool = True,
    judge: str | None = "offline",
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    backend: str = "hf",
    mode: str = "steer",
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the grid. mode="steer": add α·v at each layer; mode="ablate": project v out (α ignored,
    `layers` = ablated layers, default all). Every cell uses the same seed, so cells differ only by
    the intervention; α = 0 is the unsteered baseline and the random control has the same norm."""
    check_direction_fits(direction, handle, force=force)
    th = Thresholds()
    alist = parse_alphas(alphas) if mode == "steer" else [1.0]
    Ls = list(layers) if layers else ([int(direction.best_layer)] if mode == "steer" else None)
    qs = as_questions(questions)
    recs = question_prompt_records(qs)
    j = make_judge(judge) if judge else None
    jdesc = j.describe() if j is not None else {}
    guard_recs = neutral_texts()
    cells: list[dict[str, Any]] = []
    all_rows: list[dict[str, Any]] = []
    conditions: list[tuple[str, Any, float, list[Intervention]]] = []
    if mode == "ablate":
        conditions.append(("none", "-", 0.0, []))
        conditions.append(("direction", "all" if Ls is None else ",".join(map(str, Ls)), 1.0,
                           ablation_interventions(direction.at(), handle.n_layers, Ls)))
        if include_random and direction.random is not None:
            r = direction.random[direction.layers.index(direction.best_layer)]
            conditions.append(("random", "all" if Ls is None else ",".join(map(str, Ls)), 1.0,
                               ablation_interventions(r, handle.n_layers, Ls)))
    else:
        for L in Ls:  # type: ignore[union-attr]
            for a in alist:
                conditions.append(("direction", L, a, add_interventions({L: direction.at(L)}, a, unit=unit,
                                                                         handle=handle, where=where)))
                if include_random and a != 0 and direction.random is not None:
                    rv = direction.random[direction.layers.index(L)]
                    conditions.append(("random", L, a, add_interventions({L: rv}, a, unit=unit, handle=handle,
                                                                          where=where)))
    for kind, L, a, ivs in conditions:
        label = f"{kind} L{L} α={a:g}"
        samples = generate(handle, recs, n_samples=n_samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, batch_size=batch_size, backend=backend,
                           interventions=ivs, progress=progress, desc=label)
        rows = [{"condition": kind, "layer": L, "alpha": a, "question_id": s.labels.get("question_id"),
                 "question": s.question, "system": s.system, "sample": s.sample, "answer": s.text,
                 "n_tokens": s.n_tokens} for s in samples]
        proj = response_projection(handle, direction, rows, backend=backend)
        for r, p in zip(rows, proj):
            r["projection"] = p
        cell: dict[str, Any] = {"condition": kind, "layer": L, "alpha": a, "n": len(rows),
                                "mean_projection": sum(proj) / len(proj),
                                "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows)}
        cell.update(kl_guard(handle, ivs, guard_recs, backend) if ivs else {"kl_neutral": 0.0,
                                                                           "ppl_ratio_neutral": 1.0})
        if j is not None:
            rows = judge_rows(j, rows, th, {q.id: q.judge_prompts for q in qs if q.judge_prompts})
            o = add_corrected(summarize(rows, th), rows, jdesc)["overall"]
            rg = (o.get("em_corrected") or {}).get("rogan_gladen") or {}
            cell.update(em_rate=o["em_rate"], em_ci95=o["em_ci95"], mean_aligned=o["mean_aligned"],
                        mean_coherent=o["mean_coherent"], refusal_rate=o["refusal_rate"], n_counted=o["n_counted"],
                        em_share=(o.get("em_share") or {}).get("rate"), em_share_ci95=(o.get("em_share") or {}).get("ci95"),
                        em_corrected=rg.get("rate"), em_corrected_ci95=rg.get("ci95"))
        cells.append(cell)
        all_rows.extend(rows)
    result = {"cells": cells, "judge": j.describe() if j else None, "unit": unit, "where": where, "mode": mode,
              "direction": direction.manifest.get("name"), "best_layer": direction.best_layer}
    if out:
        o = Path(out)
        atomic_write_text(o / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                           for r in all_rows))
        atomic_write_json(o / "cells.json", result)
        atomic_write_json(o / "manifest.json", base_manifest(
            f"{mode}_sweep", model=handle.info.to_dict(), direction=direction.manifest, layers=Ls, alphas=alist,
            questions=questions if isinstance(questions, str) else [q.id for q in qs], n_samples=n_samples, seed=seed, temperature=temperature,
            max_new_tokens=max_new_tokens, unit=unit, where=where, backend=backend))
        from persona_probe.report.figures import sweep_figure, write_figure

        write_figure(sweep_figure(cells), o / "sweep.html")
    result["rows"] = all_rows
    return result
