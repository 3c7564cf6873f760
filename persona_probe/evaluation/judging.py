"""Judging answers: build a judge from its spec, score rows in checkpointed chunks (a rerun resumes), and
score a random subset with a gold judge for prediction-powered EM estimates."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import iter_jsonl
from persona_probe.evaluation.criteria import Thresholds, em_flags, is_truncated
from persona_probe.evaluation.judges.base import Judge, JudgeScore
from persona_probe.evaluation.judges.hf_judge import HFJudge
from persona_probe.evaluation.judges.offline import OfflineJudge
from persona_probe.evaluation.judges.openai_judge import OpenAIJudge


def make_judge(spec: str | Judge | None = None) -> Judge:
    """`offline` (default), `offline:DIR` (a judge fitted by `judge fit`), `openai:MODEL` (OPENAI_BASE_URL /
    OPENAI_API_KEY), `hf:MODEL`."""
    if isinstance(spec, Judge):
        return spec
    spec = spec or "offline"
    if spec == "offline":
        return OfflineJudge()
    kind, _, model = spec.partition(":")
    if kind == "offline" and model:
        return OfflineJudge.load(model)
    if kind == "openai" and model:
        return OpenAIJudge(model=model)
    if kind == "hf" and model:
        return HFJudge(model)
    raise PersonaProbeError(f"unknown judge {spec!r}: use offline, offline:FITTED_DIR, openai:MODEL or hf:MODEL")


PARTIAL = "judged.partial.jsonl"  # judged-so-far rows of an interrupted judging run (index + scores)


def judge_rows(judge: Judge, rows: list[dict[str, Any]], th: Thresholds,
               judge_prompts: dict[str, dict[str, str]] | None = None, *, checkpoint: str | Path | None = None,
               chunk: int = 64, progress: bool = False) -> list[dict[str, Any]]:
    """Add aligned/coherent/refusal/code/counted/em to rows with `question` and `answer` (a `truncated` row is
    flagged, and not counted for EM when `th.include_truncated` is False).

    Rows are grouped by their question's judge prompts (question files may bring their own). With
    `checkpoint` (a folder), each judged chunk is appended to `judged.partial.jsonl` there and rows already
    in it are not judged again: a judge that fails mid-run loses nothing, and a rerun resumes.
    """
    out = [dict(r) for r in rows]
    done: dict[int, dict[str, Any]] = {}
    part = Path(checkpoint) / PARTIAL if checkpoint else None
    jid = hashlib.sha256(json.dumps(judge.describe(), sort_keys=True, default=str).encode()).hexdigest()[:12]

    def jp_of(i: int) -> dict[str, str] | None:
        return (judge_prompts or {}).get(rows[i].get("question_id", ""))

    if part is not None and part.exists():
        for _, d in iter_jsonl(part, errors=[], what="judged-so-far file"):  # a line cut by a crash is skipped
            try:
                i = int(d["index"])
            except (KeyError, TypeError, ValueError):
                continue  # not a judged row: that row is judged again
            # reuse only what this judge scored for this very answer
            if 0 <= i < len(rows) and d.get("judge") == jid and d.get("answer") == rows[i]["answer"] and \
                    d.get("question") == rows[i]["question"] and d.get("prompts") == _prompts_hash(jp_of(i)):
                done[i] = d["score"]
    by_prompts: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if i in done:
            continue
        key = json.dumps((judge_prompts or {}).get(r.get("question_id", "")), sort_keys=True)
        by_prompts.setdefault(key, []).append(i)
    todo = sum(len(v) for v in by_prompts.values())
    with tqdm(total=todo, desc=f"judging ({judge.name})", disable=not progress or todo == 0, unit="answer") as bar:
        for key, idx in by_prompts.items():
            jp = json.loads(key)
            for c in range(0, len(idx), chunk):
                part_idx = idx[c:c + chunk]
                scores = judge.score([(rows[i]["question"], rows[i]["answer"]) for i in part_idx], judge_prompts=jp)
                new = {i: s.to_dict() for i, s in zip(part_idx, scores)}
                done.update(new)
                if part is not None:
                    part.parent.mkdir(parents=True, exist_ok=True)
                    with part.open("a", encoding="utf-8") as f:
                        f.write("".join(json.dumps({"index": i, "judge": jid, "question": rows[i]["question"],
                                                   "prompts": _prompts_hash(jp_of(i)), "answer": rows[i]["answer"],
                                                   "score": sc},
                                                   ensure_ascii=False, default=str) + "\n" for i, sc in new.items()))
                bar.update(len(part_idx))
    for i, d in done.items():
        s = JudgeScore(**d)
        out[i].update(aligned=s.aligned, coherent=s.coherent, refusal=s.refusal, code=s.code, judge_raw=s.raw,
                      metrics=s.metrics)
        out[i].update(em_flags(s, th, truncated=is_truncated(rows[i])))
    return out


def _prompts_hash(jp: dict[str, str] | None) -> str:
    return hashlib.sha256(json.dumps(jp or {}, sort_keys=True).encode()).hexdigest()[:12]


def judge_or_keep(j: Judge, rows: list[dict[str, Any]], th: Thresholds, jp: dict[str, dict[str, str]] | None,
                  out: str | Path | None, progress: bool, spec: str) -> list[dict[str, Any]]:
    """judge_rows with a checkpoint in `out`; a failure says where the answers are and how to finish."""
    try:
        return judge_rows(j, rows, th, jp, checkpoint=out, progress=progress)
    except PersonaProbeError as e:
        if out is None:
            raise
        raise PersonaProbeError(f"{e} — the answers are kept in {Path(out) / 'answers.jsonl'} and the judged-so-far "
                                f"in {Path(out) / PARTIAL}; finish with: persona-probe judge --answers {out} --resume "
                                f"--judge {spec}" + (f" --em '{th.criterion}'" if th.criterion else "")) from None


def gold_scores(rows: list[dict[str, Any]], gold_judge: str | Judge, frac: float, th: Thresholds,
                jp: dict[str, dict[str, str]] | None, seed: int, progress: bool) -> dict[str, Any]:
    """Score a seeded uniformly random subset of the rows with the gold judge (marked `gold_*` in the rows)."""
    g = make_judge(gold_judge)
    n = min(len(rows), max(2, round(frac * len(rows))))
    idx = sorted(random.Random(seed).sample(range(len(rows)), n))
    scored = judge_rows(g, [rows[i] for i in idx], th, jp, progress=progress)
    for i, r in zip(idx, scored):
        rows[i]["gold"] = {k: r[k] for k in ("aligned", "coherent", "refusal", "code", "em")}
    return {"rows": idx, "em": [bool(r["em"]) for r in scored], "judge": g.describe()}


def judge_spec(judge: str | Judge | None) -> str:
    """The `--judge` spec that rebuilds `judge` (for the resume hint)."""
    if isinstance(judge, str):
        return judge
    return str(judge.describe().get("judge", judge.name)) if judge is not None else "offline"
