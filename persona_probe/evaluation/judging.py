"""Judging answers: build a judge from its spec, score rows in checkpointed chunks (a rerun resumes), score a
random subset with a gold judge for prediction-powered EM estimates, and read answers produced elsewhere
(`read_answers`: JSONL question/answer or messages, CSV/TSV) keeping every input field."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import iter_jsonl
from persona_probe.core.paths import atomic_write_text
from persona_probe.evaluation.criteria import Thresholds, em_flags, is_truncated
from persona_probe.evaluation.judges.base import Judge, JudgeScore
from persona_probe.evaluation.judges.hf_judge import HFJudge
from persona_probe.evaluation.judges.offline import FEATURE_SETS, OfflineJudge
from persona_probe.evaluation.judges.openai_judge import OpenAIJudge
from persona_probe.prompts.base import parse_record


def make_judge(spec: str | Judge | None = None) -> Judge:
    """`offline` (default), `offline-residual` / `offline-minilm` (the offline judge on the project's labels with
    another feature set), `offline:DIR` (a judge fitted by `judge fit`), `openai:MODEL` (OPENAI_BASE_URL /
    OPENAI_API_KEY), `hf:MODEL`."""
    if isinstance(spec, Judge):
        return spec
    spec = spec or "offline"
    if spec == "offline":
        return OfflineJudge()
    if spec in OFFLINE_VARIANTS:
        return OfflineJudge(features=spec.removeprefix("offline-"))
    kind, _, model = spec.partition(":")
    if kind == "offline" and model:
        return OfflineJudge.load(model)
    if kind == "openai" and model:
        return OpenAIJudge(model=model)
    if kind == "hf" and model:
        return HFJudge(model)
    raise PersonaProbeError(UNKNOWN.format(spec=spec))


OFFLINE_VARIANTS = tuple(f"offline-{f}" for f in FEATURE_SETS)
UNKNOWN = ("unknown judge {spec!r}: use offline, offline-residual, offline-minilm, offline:FITTED_DIR, openai:MODEL "
           "or hf:MODEL")


def check_judge_spec(spec: str | Judge | None) -> None:
    """A judge spec's form checked without building the judge (an hf: judge loads a model): commands call it
    before they load anything."""
    if spec is None or isinstance(spec, Judge) or spec == "offline" or spec in OFFLINE_VARIANTS:
        return
    kind, _, model = spec.partition(":")
    if kind not in ("offline", "openai", "hf") or not model:
        raise PersonaProbeError(UNKNOWN.format(spec=spec))
    if kind == "offline" and not all((Path(model) / f).is_file() for f in ("manifest.json", "heads.safetensors")):
        raise PersonaProbeError(f"{model} is not a fitted offline judge (no manifest.json + heads.safetensors); "
                                "make one with: persona-probe judge fit --labels FILE.jsonl --out DIR")


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


# ----------------------------------------------------------------------------- answers produced elsewhere

ANSWER_FORMATS = "JSONL (question/answer or messages), a JSON list of such objects, .csv or .tsv"
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
SCORE_COLUMNS = ("aligned", "coherent", "refusal", "code", "counted", "em")


def _qa_row(d: dict[str, Any], q: str, a: str, qcol: str, acol: str) -> dict[str, Any]:
    """The input row, every field kept, with `question`/`answer` set for the judge (an input field of that name
    that is not the chosen column is kept as input_question/input_answer)."""
    row = dict(d)
    for key, col, v in (("question", qcol, q), ("answer", acol, a)):
        if key in row and col != key:
            row[f"input_{key}"] = row[key]
        row[key] = v
    return row


def _object_row(d: Any, where: str, qcol: str, acol: str) -> dict[str, Any]:
    """One JSON object: `qcol`/`acol` strings, or a `messages` chat ending with the assistant's answer, or a
    chat record's user/assistant."""
    if not isinstance(d, dict):
        raise PersonaProbeError(f"{where}: expected a JSON object with 'question' and 'answer', got "
                                f"{type(d).__name__}")
    if isinstance(d.get(qcol), str) and isinstance(d.get(acol), str):
        return _qa_row(d, d[qcol], d[acol], qcol, acol)
    if "messages" in d:
        rec = parse_record(d, where, where)
        if rec.assistant is None:
            raise PersonaProbeError(f"{where}: field 'messages' has no assistant turn at the end, so there is no "
                                    "answer to judge; end each conversation with {\"role\": \"assistant\", "
                                    "\"content\": ANSWER}")
        row = _qa_row(d, rec.user, rec.assistant, "question", "answer")
        if rec.system is not None:
            row.setdefault("system", rec.system)
        return row
    if isinstance(d.get("user"), str) and isinstance(d.get("assistant"), str):
        return _qa_row(d, d["user"], d["assistant"], "user", "assistant")
    raise PersonaProbeError(f"{where}: each line needs string fields {qcol!r} and {acol!r}, or 'messages' ending "
                            "with an assistant turn (--question-col/--answer-col name other fields)")


def _table_rows(p: Path, qcol: str, acol: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(p.read_text(encoding="utf-8-sig"), newline=""),
                            delimiter=TABLE_SUFFIXES[p.suffix.lower()])
    cols = list(reader.fieldnames or [])
    for col, flag in ((qcol, "--question-col"), (acol, "--answer-col")):
        if col not in cols:
            raise PersonaProbeError(f"{p}:1: no column {col!r}; the columns are {', '.join(map(repr, cols)) or 'none'}"
                                    f": name the right one with {flag}")
    rows, start = [], 2
    for r in reader:
        if None in r or any(v is None for v in r.values()):
            raise PersonaProbeError(f"{p}:{start}: this row has {'more' if None in r else 'fewer'} values than the "
                                    f"{len(cols)} columns of the header; quote cells that hold the delimiter")
        rows.append(_qa_row(r, r[qcol], r[acol], qcol, acol))
        start = reader.line_num + 1
    return rows


def read_answers(path: str | Path, *, question_col: str = "question", answer_col: str = "answer"
                 ) -> list[dict[str, Any]]:
    """Answers to judge, every input field kept: JSONL lines with `question`/`answer` (names configurable) or
    `messages` (the last user turn is the question, the final assistant turn the answer); a JSON list of such
    objects; or a .csv/.tsv table. A bad row is one error naming file, line and field."""
    p = Path(path)
    if not p.is_file():
        raise PersonaProbeError(f"answers file {p} does not exist")
    if p.suffix.lower() in TABLE_SUFFIXES:
        return _table_rows(p, question_col, answer_col)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PersonaProbeError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); give a list of objects or JSONL"
                                    ) from None
        if not isinstance(data, list):
            raise PersonaProbeError(f"{p}:1: expected a JSON list of {{\"question\", \"answer\"}} objects")
        return [_object_row(d, f"{p} item {i + 1}", question_col, answer_col) for i, d in enumerate(data)]
    return [_object_row(d, f"{p}:{i}", question_col, answer_col) for i, d in iter_jsonl(p, what="answers file")]


def write_table(rows: list[dict[str, Any]], path: str | Path, input_columns: list[str], delimiter: str = ",") -> None:
    """The judged rows as a table: the input columns, then the scores and every extra judge metric."""
    metrics = list(dict.fromkeys(m for r in rows for m in (r.get("metrics") or {})))
    cols = input_columns + [c for c in ("question", "answer", *SCORE_COLUMNS) if c not in input_columns]
    mcols = {m: (m if m not in cols else f"metric_{m}") for m in metrics}
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(cols + list(mcols.values()))
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in cols] + [_cell((r.get("metrics") or {}).get(m)) for m in mcols])
    atomic_write_text(path, buf.getvalue())


def _cell(v: Any) -> Any:
    return "" if v is None else json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
