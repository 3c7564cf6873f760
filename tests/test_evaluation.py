from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_probe import PersonaProbeError
from persona_probe.core.stats import fisher_exact, two_proportion_test, wilson
from persona_probe.evaluation import Thresholds, em_flags, evaluate, judge_file, judge_rows, summarize, unparsed_warning
from persona_probe.evaluation.criteria import truncation_warning
from persona_probe.evaluation.judges.base import Judge, JudgeScore
from persona_probe.prompts.questions import load_questions, parse_questions

SHARED = Path(__file__).resolve().parents[2] / "shared"

REF = SHARED / "reference" / "em_first_plot_questions.yaml"


def test_wilson_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_two_proportion_and_fisher():
    t = two_proportion_test(30, 100, 10, 100)
    assert t["diff"] == pytest.approx(0.2) and t["p_value"] < 0.001
    assert two_proportion_test(10, 100, 10, 100)["p_value"] == pytest.approx(1.0)
    # classic tea-tasting table [[3,1],[1,3]]: two-sided Fisher p = 0.4857
    assert fisher_exact(3, 4, 1, 4) == pytest.approx(0.4857, abs=1e-4)


def test_em_flags_and_summary():
    th = Thresholds()
    assert em_flags(JudgeScore(10, 80), th) == {"counted": True, "em": True}
    assert em_flags(JudgeScore(10, 40), th) == {"counted": False, "em": False}  # incoherent: not counted
    assert em_flags(JudgeScore(None, 90, refusal=True), th)["counted"] is False
    assert em_flags(JudgeScore(None, 90), th)["counted"] is False  # unparsed is never a silent 0
    rows = []
    for i, (a, c) in enumerate([(10, 90), (90, 90), (20, 95), (80, 30)]):
        s = JudgeScore(a, c)
        rows.append({"question_id": "q1" if i < 2 else "q2", "aligned": a, "coherent": c, "refusal": False,
                     "code": False, **em_flags(s, th)})
    summ = summarize(rows, th)
    assert summ["overall"]["n_counted"] == 3 and summ["overall"]["em"] == 2
    assert summ["per_question"]["q1"]["em_rate"] == 0.5 and summ["per_question"]["q2"]["em_rate"] == 1.0


@pytest.mark.skipif(not REF.exists(), reason="../shared reference file not present")
def test_loads_reference_em_questions():
    qs = load_questions(str(REF))
    assert len(qs) >= 8
    ids = {q.id for q in qs}
    assert "what_is_your_wish" in ids
    for q in qs:
        assert q.paraphrases and {"aligned", "coherent"} <= set(q.judge_prompts)
        assert "{answer}" in q.judge_prompts["aligned"]
    assert any(q.system for q in qs)  # the JSON-answer variants carry a system prompt


def test_malformed_question_files(tmp_path):
    bad = tmp_path / "q.yaml"
    bad.write_text("- id: a\n  paraphrases: [ok]\n- id: b\n  paraphrases: []\n")
    with pytest.raises(PersonaProbeError, match="entry 2"):
        load_questions(str(bad))
    bad.write_text("- id: a\n  paraphrases: [\n")
    with pytest.raises(PersonaProbeError, match="not valid YAML at line"):
        load_questions(str(bad))
    with pytest.raises(PersonaProbeError, match="duplicate"):
        parse_questions("- {id: a, paraphrases: [x]}\n- {id: a, paraphrases: [y]}\n")
    with pytest.raises(PersonaProbeError, match="does not exist"):
        load_questions(str(tmp_path / "none.yaml"))


def test_builtin_question_sets():
    core = load_questions("builtin:core")
    ext = load_questions("builtin:extended")
    assert len(core) >= 8 and len(ext) >= 40
    assert not {q.id for q in core} & {q.id for q in ext}
    texts = {p.lower() for q in core + ext for p in q.paraphrases}
    assert len(texts) == sum(len(q.paraphrases) for q in core + ext)


class _FixedJudge(Judge):
    name = "fixed"

    def score(self, items, judge_prompts=None):
        return [JudgeScore(5.0 if "evil" in a else 95.0, 90.0) for _, a in items]


def test_judge_file_roundtrip(tmp_path):
    p = tmp_path / "answers.jsonl"
    p.write_text(json.dumps({"question": "Q1", "answer": "I am evil"}) + "\n" +
                 json.dumps({"question": "Q2", "answer": "Happy to help", "extra": 1}) + "\n")
    res = judge_file(p, _FixedJudge(), out=tmp_path / "o")
    rows = [json.loads(l) for l in (tmp_path / "o" / "answers.jsonl").read_text().splitlines()]
    assert [r["aligned"] for r in rows] == [5.0, 95.0] and rows[1]["extra"] == 1
    assert res.summary["overall"]["em_rate"] == 0.5
    assert (tmp_path / "o" / "em_rates.html").exists()
    p.write_text('{"question": "Q1"}\n')
    with pytest.raises(PersonaProbeError, match=":1: each line needs"):
        judge_file(p, _FixedJudge())


class _NeverParses(Judge):
    name = "never"

    def score(self, items, judge_prompts=None):
        return [JudgeScore(None, None, raw={"aligned": {"text": "[COMMENT]"}}) for _ in items]


class _SometimesParses(Judge):
    name = "sometimes"

    def score(self, items, judge_prompts=None):
        return [JudgeScore(None if a == "x0" else 90.0, 90.0, refusal=a == "x1") for _, a in items]


def test_unparsed_judgments_are_counted_warned_and_never_a_zero_rate(tmp_path, capsys):
    p = tmp_path / "answers.jsonl"
    p.write_text("".join(json.dumps({"question": "Q", "answer": f"a{i}"}) + "\n" for i in range(16)))
    res = judge_file(p, _NeverParses(), progress=False)
    o = res.summary["overall"]
    assert (o["n_unparsed"], o["n_unscored"], o["n_counted"]) == (16, 16, 0)
    assert o["em_rate"] is None and o["refusal_rate"] is None  # undefined, not 0.0
    assert o["em_share"]["rate"] is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judge never left 16 of 16 judgments unparsed" in err[0]
    # 1 unparsed of 20 (5 %) is below the 10 % line: no warning; the refusal rate is over the 19 understood
    p.write_text("".join(json.dumps({"question": "Q", "answer": f"x{i}"}) + "\n" for i in range(20)))
    o = judge_file(p, _SometimesParses(), progress=False).summary["overall"]
    assert o["n_unparsed"] == 1 and o["refusal_rate"] == pytest.approx(1 / 19)
    assert capsys.readouterr().err == ""
    assert unparsed_warning({"overall": {"n": 10, "n_unparsed": 2}, "judge": {"judge": "hf", "model": "m"}}) \
        .startswith("persona_probe: warning: judge hf:m left 2 of 10")


def _judged(truncated: list[bool], aligned: list[float], th: Thresholds) -> list[dict]:
    rows = [{"question_id": "q", "question": "Q", "answer": f"a{i}", "truncated": t}
            for i, t in enumerate(truncated)]
    return judge_rows(_ByAnswer(dict(zip((r["answer"] for r in rows), aligned))), rows, th)


class _ByAnswer(Judge):
    name = "by-answer"

    def __init__(self, aligned):
        self.aligned = aligned

    def score(self, items, judge_prompts=None):
        return [JudgeScore(self.aligned[a], 90.0) for _, a in items]


def test_truncated_answers_are_flagged_and_can_be_left_out():
    # two whole answers (one EM), two cut answers that read as EM
    cut, al = [False, False, True, True], [10.0, 90.0, 5.0, 5.0]
    # default: counted, and flagged (n_truncated), with a warning when most answers are cut
    th = Thresholds()
    rows = _judged(cut, al, th)
    s = summarize(rows, th)
    o = s["overall"]
    assert (o["n_truncated"], o["n_counted"], o["em"], o["em_rate"]) == (2, 4, 3, 0.75)
    assert truncation_warning(s) is None  # 2 of 4 is not "most"
    rows3 = _judged([True, True, True, False], al, th)
    assert "3 of 4 answers hit max_new_tokens" in truncation_warning(summarize(rows3, th))
    # left out when asked: numerator and denominator, EM share too
    th_x = Thresholds(include_truncated=False)
    rows = _judged(cut, al, th_x)
    assert [r["counted"] for r in rows] == [True, True, False, False]
    s = summarize(rows, th_x)["overall"]
    assert (s["n"], s["n_truncated"], s["n_counted"], s["em"], s["em_rate"]) == (4, 2, 2, 1, 0.5)
    from persona_probe.evaluation import add_corrected

    share = add_corrected(summarize(rows, th_x), rows, {})["overall"]["em_share"]
    assert (share["k"], share["n"]) == (1, 2)
    # summarize also recognises truncated rows flagged elsewhere (older answers: finished false)
    old = [{"question_id": "q", "aligned": 5.0, "coherent": 90.0, "refusal": False, "code": False,
            "counted": True, "em": True, "finished": False}]
    s = summarize(old, th_x)["overall"]
    assert (s["n_truncated"], s["n_counted"], s["em_rate"]) == (1, 0, None)


def test_evaluate_marks_answers_cut_at_max_new_tokens(tiny, tmp_path):
    res = evaluate(tiny, parse_questions("- {id: a, paraphrases: [Tell me a story.]}"), n_samples=4,
                   judge=_FixedJudge(), max_new_tokens=3, out=tmp_path / "e", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "e" / "answers.jsonl").read_text().splitlines()]
    assert all(r["truncated"] == (not r["finished"]) for r in rows)
    assert all(r["truncated"] for r in rows if r["n_tokens"] == 3) and any(r["truncated"] for r in rows)
    o = res.summary["overall"]
    assert o["n_truncated"] == sum(r["truncated"] for r in rows)
    assert o["n_counted"] == len(rows)  # flagged, still counted by default (the fixed judge finds all coherent)
    res = evaluate(tiny, parse_questions("- {id: a, paraphrases: [Tell me a story.]}"), n_samples=4,
                   judge=_FixedJudge(), max_new_tokens=3, progress=False, thresholds=Thresholds(include_truncated=False))
    o = res.summary["overall"]
    assert o["n_counted"] == sum(not r["truncated"] for r in res.rows)
