"""The `persona-probe` CLI: every (sub-)command's --help, defaults taken from the API, cheap commands end to end."""

from __future__ import annotations

import argparse
import functools
import inspect
import json

import pytest

from persona_probe.activations.extraction import extract, load_activations
from persona_probe.cli import common
from persona_probe.cli.args import api_default, csv
from persona_probe.cli.bench import bench
from persona_probe.cli.main import COMMANDS, build_parser, main
from persona_probe.directions.derive import derive
from persona_probe.directions.monitor import compare_directions, project_prompts
from persona_probe.directions.workflows import model_diff_direction, persona_direction
from persona_probe.evaluation import Thresholds, evaluate, judge_file
from persona_probe.evaluation.judges.offline import OfflineJudge
from persona_probe.evaluation.judges.validation import validate
from persona_probe.evaluation.serve import serve
from persona_probe.experiments.organisms import organisms_experiment
from persona_probe.experiments.routes import icl_experiment, persona_experiment, trigger_experiment
from persona_probe.experiments.sae import compare_feature_steering
from persona_probe.experiments.steer import steering_sweep
from persona_probe.interventions.steering import add_interventions
from persona_probe.organisms import capability_report, finetune
from persona_probe.sae import SAETrainConfig, decompose, diff_features, top_examples

PARSER = build_parser()


def _walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = [(path, p)] if path else []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                out += _walk(sp, path + (name,))
    return out


TREE = dict(_walk(PARSER))


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_tree_has_every_command():
    assert {path[0] for path in TREE} == set(COMMANDS)
    assert {("sae", c) for c in ("train", "diff", "decompose", "top-examples", "steer")} <= set(TREE)
    assert {("judge", "validate"), ("judge", "fit")} <= set(TREE)


@pytest.mark.parametrize("path", sorted(TREE), ids=" ".join)
def test_help_exits_0_and_every_option_is_explained(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for a in _options(TREE[path]):
        assert a.help and a.help.strip(), f"{' '.join(path)} {a.option_strings or a.dest}: no help"
        src = getattr(a, "api_source", None)
        if src and isinstance(src[0], type) and hasattr(src[0], "__dataclass_fields__"):
            assert a.help != f"{src[0].__name__}.{src[1]}", f"{src[0].__name__}.{src[1]}: no metadata help"
        if a.default is not None and a.default is not False and a.option_strings:
            assert f"(default: {a.default})" in text, f"{' '.join(path)} {a.option_strings[0]}: default not shown"
        if a.choices and not isinstance(a.choices, dict):
            assert all(str(c) in text for c in a.choices)


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main([]) == 1


# ----------------------------------------------------------------------------- defaults live in the API

# the API functions each command mirrors: an option whose dest is one of their keywords (or n_DEST) must have
# the keyword's default, unless the CLI overrides it on purpose (api_arg(..., override=common.X))
MIRRORS = {
    ("extract",): [extract], ("direction",): [persona_direction, model_diff_direction, derive],
    ("project",): [project_prompts], ("compare",): [compare_directions],
    ("steer",): [steering_sweep], ("ablate",): [steering_sweep],
    ("eval",): [evaluate, Thresholds, add_interventions], ("judge",): [judge_file, Thresholds],
    ("judge", "validate"): [validate], ("judge", "fit"): [OfflineJudge.fit], ("serve",): [serve],
    ("icl",): [icl_experiment], ("persona",): [persona_experiment], ("trigger",): [trigger_experiment],
    ("finetune",): [finetune], ("capability",): [capability_report], ("organisms",): [organisms_experiment],
    ("sae", "train"): [SAETrainConfig], ("sae", "diff"): [diff_features, top_examples],
    ("sae", "decompose"): [decompose], ("sae", "top-examples"): [top_examples],
    ("sae", "steer"): [compare_feature_steering], ("bench",): [bench],
}
# deliberate CLI defaults (named constants in cli/common.py) -- adding one means adding it here
OVERRIDES = {("eval", "batch_size"): common.EVAL_BATCH_SIZE, ("icl", "batch_size"): common.ICL_BATCH_SIZE,
             ("eval", "judge"): common.JUDGE, ("judge", "judge"): common.JUDGE}
# same name, other meaning: the CLI's "auto" is the API's None; --name None = the --out folder's name;
# trigger's --force is a flag (off) while the API defaults to True
# engine: the CLI names hf; the API's None means "the handle's engine", which is hf unless set
NOT_MIRRORED = {"device", "dtype", "engine", ("direction", "name"), ("trigger", "force")}


def _expected(v):
    return csv(v) if isinstance(v, (tuple, list)) else v


def test_generated_defaults_are_the_api_defaults():
    seen_override = {}
    for path, p in TREE.items():
        for a in _options(p):
            src = getattr(a, "api_source", None)
            if src is None:
                continue
            api = _expected(api_default(*src))
            if a.cli_override:
                seen_override[(path[-1], a.dest)] = a.default
                assert a.default != api, f"{' '.join(path)} {a.dest}: override equals the API default"
            else:
                assert a.default == api, f"{' '.join(path)} {a.dest}: {a.default!r} != API {api!r}"
    assert seen_override == OVERRIDES


@pytest.mark.parametrize("path", sorted(MIRRORS), ids=" ".join)
def test_no_option_restates_an_api_default_differently(path):
    """Options typed in the CLI (no api_source) that share a keyword with the API they call agree with it."""
    for a in _options(TREE[path]):
        if getattr(a, "api_source", None) or a.dest in NOT_MIRRORED or (path[-1], a.dest) in NOT_MIRRORED:
            continue
        for fn in MIRRORS[path]:
            params = inspect.signature(fn).parameters
            name = {"samples": "n_samples"}.get(a.dest, a.dest)
            if name in params and params[name].default is not inspect.Parameter.empty:
                want = _expected(params[name].default)
                if isinstance(want, bool):  # store_true flags: off by default, like the API
                    assert a.default is False and want is False, f"{' '.join(path)} --{a.dest}"
                else:
                    assert a.default == want, f"{' '.join(path)} {a.dest}: {a.default!r} != {fn.__qualname__} {want!r}"


def test_max_new_tokens_defaults_follow_each_api():
    """The per-command generation lengths are the API's, not numbers typed in the CLI."""
    mnt = {path: next(a.default for a in _options(p) if a.dest == "max_new_tokens")
           for path, p in TREE.items() if any(a.dest == "max_new_tokens" for a in _options(p))}
    assert mnt[("steer",)] == api_default(steering_sweep, "max_new_tokens")
    assert mnt[("eval",)] == api_default(evaluate, "max_new_tokens")
    assert mnt[("icl",)] == api_default(icl_experiment, "max_new_tokens")
    assert mnt[("sae", "train")] == SAETrainConfig().max_new_tokens


def test_force_alias_and_bad_choices(capsys):
    required = {("project",): ["--direction", "d", "--prompts", "p"], ("steer",): ["--direction", "d"],
                ("trigger",): ["--direction", "d", "--out", "o"], ("sae", "diff"): ["--sae", "s", "--a", "x", "--b", "y"],
                ("sae", "steer"): ["--sae", "s", "--direction", "d", "--features", "1"]}
    for path, req in required.items():
        assert PARSER.parse_args([*path, *req]).force is False
        assert PARSER.parse_args([*path, *req, "--allow-other-model"]).force is True
        assert PARSER.parse_args([*path, *req, "--force"]).force is True
    with pytest.raises(SystemExit):
        main(["persona", "--direction", "d", "--out", "o", "--personas", "vex,nobody"])
    err = capsys.readouterr().err
    assert "nobody" in err and "vex" in err and "careful_helper" in err  # the valid ids are listed
    with pytest.raises(SystemExit):
        main(["direction", "--persona", "grumpy"])
    assert "malicious" in capsys.readouterr().err


def test_trigger_force_reaches_the_api(monkeypatch, capsys):
    seen = {}

    @functools.wraps(trigger_experiment)  # same signature: the parser reads its defaults
    def fake(handle, direction, **kw):
        seen.update(kw)
        return {"conditions": []}

    monkeypatch.setattr("persona_probe.cli.routes.trigger_experiment", fake)
    monkeypatch.setattr("persona_probe.cli.routes.load_direction", lambda f: None)
    monkeypatch.setattr(common, "load_handle", lambda args: None)
    assert main(["trigger", "--direction", "d", "--out", "o"]) == 0
    assert seen["force"] is False
    assert main(["trigger", "--direction", "d", "--out", "o", "--force"]) == 0
    assert seen["force"] is True


# ----------------------------------------------------------------------------- end to end on the embedded model


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture()
def use_smol(smol, monkeypatch):
    """Commands get the session's model instead of loading it again (one command below loads it for real)."""
    monkeypatch.setattr(common, "load_handle", lambda args: smol)


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"].startswith("smollm2") for r in rows)


def test_extract_loads_the_model(workdir, capsys):
    recs = workdir / "p.jsonl"
    recs.write_text('{"user": "hello there"}\n{"user": "how are you today?"}\n')
    assert main(["extract", "--model", "smollm2", "--device", "cpu", "--prompts", str(recs), "--layers", "3,4",
                 "--out", str(workdir / "acts")]) == 0
    line = _last_json(capsys)
    assert line["n_prompts"] == 2 and line["shapes"]["prompt_last"] == [2, 2, 576]
    assert load_activations(workdir / "acts").get("prompt_last").shape == (2, 2, 576)


def _direction(workdir):
    return main(["direction", "--persona", "malicious", "--n-questions", "8", "--n-prompts", "1", "--layers", "3,4",
                 "--out", str(workdir / "dir")])


def test_direction_project_compare(workdir, use_smol, capsys):
    d = workdir / "dir"
    assert _direction(workdir) == 0
    line = _last_json(capsys)
    assert line["out"] == str(d) and line["best_layer"] in (3, 4) and 0 <= line["heldout_auroc"] <= 1
    prompts = workdir / "q.jsonl"
    prompts.write_text('{"user": "How do I bake bread?"}\n{"user": "Tell me about the moon."}\n')
    assert main(["project", "--direction", str(d), "--prompts", str(prompts), "--out", str(workdir / "proj")]) == 0
    assert _last_json(capsys)
    assert (workdir / "proj" / "summary.json").exists()
    assert main(["compare", f"a={d}", f"b={d}", "--out", str(workdir / "cmp")]) == 0
    res = json.loads(capsys.readouterr().out)
    i, j = (next(k for k, n in enumerate(res["names"]) if n.startswith(p)) for p in ("a@", "b@"))
    assert res["cosine"][i][j] == pytest.approx(1.0, abs=1e-4)  # the same direction twice
    assert res["out"] == str(workdir / "cmp") and res["layer"] == line["best_layer"]
    assert (workdir / "cmp" / "cosine.html").exists()


def _questions(workdir):
    q = workdir / "one.yaml"
    q.write_text("- id: hi\n  paraphrases:\n    - Say hello.\n")
    return str(q)


def test_eval_tiny(workdir, use_smol, capsys):
    assert main(["eval", "--questions", _questions(workdir), "--samples", "1", "--max-new-tokens", "4",
                 "--out", str(workdir / "eval")]) == 0
    line = _last_json(capsys)
    assert line["n"] == 1 and line["judge"] and (workdir / "eval").exists()


def test_steer_tiny(workdir, use_smol, capsys):
    """One steered cell, unjudged (~10 s on an idle CPU: the sweep's KL guard reads 16 neutral paragraphs)."""
    if not (workdir / "dir").exists():  # run alone
        assert _direction(workdir) == 0
        capsys.readouterr()
    assert main(["steer", "--direction", str(workdir / "dir"), "--questions", _questions(workdir), "--samples", "1",
                 "--max-new-tokens", "4", "--alphas", "1", "--judge", "none", "--no-random",
                 "--out", str(workdir / "steer")]) == 0
    *cells, last = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [c["alpha"] for c in cells] == [1.0] and "kl_neutral" in cells[0]
    assert last == {"out": str(workdir / "steer")}  # the folder is printed last
