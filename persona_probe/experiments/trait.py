"""A trait file's direction by the persona-vector method: generate, judge, filter, difference of means.

For every instruction pair and question the model answers under the positive and under the negative system
prompt; a judge scores each answer on the file's `eval_prompt` (the trait, 0-100) and on coherence; positive
answers with trait >= `trait_min` and negative answers with trait < `trait_min`, both coherent >= `coherent_min`,
are kept; the direction is the response-averaged difference of means per layer, with the held-out statistics
and random control of `directions.derive.derive`. The prompt-last and prompt-mean directions of the same kept
records come from the same extraction.

A judge that cannot score the trait (the offline judge scores aligned/coherent only: it reports every other
judge prompt as not scored) gets one printed line and no filtering; the manifest records which filter ran.

Folder layout (`out`): the response_mean direction at the top (directions.safetensors, report.json,
manifest.json, layers.html: what `persona-probe direction` writes), `prompt_last/` and `prompt_mean/` (one
direction each), `answers.jsonl` (every answer, its scores and whether it was kept), `acts-positive/`,
`acts-negative/` (the activations) and `trait.json` (this result).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from persona_probe.activations.extraction import ActivationSet, extract
from persona_probe.backends.sampling import Sample, generate, with_responses
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.layers import parse_layers
from persona_probe.core.paths import atomic_write_json, atomic_write_text
from persona_probe.core.results import Result
from persona_probe.directions.derive import MIN_PER_SIDE, DirectionSet, derive
from persona_probe.evaluation.judges.base import Judge, JudgeScore
from persona_probe.evaluation.judging import make_judge
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import PromptSet
from persona_probe.prompts.traits import SIDES, TraitFile, load_trait_file

MAIN_POSITION = "response_mean"
POSITIONS = ("response_mean", "prompt_last", "prompt_mean")
NO_JUDGE = "none"  # judge="none": no judging, no filtering


@dataclass
class TraitDirectionResult(Result):
    """The directions of one trait file (one DirectionSet per position) and what the judge filter kept.

    `counts[side]`: answers generated, kept, and (when filtering) left unscored by the judge. `positions`:
    per position the folder, selected layer and held-out separation. The DirectionSets themselves are
    `.directions[position]` (`.direction` is the response_mean one); they are saved as folders, not in the JSON.
    """

    trait: str
    source: str
    filter: str
    counts: dict[str, dict[str, int]]
    thresholds: dict[str, float]
    judge: dict[str, Any]
    positions: dict[str, dict[str, Any]]
    out: str | None = None
    _directions: dict[str, DirectionSet] = field(default_factory=dict, repr=False)
    _answers: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def directions(self) -> dict[str, DirectionSet]:
        return self._directions

    @property
    def direction(self) -> DirectionSet:
        """The response-averaged direction (the persona-vector method's)."""
        return self._directions[MAIN_POSITION]

    @property
    def answers(self) -> list[dict[str, Any]]:
        """Every generated answer with its side, scores and `kept` flag (also answers.jsonl)."""
        return self._answers


def check_trait_run(tf: TraitFile, *, n_questions: int | None = None, n_prompts: int | None = None,
                    n_samples: int = 1, max_new_tokens: int = 96, trait_min: float = 50.0,
                    coherent_min: float = 50.0, test_frac: float = 0.25) -> None:
    """Everything about a trait run that can be checked before a model loads (one line each)."""
    for flag, v in (("--n-questions", n_questions), ("--n-prompts", n_prompts)):
        if v is not None and v < 1:
            raise PersonaProbeError(f"{flag} must be >= 1, got {v}")
    for flag, v in (("--samples", n_samples), ("--max-new-tokens", max_new_tokens)):
        if v < 1:
            raise PersonaProbeError(f"{flag} must be >= 1, got {v}")
    for flag, x in (("--trait-min", trait_min), ("--coherent-min", coherent_min)):
        if not 0 <= x <= 100:
            raise PersonaProbeError(f"{flag} is a judge score threshold in [0, 100], got {x}")
    if not 0 < test_frac < 1:
        raise PersonaProbeError(f"--test-frac must be in (0, 1), got {test_frac}")
    n_q = len(tf.questions[:n_questions])
    n = len(tf.pairs[:n_prompts]) * n_q * n_samples
    if n_q < 2 or n < MIN_PER_SIDE:
        raise PersonaProbeError(f"{tf.source}: {len(tf.pairs[:n_prompts])} instruction pairs x {n_q} questions x "
                                f"{n_samples} samples = {n} answers per side; a held-out split needs at least 2 "
                                f"questions and {MIN_PER_SIDE} answers per side: use more questions, pairs or "
                                "--samples")


def _trait_key(name: str) -> str:
    """The judge-prompt name of the trait (never the built-in aligned/coherent prompts)."""
    return name if name not in ("aligned", "coherent") else f"{name}_trait"


def _score(judge: Judge, items: list[tuple[str, str]], jp: dict[str, str], progress: bool,
           chunk: int = 64) -> list[JudgeScore]:
    out: list[JudgeScore] = []
    with tqdm(total=len(items), desc=f"judging ({judge.name})", unit="answer", disable=not progress) as bar:
        for c in range(0, len(items), chunk):
            out.extend(judge.score(items[c:c + chunk], judge_prompts=jp))
            bar.update(len(items[c:c + chunk]))
    return out


def keep_answer(side: str, trait: float | None, coherent: float | None, trait_min: float,
                coherent_min: float) -> bool:
    """The persona-vector filter: the positive side shows the trait, the negative does not, both coherent."""
    if trait is None or coherent is None or coherent < coherent_min:
        return False
    return trait >= trait_min if side == "positive" else trait < trait_min


def _answer_row(s: Sample) -> dict[str, Any]:
    return {"id": f"{s.record_id}-s{s.sample}", "side": s.labels["side"], "system_idx": s.labels["system_idx"],
            "question_id": s.labels["question_id"], "question": s.question, "system": s.system, "sample": s.sample,
            "answer": s.text, "n_tokens": s.n_tokens, "truncated": s.truncated}


def judge_and_filter(rows: list[dict[str, Any]], tf: TraitFile, judge: str | Judge, *, trait_min: float,
                     coherent_min: float, progress: bool = True) -> tuple[str, dict[str, Any]]:
    """Score `rows` (answers with `side`, `question`, `answer`) and set each row's `kept`; returns the filter
    description for the manifest and the judge's description. Without a usable trait score every row is kept."""
    if isinstance(judge, str) and judge == NO_JUDGE:
        j_desc: dict[str, Any] = {"judge": NO_JUDGE}
        filt = "none (no judge)"
    elif tf.eval_prompt is None:
        j_desc, filt = {"judge": None}, "none (trait file has no eval_prompt)"
    else:
        j = make_judge(judge)
        j_desc = j.describe()
        key = _trait_key(tf.name)
        scores = _score(j, [(r["question"], r["answer"]) for r in rows], {key: tf.eval_prompt}, progress)
        for r, s in zip(rows, scores):
            v = s.value(key)
            r.update(trait=float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None,
                     coherent=s.coherent, refusal=s.refusal)
        if any(r["trait"] is not None for r in rows):
            for r in rows:
                r["kept"] = keep_answer(r["side"], r["trait"], r["coherent"], trait_min, coherent_min)
            return (f"judge: positive trait >= {trait_min:g}, negative trait < {trait_min:g}, "
                    f"coherent >= {coherent_min:g}"), j_desc
        print(f"persona_probe: judge {j_desc.get('judge', j.name)} cannot score trait {tf.name!r} (it gave no "
              f"'{key}' score): no filtering, all {len(rows)} answers kept; use --judge openai:MODEL to filter",
              file=sys.stderr)
        filt = "none (judge cannot score trait)"
    for r in rows:
        r["kept"] = True
    return filt, j_desc


def _counts(rows: Sequence[dict[str, Any]], filtered: bool) -> dict[str, dict[str, int]]:
    out = {}
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side]
        c = {"answers": len(mine), "kept": sum(bool(r["kept"]) for r in mine)}
        if filtered:
            c["unscored"] = sum(r.get("trait") is None for r in mine)
        out[side] = c
    return out


def _summary(d: DirectionSet, folder: Path | None) -> dict[str, Any]:
    best = next(s for s in d.stats if s.layer == d.best_layer)
    return {"folder": str(folder) if folder else None, "best_layer": d.best_layer,
            "heldout_auroc": round(best.auroc, 4), "heldout_cohens_d": round(best.cohens_d, 3),
            "random_control_auroc": round(best.random_auroc, 4), "norm": round(best.norm, 3)}


def trait_direction(
    handle: ModelHandle,
    trait: str | Path | TraitFile,
    *,
    judge: str | Judge = "offline",
    layers: str | list[Any] = "all",
    n_questions: int | None = None,
    n_prompts: int | None = None,
    n_samples: int = 1,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    trait_min: float = 50.0,
    coherent_min: float = 50.0,
    backend: str = "hf",
    batch_size: int = 16,
    out: str | Path | None = None,
    seed: int = 0,
    test_frac: float = 0.25,
    progress: bool = True,
) -> TraitDirectionResult:
    """Persona-vector direction of a trait file (path, NAME in the user trait folder, or built-in name).

    `n_questions` / `n_prompts` use only the first N questions / instruction pairs; `n_samples` answers per
    (instruction, question) at `temperature` (seeded); `judge` "offline" (cannot score a trait: no filtering),
    "openai:MODEL", "hf:MODEL", a Judge, or "none". Returns the directions per position and the filter counts.
    """
    tf = load_trait_file(trait)
    check_trait_run(tf, n_questions=n_questions, n_prompts=n_prompts, n_samples=n_samples,
                    max_new_tokens=max_new_tokens, trait_min=trait_min, coherent_min=coherent_min, test_frac=test_frac)
    Ls = parse_layers(layers, handle.n_layers)  # a bad layer fails before any generation
    folder = Path(out) if out else None
    recs = {side: tf.records(side, n_questions, n_prompts) for side in SIDES}
    samples = {side: generate(handle, recs[side], n_samples=n_samples, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed, batch_size=batch_size, backend=backend,
                              progress=progress, desc=f"answers [{tf.name}/{side}]") for side in SIDES}
    rows = [_answer_row(s) for side in SIDES for s in samples[side]]
    filt, j_desc = judge_and_filter(rows, tf, judge, trait_min=trait_min, coherent_min=coherent_min,
                                    progress=progress)
    counts = _counts(rows, filtered=filt.startswith("judge"))
    if folder:  # the judged answers are on disk before anything can fail on too few kept
        atomic_write_text(folder / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for side in SIDES:
        if counts[side]["kept"] < MIN_PER_SIDE:
            raise PersonaProbeError(
                f"the judge filter kept {counts[side]['kept']} of {counts[side]['answers']} {side} answers "
                f"({filt}); a held-out split needs {MIN_PER_SIDE} per side: lower --trait-min/--coherent-min, or "
                "add questions or --samples" + (f" (answers in {folder / 'answers.jsonl'})" if folder else ""))
    kept_ids = {r["id"] for r in rows if r["kept"]}
    acts: dict[str, ActivationSet] = {}
    for side in SIDES:
        kept = [r for r in with_responses(recs[side], samples[side]) if r.id in kept_ids]
        acts[side] = extract(handle, PromptSet(f"trait:{tf.name}/{side}", tuple(kept)), layers=Ls,
                             positions=POSITIONS, backend=backend, batch_size=batch_size,
                             out=folder / f"acts-{side}" if folder else None, seed=seed, progress=progress,
                             overwrite=True)
    th = {"trait_min": trait_min, "coherent_min": coherent_min}
    extra = {"trait": tf.name, "trait_file": {"source": tf.source, "n_pairs": len(tf.pairs[:n_prompts]),
                                              "n_questions": len(tf.questions[:n_questions]),
                                              "hash": _trait_hash(tf)},
             "filter": filt, "kept": {side: counts[side]["kept"] for side in SIDES}, "counts": counts,
             "thresholds": th, "judge": j_desc,
             "generation": {"n_samples": n_samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
                            "seed": seed}}
    dirs: dict[str, DirectionSet] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for pos in POSITIONS:
        try:
            d = derive(acts["positive"], acts["negative"], position=pos, method="persona",
                       name=f"trait:{tf.name}" + ("" if pos == MAIN_POSITION else f"/{pos}"), test_frac=test_frac,
                       seed=seed, extra_manifest=extra)
        except PersonaProbeError as e:
            raise PersonaProbeError(f"{e} (after the filter: {counts['positive']['kept']} positive, "
                                    f"{counts['negative']['kept']} negative answers kept)") from None
        sub = (folder if pos == MAIN_POSITION else folder / pos) if folder else None
        if sub:
            d.save(sub)
        dirs[pos] = d
        summaries[pos] = _summary(d, sub)
    res = TraitDirectionResult(trait=tf.name, source=tf.source, filter=filt, counts=counts, thresholds=th,
                               judge=j_desc, positions=summaries, out=str(folder) if folder else None,
                               _directions=dirs, _answers=rows)
    if folder:
        atomic_write_json(folder / "trait.json", res.to_dict())
    return res


def _trait_hash(tf: TraitFile) -> str:
    blob = json.dumps([tf.pairs, tf.questions, tf.eval_prompt], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
