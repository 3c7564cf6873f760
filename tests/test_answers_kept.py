"""No answer is ever lost: answers are on disk before judging, a judge that dies mid-run leaves them and the
judged-so-far, and `judge --answers DIR --resume` finishes without judging anything twice."""

from __future__ import annotations

import json
import threading

import pytest
from test_judges_openai import StubServer, completion

from persona_probe.cli.main import main
from persona_probe.core.errors import PersonaProbeError
from persona_probe.evaluation import PARTIAL, Thresholds, evaluate, judge_rows
from persona_probe.evaluation.judges.base import Judge, JudgeScore
from persona_probe.evaluation.judges.openai_judge import OpenAIJudge


class FlakyJudge(Judge):
    """Scores every answer 80/80; raises on call number `fail_on` (1-based), counting the items it scored."""
    name = "flaky"

    def __init__(self, fail_on: int | None = None):
        self.calls, self.scored, self.fail_on = 0, 0, fail_on

    def score(self, items, judge_prompts=None):
        self.calls += 1
        if self.calls == self.fail_on:
            raise PersonaProbeError("judge server went away")
        self.scored += len(items)
        return [JudgeScore(80.0, 80.0) for _ in items]


def _rows(n):
    return [{"question_id": f"q{i}", "question": f"question {i}", "answer": f"answer {i}"} for i in range(n)]


def test_judge_rows_checkpoint_resumes(tmp_path):
    rows = _rows(7)
    j = FlakyJudge(fail_on=3)
    with pytest.raises(PersonaProbeError):
        judge_rows(j, rows, Thresholds(), checkpoint=tmp_path, chunk=2)
    assert len((tmp_path / PARTIAL).read_text().splitlines()) == 4  # two chunks judged before the failure
    j2 = FlakyJudge()
    out = judge_rows(j2, rows, Thresholds(), checkpoint=tmp_path, chunk=2)
    assert j2.scored == 3 and all(r["aligned"] == 80.0 for r in out)
    # a different judge never reuses another judge's scores
    class Other(FlakyJudge):
        name = "other"

        def describe(self):
            return {"judge": "other"}
    j3 = Other()
    judge_rows(j3, rows, Thresholds(), checkpoint=tmp_path, chunk=2)
    assert j3.scored == 7


def test_answers_survive_a_judge_server_killed_mid_run(tiny, tmp_path, monkeypatch, capsys):
    def reply(body, n):
        if n == 6:  # the server dies after this reply: a real shutdown, later requests are refused
            srv.shutdown()  # (handlers run in their own threads: this waits for the serve loop only)
            srv.server_close()
        return 200, completion("85", {"85": 1.0})

    srv = StubServer(reply)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{port}/v1"
    monkeypatch.setenv("PERSONA_PROBE_HOME", str(tmp_path / "home"))
    out = tmp_path / "eval"
    judge = OpenAIJudge("stub-model", base_url=url, api_key="", backoff=0.001, max_retries=1, timeout=5,
                        concurrency=1)
    with pytest.raises(PersonaProbeError, match="--resume") as err:
        evaluate(tiny, "builtin:core", n_samples=1, max_new_tokens=3, judge=judge, out=out, progress=False)
    assert str(out / "answers.jsonl") in str(err.value)
    answers = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 16 and all("answer" in a for a in answers)  # every sampled answer kept
    assert not (out / "summary.json").exists()  # nothing half-written passes for a result

    # the server comes back on the same address; --resume judges only what is missing
    srv2 = StubServer(lambda body, n: (200, completion("85", {"85": 1.0})), port=port)
    threading.Thread(target=srv2.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        assert main(["judge", "--answers", str(out), "--resume", "--judge", "openai:stub-model"]) == 0
    finally:
        srv2.shutdown()
        srv2.server_close()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 16 and summary["overall"]["mean_aligned"] == pytest.approx(85.0)
    # two prompts (aligned, coherent) per answer; the 6 answered before the death came from the judge's cache
    assert srv2.request_count == 2 * 16 - 6
    assert not (out / PARTIAL).exists()
