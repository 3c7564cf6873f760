"""EM evaluation: sample answers to benign questions, judge them, and compute EM rates with CIs
(`evaluate`); or judge answers produced elsewhere (`judge_file`). Criteria and summaries live in
`evaluation.criteria`, judges and checkpointed judging in `evaluation.judging`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from persona_probe.backends import Intervention
from persona_probe.backends.sampling import Sample, generate
from persona_probe.core.artifacts import base_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_write_json, atomic_write_text
from persona_probe.core.stats import Z95, fisher_exact, two_proportion_test, wilson
from persona_probe.evaluation.criteria import (
    Criterion,
    Thresholds,
    add_corrected,
    em_flags,
    judge_error_rates,
    summarize,
    warn_if_unparsed,
)
from persona_probe.evaluation.judges.base import Judge
from persona_probe.evaluation.judging import (
    PARTIAL,
    TABLE_SUFFIXES,
    gold_scores,
    judge_or_keep,
    judge_rows,
    judge_spec,
    make_judge,
    read_answers,
    write_table,
)
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.questions import Question, as_questions
from persona_probe.prompts.records import PromptRecord
from persona_probe.report.figures import em_bar_figure, write_figure


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)


def question_prompt_records(questions: Sequence[Question], *, system: str | None = None,
                            history: Sequence[dict[str, str]] = ()) -> list[PromptRecord]:
    recs = []
    for q in questions:
        for r in q.records():
            # an in-context prefix goes before the question's own earlier turns (a chat-format question's)
            recs.append(replace(r, system=system if system is not None else r.system,
                                history=tuple(history) + r.history))
    return recs


def evaluate(
    handle: ModelHandle,
    questions: str | Sequence[Question] = "builtin:core",
    *,
    n_samples: int = 10,
    judge: str | Judge | None = None,
    system: str | None = None,
    interventions: Sequence[Intervention] = (),
    history: Sequence[dict[str, str]] = (),
    records: Sequence[PromptRecord] | None = None,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    backend: str = "hf",
    thresholds: Thresholds | None = None,
    out: str | Path | None = None,
    condition: dict[str, Any] | None = None,
    progress: bool = True,
    gold_judge: str | Judge | None = None,
    gold_frac: float = 0.1,
    engine: Any = None,
) -> EvalResult:
    """Sample `n_samples` answers per question (paraphrase) and judge them.

    `system` overrides each question's system prompt; `history` is an in-context prefix (earlier
    turns); `interventions` steer/ablate during sampling; `records` replaces the question records
    entirely (ICL and trigger experiments build their own). With `gold_judge`, a strong judge also scores a
    seeded random `gold_frac` of the answers and the summary gets a prediction-powered EM estimate.
    `engine`: "hf", "vllm" or an engine object; None = `handle.engine` (README 'Engines').
    """
    if gold_judge is not None and not 0 < gold_frac <= 1:
        raise PersonaProbeError(f"gold_frac must be in (0, 1], not {gold_frac}")
    qs = as_questions(questions)
    th = thresholds or Thresholds()
    recs = list(records) if records is not None else question_prompt_records(qs, system=system, history=history)
    if not recs:
        raise PersonaProbeError("no questions to evaluate: the question set is empty")
    samples = generate(handle, recs, n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, batch_size=batch_size, backend=backend, interventions=interventions,
                       progress=progress, desc="answers", engine=engine)
    rows = [_row(s) for s in samples]
    if out:  # the answers are on disk before any judge runs: a judge failure never costs the sampling
        (Path(out) / PARTIAL).unlink(missing_ok=True)  # judged chunks of an earlier run are not these answers
        _write_answers(rows, out, judge_prompts={q.id: q.judge_prompts for q in qs if q.judge_prompts})
    j = make_judge(judge)
    jp = {q.id: q.judge_prompts for q in qs if q.judge_prompts}
    rows = judge_or_keep(j, rows, th, jp, out, progress, judge_spec(judge))
    gold = gold_scores(rows, gold_judge, gold_frac, th, jp, seed, progress) if gold_judge else None
    summary = summarize(rows, th)
    summary["judge"] = j.describe()
    add_corrected(summary, rows, summary["judge"], gold)
    warn_if_unparsed(summary, judge if isinstance(judge, str) else None)
    eng = handle.engine if engine is None else engine
    manifest = base_manifest("evaluation", model=handle.info.to_dict(), n_samples=n_samples, seed=seed,
                             engine=eng if isinstance(eng, str) else getattr(eng, "name", type(eng).__name__),
                             temperature=temperature, max_new_tokens=max_new_tokens, system=system,
                             n_history_turns=len(history), condition=condition or {}, judge=j.describe(),
                             questions=questions if isinstance(questions, str) else [q.id for q in qs])
    res = EvalResult(rows, summary, manifest)
    if out:
        write_eval(res, out)
    return res


def _row(s: Sample) -> dict[str, Any]:
    return {"question_id": s.labels.get("question_id", s.record_id), "record_id": s.record_id,
            "question": s.question, "system": s.system, "sample": s.sample, "answer": s.text,
            "n_tokens": s.n_tokens, "finished": s.finished, "truncated": s.truncated, "labels": s.labels}


def _write_answers(rows: Sequence[dict[str, Any]], out: str | Path,
                   judge_prompts: dict[str, dict[str, str]] | None = None) -> None:
    o = Path(out)
    atomic_write_text(o / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                   for r in rows))
    if judge_prompts:  # so that `judge --answers DIR --resume` judges with the question file's prompts
        atomic_write_json(o / "judge_prompts.json", judge_prompts)


def write_eval(res: EvalResult, out: str | Path) -> None:
    o = Path(out)
    _write_answers(res.rows, o)
    atomic_write_json(o / "summary.json", res.summary)
    atomic_write_json(o / "manifest.json", res.manifest)
    write_figure(em_bar_figure(res.summary), o / "em_rates.html")
    (o / PARTIAL).unlink(missing_ok=True)  # everything is in answers.jsonl now


def judge_file(answers: str | Path, judge: str | Judge | None = None, out: str | Path | None = None,
               thresholds: Thresholds | None = None, resume: bool = False, progress: bool = True, *,
               question_col: str = "question", answer_col: str = "answer") -> EvalResult:
    """Score answers produced elsewhere, every input field kept in the output rows (scores added): JSONL lines
    with `question` and `answer` (or `messages` ending with the assistant's answer), or a .csv/.tsv table
    (`question_col`/`answer_col` name the columns; a table also comes back as judged.csv/.tsv in `out`).

    `answers` may be an evaluation folder (its answers.jsonl). `resume=True` judges into that folder,
    keeping the rows an interrupted run already judged (judged.partial.jsonl). Every row is read and checked
    before the judge is built (an hf: judge loads a model)."""
    p = Path(answers)
    folder = p if p.is_dir() else None
    if folder is not None:
        p = folder / "answers.jsonl"
    if resume and folder is None:
        raise PersonaProbeError(f"--resume needs the evaluation folder (with answers.jsonl), not a file: {answers}")
    if resume and out is None:
        out = folder
    if not p.exists():
        raise PersonaProbeError(f"answers file {p} does not exist")
    rows = read_answers(p, question_col=question_col, answer_col=answer_col)
    input_columns = list(dict.fromkeys(k for r in rows for k in r))
    for d in rows:
        d.setdefault("question_id", d.get("id", d["question"][:40]))
    if not rows:
        raise PersonaProbeError(f"{p}: no answers to judge")
    th = thresholds or Thresholds()
    jp = None
    if folder is not None and (folder / "judge_prompts.json").exists():
        jp = json.loads((folder / "judge_prompts.json").read_text())
    if not resume and out is not None:
        (Path(out) / PARTIAL).unlink(missing_ok=True)  # a fresh judging run starts from nothing
    j = make_judge(judge)
    judged = judge_or_keep(j, rows, th, jp, out, progress, judge_spec(judge))
    summary = summarize(judged, th)
    summary["judge"] = j.describe()
    add_corrected(summary, judged, summary["judge"])
    warn_if_unparsed(summary, judge if isinstance(judge, str) else None)
    manifest = base_manifest("judged_answers", source=str(p), judge=j.describe(), question_col=question_col,
                             answer_col=answer_col)
    if folder is not None and (folder / "manifest.json").exists():  # an evaluation folder: keep what made it
        manifest = {**json.loads((folder / "manifest.json").read_text()), "judge": j.describe(),
                    "rejudged": {"created": manifest.get("created"),
                                 "package_version": manifest.get("package_version")}}
    res = EvalResult(judged, summary, manifest)
    if out:
        write_eval(res, out)
        if p.suffix.lower() in TABLE_SUFFIXES:  # a table comes back as a table too
            write_table(judged, Path(out) / f"judged{p.suffix.lower()}", input_columns,
                        TABLE_SUFFIXES[p.suffix.lower()])
    return res


__all__ = [
    "EvalResult", "evaluate", "judge_file", "question_prompt_records", "write_eval",
    # still importable from here for older importers; their homes are core.stats, evaluation.criteria and
    # evaluation.judging (or the evaluation face)
    "PARTIAL", "Criterion", "Thresholds", "Z95", "add_corrected", "em_flags", "fisher_exact", "judge_error_rates",
    "judge_rows", "make_judge", "summarize", "two_proportion_test", "wilson",
]
