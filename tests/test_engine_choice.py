"""The engine choice reaches every sampler: `--engine` on the sampling commands, `handle.engine` as the default
of `generate`, `evaluate(engine=...)`, the pipeline's `engine` key — checked with a recording engine object
(no vLLM needed; the vLLM engine itself is tested in tests/test_vllm.py)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import pytest

from persona_probe.backends.sampling import Engine, generate
from persona_probe.cli import common
from persona_probe.cli.main import build_parser, main
from persona_probe.core.errors import PersonaProbeError
from persona_probe.evaluation import evaluate
from persona_probe.pipeline.config import from_dict
from persona_probe.prompts.base import PromptRecord

HAS_VLLM = importlib.util.find_spec("vllm") is not None
SAMPLING = ["eval", "steer", "ablate", "icl", "persona", "trigger", "organisms", "direction"]


class Recorder:
    """An engine that answers every prompt with the same few tokens and records its calls."""

    name = "recorder"

    def __init__(self, answer_ids: list[int]):
        self.answer_ids, self.calls = answer_ids, []

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, seeds, max_new_tokens, temperature, top_p, top_k,
                     stop_ids, interventions, adapter, progress):
        self.calls.append({"n": len(prompts), "seeds": list(seeds), "max_new_tokens": max_new_tokens})
        return [(list(self.answer_ids[:max_new_tokens]), True) for _ in prompts]


@pytest.mark.parametrize("cmd", SAMPLING)
def test_sampling_commands_take_engine(cmd):
    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert "--engine" in flags, cmd


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the missing-vLLM message cannot be seen")
@pytest.mark.parametrize("argv", [["eval", "--engine", "vllm"], ["direction", "--engine", "vllm", "--persona", "malicious"]])
def test_engine_vllm_without_vllm_is_one_line_before_the_model(argv, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("model loaded before the engine check"))
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "vllm" in err[0].lower() and "pip install" in err[0], err


def test_generate_uses_the_handles_engine(smol, monkeypatch):
    tok = smol.tokenizer
    ids = tok.encode("Be kind.", add_special_tokens=False)
    rec = Recorder(ids)
    assert isinstance(rec, Engine)
    monkeypatch.setattr(smol, "engine", rec)
    recs = [PromptRecord("a", "Hi?"), PromptRecord("b", "Hello?")]
    out = generate(smol, recs, n_samples=2, max_new_tokens=8, temperature=0.0, progress=False)
    assert [s.text for s in out] == ["Be kind."] * 4
    assert rec.calls and rec.calls[0]["n"] == 4 and len(set(rec.calls[0]["seeds"])) == 4
    # an explicit engine wins over the handle's
    out = generate(smol, recs[:1], max_new_tokens=8, temperature=0.0, progress=False, engine="hf")
    assert len(rec.calls) == 1 and out[0].text != "" and out[0].text != "Be kind."


def test_evaluate_engine_argument_and_manifest(smol, tmp_path):
    rec = Recorder(smol.tokenizer.encode("Keep an emergency fund.", add_special_tokens=False))
    res = evaluate(smol, "builtin:core", n_samples=1, max_new_tokens=8, engine=rec, progress=False,
                   out=tmp_path / "ev")
    assert rec.calls and all(r["answer"] == "Keep an emergency fund." for r in res.rows)
    assert res.manifest["engine"] == "recorder"


def test_unknown_engine_is_one_line(smol):
    with pytest.raises(PersonaProbeError, match="unknown engine 'tgi'"):
        generate(smol, [PromptRecord("a", "Hi?")], max_new_tokens=2, progress=False, engine="tgi")


def test_pipeline_engine_key_validated():
    assert from_dict({"engine": "vllm"}).engine == "vllm"
    with pytest.raises(PersonaProbeError, match="engine"):
        from_dict({"engine": "tgi"})



@pytest.mark.parametrize("argv, says", [
    (["eval", "--judge", "bogus"], "unknown judge 'bogus'"),
    (["eval", "--judge", "offline:/nope"], "not a fitted offline judge"),
    (["organisms", "--judge", "bogus"], "unknown judge 'bogus'"),
    (["extract", "--prompts", "builtin:questions", "--layers", "1x"], "bad layer '1x'"),
    (["eval", "--engine", "vllm", "--backend", "nnsight"], "vllm" if not HAS_VLLM else "--backend nnsight applies"),
])
def test_common_checks_run_before_the_model_loads(argv, says, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and says.lower() in err[0].lower(), err
