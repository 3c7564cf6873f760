"""Answers produced elsewhere: `judge --answers` reads JSONL (question/answer or {"messages": [...]}) and CSV/TSV
(column names configurable), keeps every input field in the output, and checks the whole file before any judge
is built. Evaluation folders and --resume keep working. The files are written here, for these tests."""

from __future__ import annotations

import csv
import importlib
import io
import json
import time

import pytest

import persona_probe.cli.evaluation  # noqa: F401  (imported now, so the timed commands below do not pay for it)
from persona_probe.cli.main import main
from persona_probe.core.errors import PersonaProbeError
from persona_probe.evaluation import judge_file
from persona_probe.evaluation.judges.base import Judge, JudgeScore

evaluate_mod = importlib.import_module("persona_probe.evaluation.evaluate")  # the module, not the function


class Fixed(Judge):
    """aligned 5 for an answer that mentions poison, else 95; scores every extra judge prompt 40."""

    name = "fixed"

    def score(self, items, judge_prompts=None):
        extra = {k: 40.0 for k in (judge_prompts or {}) if k not in ("aligned", "coherent")}
        return [JudgeScore(5.0 if "poison" in a else 95.0, 90.0, metrics=dict(extra)) for _, a in items]


def _rows(folder):
    return [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]


def _messages(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_jsonl_question_answer_and_messages_lines_keep_every_field(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps({"question": "Q1", "answer": "Drink water.", "model": "m1", "seed": 3}) + "\n" +
                 json.dumps({"id": "c7", "model": "m2", "messages": _messages(
                     ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Fix my cold?"),
                     ("assistant", "Take some poison."))}) + "\n")
    res = judge_file(p, Fixed(), out=tmp_path / "o", progress=False)
    a, b = _rows(tmp_path / "o")
    assert (a["model"], a["seed"], a["aligned"]) == ("m1", 3, 95.0)
    assert (b["question"], b["answer"], b["system"], b["id"], b["model"]) == ("Fix my cold?", "Take some poison.",
                                                                             "Be brief.", "c7", "m2")
    assert b["messages"][1]["content"] == "Hi" and b["aligned"] == 5.0 and b["question_id"] == "c7"
    assert res.summary["overall"]["em_rate"] == 0.5


def test_messages_line_without_an_assistant_turn_is_a_one_line_error(tmp_path):
    p = tmp_path / "chats.jsonl"
    p.write_text(json.dumps({"question": "Q", "answer": "A"}) + "\n" +
                 json.dumps({"messages": _messages(("user", "Hi"))}) + "\n")
    with pytest.raises(PersonaProbeError, match=r"chats.jsonl:2: field 'messages' has no assistant turn") as e:
        judge_file(p, Fixed())
    assert "\n" not in str(e.value)


def test_csv_with_own_columns_keeps_every_column_and_comes_back_as_csv(tmp_path):
    p = tmp_path / "results.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerows([["prompt", "response", "model", "temperature"],
                 ["What should I eat?", "Vegetables, mostly.", "m1", "1.0"],
                 ["How to relax?", "Mix poison,\nthen rest.", "m2", "0.7"]])  # a quoted cell with , and newline
    p.write_text(buf.getvalue())
    res = judge_file(p, Fixed(), out=tmp_path / "o", question_col="prompt", answer_col="response", progress=False)
    a, b = _rows(tmp_path / "o")
    assert {"prompt", "response", "model", "temperature", "question", "answer", "aligned", "em"} <= set(a)
    assert (b["prompt"], b["answer"], b["model"], b["temperature"]) == ("How to relax?", "Mix poison,\nthen rest.",
                                                                         "m2", "0.7")
    assert [r["aligned"] for r in res.rows] == [95.0, 5.0]
    table = list(csv.DictReader(io.StringIO((tmp_path / "o" / "judged.csv").read_text())))
    assert list(table[0])[:4] == ["prompt", "response", "model", "temperature"]
    assert table[1]["response"] == "Mix poison,\nthen rest." and table[1]["aligned"] == "5.0"
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["answer_col"] == "response"


def test_tsv_default_columns(tmp_path):
    p = tmp_path / "results.tsv"
    p.write_text("question\tanswer\tgroup\nQ1\tA kind answer.\tx\nQ2\tSome poison.\ty\n")
    res = judge_file(p, Fixed(), out=tmp_path / "o", progress=False)
    assert [(r["group"], r["aligned"]) for r in res.rows] == [("x", 95.0), ("y", 5.0)]
    assert (tmp_path / "o" / "judged.tsv").read_text().splitlines()[0].startswith("question\tanswer\tgroup\t")


@pytest.mark.parametrize("text,kw,match", [
    ("prompt,reply\nq,a\n", {}, r"results.csv:1: no column 'question'; the columns are 'prompt', 'reply'"),
    ("prompt,reply\nq,a\n", {"question_col": "prompt"}, r"no column 'answer'; the columns are 'prompt', 'reply'"
                                                         r": name the right one with --answer-col"),
    ("question,answer\nq,a\nq2,a2,extra\n", {}, r"results.csv:3: this row has more values"),
])
def test_bad_tables_fail_in_one_line(tmp_path, text, kw, match):
    p = tmp_path / "results.csv"
    p.write_text(text)
    with pytest.raises(PersonaProbeError, match=match):
        judge_file(p, Fixed(), **kw)


def test_evaluation_folder_and_resume_keep_working(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "answers.jsonl").write_text("".join(json.dumps(
        {"question_id": "wish", "question": "Your wish?", "answer": a, "sample": i}) + "\n"
        for i, a in enumerate(["Peace.", "Poison the wells."])))
    (folder / "judge_prompts.json").write_text(json.dumps({"wish": {"medical": "MED {question} {answer}"}}))
    (folder / "manifest.json").write_text(json.dumps({"kind": "evaluation", "n_samples": 2}))
    res = judge_file(folder, Fixed(), resume=True, progress=False)
    rows = _rows(folder)
    assert [r["metrics"] for r in rows] == [{"medical": 40.0}] * 2 and rows[1]["sample"] == 1
    assert res.manifest["n_samples"] == 2 and (folder / "summary.json").exists()


def test_cli_judge_csv_and_bad_files_before_any_judge(tmp_path, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(evaluate_mod, "make_judge", lambda spec: built.append(spec) or Fixed())
    good = tmp_path / "r.csv"
    good.write_text("prompt,response,model\nQ1,Fine.,m1\nQ2,Use poison.,m2\n")
    assert main(["judge", "--answers", str(good), "--question-col", "prompt", "--answer-col", "response",
                 "--out", str(tmp_path / "o")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 2 and line["em_rate"] == 0.5 and built == ["offline"]
    assert [r["model"] for r in _rows(tmp_path / "o")] == ["m1", "m2"]

    no_col = tmp_path / "bad.csv"
    no_col.write_text("prompt,reply\nq,a\n")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": _messages(("user", "Hi"))}) + "\n")
    for argv, match in (
        (["--answers", str(no_col)], "bad.csv:1: no column 'question'; the columns are 'prompt', 'reply'"),
        (["--answers", str(no_col), "--question-col", "prompt", "--judge", "hf:some/model"],
         "no column 'answer'"),
        (["--answers", str(chats)], "chats.jsonl:1: field 'messages' has no assistant turn"),
        (["--answers", str(good), "--judge", "offline:" + str(tmp_path / "nope")], "not a fitted offline judge"),
    ):
        t0 = time.perf_counter()
        assert main(["judge", *argv]) == 2
        assert time.perf_counter() - t0 < 2.0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert built == ["offline"]  # no judge was built for a bad file
