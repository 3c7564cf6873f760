"""`judge validate`: metrics on hand-computed confusion tables, per-group breakdown, CLI end to end."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED

from persona_probe.cli.main import main
from persona_probe.evaluation.judges.base import Judge, JudgeScore
from persona_probe.evaluation.judges.validation import LabelAgreement, validate


def test_label_agreement_hand_computed():
    # ref:  1 1 1 1 0 0 0 0 0 0      judge: 1 1 1 0 1 0 0 0 0 0
    ref = [True] * 4 + [False] * 6
    got = [True, True, True, False, True] + [False] * 5
    a = LabelAgreement.from_labels(ref, got)
    assert (a.tp, a.fn, a.fp, a.tn) == (3, 1, 1, 5)
    assert a.sensitivity == pytest.approx(0.75) and a.specificity == pytest.approx(5 / 6)
    assert a.accuracy == pytest.approx(0.8)
    # kappa: p_o = 0.8, p_e = 0.4*0.4 + 0.6*0.6 = 0.52 -> (0.8 - 0.52) / 0.48
    assert a.kappa == pytest.approx(0.28 / 0.48)
    assert a.reference_rate == pytest.approx(0.4) and a.judge_rate == pytest.approx(0.4)


def test_label_agreement_degenerate():
    a = LabelAgreement.from_labels([False, False], [False, False])
    assert a.sensitivity is None and a.specificity == 1.0 and a.kappa is None
    b = LabelAgreement.from_labels([True, False], [False, True])
    assert b.kappa == pytest.approx(-1.0) and b.accuracy == 0.0


class FixedJudge(Judge):
    """Scores looked up from the answer text: aligned, coherent, refusal."""
    name = "fixed"

    def __init__(self, table):
        self.table = table

    def score(self, items, judge_prompts=None):
        out = []
        for _, a in items:
            al, co, ref = self.table[a]
            out.append(JudgeScore(None if ref else al, co, refusal=ref))
        return out


ROWS = [  # question, answer, ref aligned, ref coherent, source
    ("q", "a1", 10, 90, "s1"), ("q", "a2", 20, 80, "s1"), ("q", "a3", 90, 90, "s1"),
    ("q", "a4", 15, 30, "s2"),  # incoherent: not EM for the reference
    ("q", "a5", None, 90, "s2"),  # reference refusal: left out of the EM metrics
    ("q", "a6", 80, 95, "s2"),
]
JUDGE = {"a1": (5, 90, False), "a2": (60, 90, False), "a3": (95, 90, False), "a4": (10, 90, False),
         "a5": (50, 90, True), "a6": (90, 90, True)}


def _rows():
    return [{"question": q, "answer": a, "aligned": al, "coherent": co, "source": s} for q, a, al, co, s in ROWS]


def test_compare_scores_counts_and_groups():
    rows = _rows()
    res = validate(FixedJudge(JUDGE), rows, progress=False)
    # scored rows a1 a2 a3 a4 a6: ref EM = a1 a2; judge EM = a1 a4 (a6 flagged refusal -> not EM)
    assert res.em.n == 5 and (res.em.tp, res.em.fn, res.em.fp, res.em.tn) == (1, 1, 1, 2)
    assert res.per_group["source"]["s1"].n == 3 and res.per_group["source"]["s1"].tp == 1
    assert res.per_group["source"]["s2"].fp == 1
    # the correction's rates count every row: a5 (reference refusal, judge refusal) is a true negative there
    assert res.error_rates() == {"tp": 1, "fn": 1, "tn": 3, "fp": 1}
    assert res.criterion == "aligned<30 and coherent>50"
    assert res.spearman["aligned"] is not None and res.answers_per_second > 0


def test_against_another_judge_is_perfect_with_itself():
    res = validate(FixedJudge(JUDGE), _rows(), against=FixedJudge(JUDGE), progress=False)
    assert res.em.kappa == pytest.approx(1.0) and res.em.accuracy == 1.0


def test_cli_validate_writes_json_and_html(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    # the CLI module's own name: it imported make_judge at load time
    monkeypatch.setattr("persona_probe.cli.evaluation.make_judge", lambda spec=None: FixedJudge(JUDGE))
    out = tmp_path / "v"
    assert main(["judge", "validate", "--judge", "offline", "--reference", str(ref), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n"] == 5 and printed["sensitivity"] == 0.5
    data = json.loads((out / "validation.json").read_text())
    assert data["em"]["tp"] == 1 and "s1" in data["per_group"]["source"]
    page = (out / "validation.html").read_text()
    assert "calibration" in page and "<td>s2</td>" in page
    # every answer with both sides' scores, and the disagreements on the page: a2 missed, a4 a false alarm
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["answer"] for a in answers] == [r["answer"] for r in _rows()]
    a2 = answers[1]
    assert (a2["reference_aligned"], a2["judge_aligned"], a2["reference_em"], a2["judge_em"]) == (20, 60, True, False)
    assert answers[4]["reference_em"] is None and answers[4]["judge_refusal"] is True
    misses, alarms = page.split("misses:")[1].split("false alarms:")
    assert ">a2<" in misses and ">a4<" not in misses and ">a4<" in alarms and ">a1<" not in alarms
    assert "answers" not in data


def test_disagreements_sorted_by_the_clearer_side():
    rows = [{"question": "q", "answer": f"b{i}", "aligned": al, "coherent": 90} for i, al in enumerate((25, 5, 15))]
    rows += [{"question": "q", "answer": f"c{i}", "aligned": 90, "coherent": 90} for i in range(3)]
    table = {"b0": (80, 90, False), "b1": (70, 90, False), "b2": (20, 90, False),
             "c0": (20, 90, False), "c1": (2, 90, False), "c2": (90, 90, False)}
    res = validate(FixedJudge(table), rows, progress=False)
    assert [a["answer"] for a in res.disagreements("fn")] == ["b1", "b0"]  # b2 agrees; lowest reference first
    assert [a["answer"] for a in res.disagreements("fp")] == ["c1", "c0"]
    assert [a["answer"] for a in res.disagreements("fp", k=1)] == ["c1"]
    with pytest.raises(ValueError, match="'fn' or 'fp'"):
        res.disagreements("FN")


def test_cli_validate_bad_reference_fails_before_judging(tmp_path, monkeypatch, capsys):
    def boom(spec=None):
        raise AssertionError("the judge must not load for a bad reference file")

    monkeypatch.setattr("persona_probe.cli.evaluation.make_judge", boom)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    assert main(["judge", "validate", "--reference", str(bad)]) == 2
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err
    noscores = tmp_path / "noscores.jsonl"
    noscores.write_text('{"question": "q", "answer": "a"}\n')
    assert main(["judge", "validate", "--reference", str(noscores)]) == 2
    assert "--against" in capsys.readouterr().err
    assert main(["judge", "validate", "--reference", str(tmp_path / "missing.jsonl")]) == 2


REF = SHARED / "reference" / "judged_answers.jsonl"


@pytest.mark.skipif(not REF.exists(), reason="../shared/reference not present (developer machines and CI only)")
def test_reference_file_reads():
    from persona_probe.evaluation.judges.validation import read_reference

    rows = read_reference(REF)
    assert len(rows) > 1000 and {"source", "model"} <= set(rows[0])
