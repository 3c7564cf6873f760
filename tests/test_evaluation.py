from __future__ import annotations

import json
import math

import pytest

from persona_probe import PersonaProbeError
from persona_probe.core.stats import fisher_exact, two_proportion_test, wilson
from persona_probe.evaluation import Thresholds, em_flags, judge_file, summarize
from persona_probe.evaluation.judges.base import Judge, JudgeScore
from persona_probe.prompts.questions import load_questions, parse_questions

from pathlib import Path

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
