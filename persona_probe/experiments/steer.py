"""Steering sweeps: α × layer grid along a direction, with a random control, a neutral-text KL guard,
response projections and (optionally) judged EM rates per cell."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from persona_probe.activations.extraction import extract
from persona_probe.backends import Intervention
from persona_probe.backends.sampling import generate
from persona_probe.core.artifacts import base_manifest
from persona_probe.core.paths import atomic_write_json, atomic_write_text
from persona_probe.core.results import Result
from persona_probe.directions.derive import DirectionSet, check_direction_fits, project
from persona_probe.evaluation import (
    Thresholds,
    add_corrected,
    judge_rows,
    make_judge,
    question_prompt_records,
    summarize,
)
from persona_probe.interventions.guard import kl_guard, neutral_texts
from persona_probe.interventions.steering import (
    ablation_interventions,
    add_interventions,
    parse_alphas,
)
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.questions import as_questions
from persona_probe.prompts.records import PromptRecord, PromptSet
from persona_probe.report.figures import sweep_figure, write_figure

JUDGE_FIELDS = ("em_rate", "em_ci95", "mean_aligned", "mean_coherent", "refusal_rate", "n_counted", "em_share",
                "em_share_ci95", "em_corrected", "em_corrected_ci95", "n_truncated")


@dataclass
class SweepCell(Result):
    """One (condition, layer, α) cell: projections, the neutral-text guard and, when judged, EM rates."""

    optional = ("ppl_ratio_neutral",)
    condition: str  # direction | random | none (ablation baseline)
    layer: Any  # int layer, or "all" / "10,12" for ablation
    alpha: float
    n: int
    mean_projection: float
    mean_tokens: float
    kl_neutral: float
    ppl_ratio_neutral: Optional[float] = None
    em_rate: Optional[float] = None
    em_ci95: Optional[list[float]] = None
    mean_aligned: Optional[float] = None
    mean_coherent: Optional[float] = None
    refusal_rate: Optional[float] = None
    n_counted: Optional[int] = None
    em_share: Optional[float] = None
    em_share_ci95: Optional[list[float]] = None
    em_corrected: Optional[float] = None
    em_corrected_ci95: Optional[list[float]] = None
    n_truncated: Optional[int] = None  # answers that hit max_new_tokens (counted; see evaluation.criteria)
    _judged: bool = False

    def _omit(self, name: str) -> bool:
        return (name in JUDGE_FIELDS and not self._judged) or super()._omit(name)


@dataclass
class SweepResult(Result):
    """A steering (or ablation) sweep; `to_dict(exclude=("rows",))` is cells.json."""

    cells: list[SweepCell]
    judge: Optional[dict[str, Any]]
    unit: str
    where: str
    mode: str
    direction: Optional[str]
    best_layer: Any
    rows: list[dict[str, Any]] = field(default_factory=list)  # every judged generation (generations.jsonl)


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
) -> SweepResult:
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
    cells: list[SweepCell] = []
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
                 "n_tokens": s.n_tokens, "truncated": s.truncated} for s in samples]
        proj = response_projection(handle, direction, rows, backend=backend)
        for r, p in zip(rows, proj):
            r["projection"] = p
        guard = kl_guard(handle, ivs, guard_recs, backend) if ivs else {"kl_neutral": 0.0, "ppl_ratio_neutral": 1.0}
        cell = SweepCell(condition=kind, layer=L, alpha=a, n=len(rows), mean_projection=sum(proj) / len(proj),
                         mean_tokens=sum(r["n_tokens"] for r in rows) / len(rows), **guard)
        if j is not None:
            rows = judge_rows(j, rows, th, {q.id: q.judge_prompts for q in qs if q.judge_prompts}, progress=progress)
            o = add_corrected(summarize(rows, th), rows, jdesc)["overall"]
            rg = (o.get("em_corrected") or {}).get("rogan_gladen") or {}
            cell = replace(cell, _judged=True, em_rate=o["em_rate"], em_ci95=o["em_ci95"],
                           mean_aligned=o["mean_aligned"], mean_coherent=o["mean_coherent"],
                           refusal_rate=o["refusal_rate"], n_counted=o["n_counted"],
                           em_share=(o.get("em_share") or {}).get("rate"),
                           em_share_ci95=(o.get("em_share") or {}).get("ci95"), em_corrected=rg.get("rate"),
                           em_corrected_ci95=rg.get("ci95"), n_truncated=o.get("n_truncated"))
        cells.append(cell)
        all_rows.extend(rows)
    result = SweepResult(cells=cells, judge=j.describe() if j else None, unit=unit, where=where, mode=mode,
                         direction=direction.manifest.get("name"), best_layer=direction.best_layer)
    if out:
        o = Path(out)
        atomic_write_text(o / "generations.jsonl", "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                           for r in all_rows))
        atomic_write_json(o / "cells.json", result.to_dict(exclude=("rows",)))
        atomic_write_json(o / "manifest.json", base_manifest(
            f"{mode}_sweep", model=handle.info.to_dict(), direction=direction.manifest, layers=Ls, alphas=alist,
            questions=questions if isinstance(questions, str) else [q.id for q in qs], n_samples=n_samples, seed=seed, temperature=temperature,
            max_new_tokens=max_new_tokens, unit=unit, where=where, backend=backend))
        write_figure(sweep_figure([c.to_dict() for c in cells]), o / "sweep.html")
    result.rows = all_rows
    return result
