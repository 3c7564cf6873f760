"""The experiments end to end on tiny settings: typed results that serialise to the JSON on disk, and every
built-in pipeline config loads."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from persona_probe import (
    PersonaProbeError,
    RouteResult,
    SweepResult,
    cross_route,
    evaluate,
    icl_experiment,
    load_config,
    persona_direction,
    persona_experiment,
    steering_sweep,
    trigger_experiment,
)
from persona_probe.experiments.routes import load_route_result

TINY = dict(questions="builtin:core", judge="offline", max_new_tokens=6, seed=0)


@pytest.fixture(scope="module")
def direction(smol, tmp_path_factory):
    return persona_direction(smol, "malicious", layers="14:16", n_questions=6, n_prompts=1, progress=False,
                             out=tmp_path_factory.mktemp("dir"))


def test_every_builtin_config_loads():
    names = [p.stem for p in (Path(str(resources.files("persona_probe"))) / "configs").glob("*.yaml")]
    assert names
    for n in names:
        cfg = load_config(f"builtin:{n}")
        assert cfg.name and cfg.steering.alphas


def test_config_errors_name_the_key():
    with pytest.raises(PersonaProbeError, match=r"'steering.samples'"):
        load_config(overrides={"steering": {"samples": "two"}})
    with pytest.raises(PersonaProbeError, match=r"unknown config key 'direction.nope'.*known keys"):
        load_config(overrides={"direction": {"nope": 1}})


def test_evaluate_end_to_end(smol, tmp_path):
    res = evaluate(smol, "builtin:core", n_samples=1, max_new_tokens=6, judge="offline", out=tmp_path,
                   progress=False)
    o = res.summary["overall"]
    assert o["n"] == len(res.rows) > 0 and 0 <= (o["em_rate"] or 0) <= 1
    saved = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in saved] == [r["answer"] for r in res.rows]


def test_sweep_result_is_typed_and_matches_disk(smol, direction, tmp_path):
    res = steering_sweep(smol, direction, alphas=[0.0, 1.0], n_samples=1, out=tmp_path, progress=False, **TINY)
    assert isinstance(res, SweepResult) and res.cells[0].alpha == 0.0 and res["cells"][0]["alpha"] == 0.0
    disk = json.loads((tmp_path / "cells.json").read_text())
    assert disk == json.loads(json.dumps(res.to_dict(exclude=("rows",))))
    assert {c["condition"] for c in disk["cells"]} == {"direction", "random"}
    assert "em_rate" in disk["cells"][0] and len(res.rows) == sum(c.n for c in res.cells)


def test_routes_end_to_end(smol, direction, tmp_path):
    icl = icl_experiment(smol, direction, ks=(0, 2), variants=("none", "safety"), draws=1, n_samples=1,
                         out=tmp_path / "icl", **TINY)
    assert isinstance(icl, RouteResult) and icl.route == "icl"
    assert {(c["k"], c["variant"]) for c in icl.conditions} == {(0, "none"), (2, "none"), (0, "safety"),
                                                                 (2, "safety")}
    assert set(icl.induced) == {"none", "safety"} and all(v.shape == (smol.d_model,) for v in icl.induced.values())
    assert json.loads((tmp_path / "icl" / "result.json").read_text()) == json.loads(json.dumps(icl.to_dict()))

    per = persona_experiment(smol, direction, personas=["vex", "hhh"], n_samples=1,
                             out=tmp_path / "persona", **TINY)
    assert [c["persona"] for c in per.conditions] == ["vex", "hhh"]

    trig = trigger_experiment(smol, direction, n_samples=1, out=tmp_path / "trigger", **TINY)
    assert [c["condition"] for c in trig.conditions] == ["trigger-off", "trigger-on"] and "vs_off" in trig.conditions[1]

    reloaded = load_route_result(tmp_path / "icl")
    assert reloaded.to_dict() == icl.to_dict() and set(reloaded.induced) == set(icl.induced)
    cr = cross_route(direction, [reloaded, per, trig], out=tmp_path / "cross")
    assert cr["names"][0] == "character (persona)" and (tmp_path / "cross" / "cosine.html").exists()
