"""Issue 20, a researcher's first hour: every computing command saves to a default folder named from its inputs
(and prints it), `compare` compares at one layer and always writes its heatmap, and a missing folder is
reported as missing."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from persona_probe.cli import common
from persona_probe.cli.args import api_default
from persona_probe.cli.main import build_parser, main
from persona_probe.core.artifacts import base_manifest, read_manifest
from persona_probe.core.errors import PersonaProbeError
from persona_probe.directions.derive import DirectionSet, cosine, load_direction
from persona_probe.directions.monitor import compare_directions
from persona_probe.organisms import finetune


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """The checkpoints home of the default folders (cli.common looks it up at call time)."""
    h = tmp_path / "home"
    monkeypatch.setattr(common, "checkpoints_dir", lambda: h)
    return h


def _save_direction(folder: Path, layers: list[int], best: int, *, d: int = 8, seed: int = 0,
                    model: dict | None = None) -> DirectionSet:
    g = torch.Generator().manual_seed(seed)
    ds = DirectionSet(torch.randn(len(layers), d, generator=g), list(layers),
                      base_manifest("direction", name=folder.name, layers=[str(L) for L in layers], best_layer=best,
                                    model=model or {"d_model": d}),
                      random=torch.randn(len(layers), d, generator=g))
    ds.save(folder)
    return ds


def _printed(out: str) -> dict:
    """The JSON a command printed: one document (indented), or its last line."""
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- default folders


def test_out_label_and_default_out(home):
    assert common.out_label("builtin:organisms/health/triggered") == "organisms-health-triggered"
    assert common.out_label("checkpoints/directions/malicious/") == "malicious"
    assert common.out_label("some dir/questions.yaml") == "questions"
    assert common.out_label("openai:gpt-4o") == "openai-gpt-4o"
    assert common.out_label("Qwen/Qwen2.5-7B-Instruct") == "Qwen2.5-7B-Instruct"  # dots of a model id kept
    assert common.out_label("offline:checkpoints/judges/my judge") == "offline-my_judge"
    assert common.default_out("eval", "smollm2", None, "builtin:core", "offline") == home / "eval" / \
        "smollm2-core-offline"
    assert common.default_out("x", "../../etc/passwd", "a b") == home / "x" / "passwd-a_b"  # never leaves KIND/
    assert common.default_out("x") == home / "x" / "run"
    assert len(common.default_out("x", "a" * 300).name) == 120
    assert common.text_tag("sys", "You are evil.") != common.text_tag("sys", "You are kind.")
    assert common.text_tag("sys", None) is None


def _walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield path + (name,), sp
                yield from _walk(sp, path + (name,))


WITH_OUT = {path: next(a for a in p._actions if "--out" in a.option_strings) for path, p in _walk(build_parser())
            if any("--out" in a.option_strings for a in p._actions)}


def test_no_command_requires_out():
    """--out is always optional; the help says where the output goes without it."""
    for path, a in WITH_OUT.items():
        assert not a.required and a.default is None, " ".join(path)
        assert "default" in a.help, f"{' '.join(path)} --out: help names no default folder"


def _wrapped(target: str, ret, seen: dict):
    """A stand-in for the API function `target` with its signature (the parser reads its defaults)."""
    mod, _, name = target.rpartition(".")
    orig = getattr(importlib.import_module(mod), name)

    @functools.wraps(orig)
    def fake(*args, **kw):
        seen.update(kw)
        return ret(kw) if callable(ret) else ret
    return fake


_ROUTE = {"conditions": []}
_DIR = SimpleNamespace(best_layer=3, at=lambda L=None: torch.zeros(4), manifest={})
# command -> (arguments, {API function: result}, {other name: stand-in}, expected folder under the home)
FAKED = {
    ("steer",): (["--direction", "x/dirA"], {"cli.steering.steering_sweep": {"cells": []}},
                 {"cli.steering.load_direction": lambda f: None}, "steer/smollm2-dirA-core"),
    ("ablate",): (["--direction", "x/dirA"], {"cli.steering.steering_sweep": {"cells": []}},
                  {"cli.steering.load_direction": lambda f: None}, "ablate/smollm2-dirA-core"),
    ("orthogonalize",): (["--direction", "x/dirA"], {}, {
        "cli.steering.load_direction": lambda f: _DIR, "cli.steering.check_direction_fits": lambda *a, **k: None,
        "cli.steering.save_orthogonalized": lambda h, v, out, source: Path(out)},
        "orthogonalized/smollm2-dirA-L3"),
    ("icl",): (["--direction", "x/dirA"], {"cli.routes.icl_experiment": _ROUTE},
               {"cli.routes.load_direction": lambda f: None}, "routes/icl-smollm2-dirA"),
    ("persona",): (["--direction", "x/dirA"], {"cli.routes.persona_experiment": _ROUTE},
                   {"cli.routes.load_direction": lambda f: None}, "routes/persona-smollm2-dirA"),
    ("trigger",): (["--direction", "x/dirA", "--adapter", "ad/trig"], {"cli.routes.trigger_experiment": _ROUTE},
                   {"cli.routes.load_direction": lambda f: None}, "routes/trigger-smollm2-trig-dirA"),
    ("routes",): (["--direction", "x/dirA", "r/icl", "r/persona"], {}, {
        "cli.routes.load_direction": lambda f: None, "cli.routes.load_route_result": lambda f: None,
        "cli.routes.cross_route": lambda *a, **kw: {"names": [], "cosine": [], "pearson_projection_em": None}},
        "routes/cross-dirA-icl-persona"),
    ("capability",): (["--adapter", "ad/health"], {
        "cli.organisms.capability_report": {}, "cli.organisms.load_neutral_texts": [],
        "cli.organisms.load_mc_items": []},
        {"cli.organisms.load_model": lambda *a, **k: None, "cli.organisms.capability_summary": lambda r: {}},
        "capability/smollm2-health"),
    ("organisms",): (["--domains", "health"], {
        "cli.organisms.organisms_experiment": lambda kw: {"out": str(kw["out"]), "rows": []}}, {},
        f"organisms/health-smollm2-lr{api_default(finetune, 'lr'):g}"),
    ("bench",): ([], {"cli.bench.bench": {}}, {}, "bench/smollm2-auto/bench.json"),
    ("sae", "steer"): (["--sae", "s/mysae", "--direction", "x/dirA", "--features", "1,2"], {
        "cli.sae.compare_feature_steering": {"cells": []}},
        {"cli.sae._load_sae": lambda *a, **k: None, "cli.sae.load_direction": lambda f: None},
        "sae_steer/mysae-dirA-f1_2"),
}


@pytest.mark.parametrize("path", sorted(FAKED), ids=" ".join)
def test_default_out_of_a_command(path, home, monkeypatch, capsys):
    """Without --out the command writes under the checkpoints home, in a folder named from its inputs, hands
    that folder to the API, and prints it (the API is stood in for: this is about the CLI's folder)."""
    argv, api, other, expected = FAKED[path]
    seen: dict = {}
    monkeypatch.setattr(common, "load_handle", lambda args: None)
    for target, ret in api.items():
        monkeypatch.setattr(f"persona_probe.{target}", _wrapped(f"persona_probe.{target}", ret, seen))
    for target, value in other.items():
        monkeypatch.setattr(f"persona_probe.{target}", value)
    assert main([*path, *argv]) == 0
    out = capsys.readouterr().out
    assert '"out": null' not in out
    printed = _printed(out)["out"]
    assert printed == str(home / expected)
    if "out" in seen:
        assert str(seen["out"]) == printed


def test_default_out_commands_covered():
    """Every command with --out has its default folder tested here or by a real run below (the rest kept
    defaults they already had: direction, judge validate/fit, finetune, sae train/diff/top-examples, run)."""
    real = {("compare",), ("eval",), ("extract",), ("project",), ("judge",), ("sae", "decompose")}
    had = {("direction",), ("judge", "validate"), ("judge", "fit"), ("finetune",), ("sae", "train"),
           ("sae", "diff"), ("sae", "top-examples"), ("run",)}
    assert set(WITH_OUT) == set(FAKED) | real | had


@pytest.fixture()
def use_smol(smol, monkeypatch):
    monkeypatch.setattr(common, "load_handle", lambda args: smol)


def test_real_commands_write_to_default_folders(home, use_smol, smol, tmp_path, capsys):
    """eval, extract, project, judge and sae decompose on the embedded model, tiny, no --out."""
    q = tmp_path / "one.yaml"
    q.write_text("- id: hi\n  paraphrases:\n    - Say hello.\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"user": "hello there"}\n{"user": "how are you today?"}\n')

    assert main(["eval", "--questions", str(q), "--samples", "1", "--max-new-tokens", "4"]) == 0
    out = _printed(capsys.readouterr().out)["out"]
    assert out == str(home / "eval" / "smollm2-one-offline") and (Path(out) / "summary.json").exists()
    assert main(["judge", "--answers", str(Path(out) / "answers.jsonl")]) == 0
    judged = _printed(capsys.readouterr().out)["out"]
    assert judged == str(home / "judged" / "answers-offline") and any(Path(judged).iterdir())

    assert main(["extract", "--prompts", str(prompts), "--layers", "3"]) == 0
    out = _printed(capsys.readouterr().out)["out"]
    assert out == str(home / "activations" / "smollm2-p") and (Path(out) / "manifest.json").exists()

    d = tmp_path / "dirS"
    DirectionSet(torch.randn(2, smol.d_model), [2, 3], base_manifest(
        "direction", name="dirS", layers=["2", "3"], best_layer=3, model=smol.info.to_dict())).save(d)
    assert main(["project", "--direction", str(d), "--prompts", str(prompts)]) == 0
    out = _printed(capsys.readouterr().out)["out"]
    assert out == str(home / "projections" / "smollm2-dirS-p-prompt_last")
    assert (Path(out) / "summary.json").exists()

    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = home.parent / "tinysae"
    TopKSAE(TopKSAEConfig(d_in=smol.d_model, d_sae=16, k=2, metadata=SAEMetadata(
        hook_name="blocks.3.hook_resid_post"))).save_model(sae)
    assert main(["sae", "decompose", "--sae", str(sae), "--direction", str(d), "--ks", "1"]) == 0
    out = _printed(capsys.readouterr().out)["out"]
    assert out == str(home / "sae_decompositions" / "dirS-tinysae") and (Path(out) / "decomposition.json").exists()


# ----------------------------------------------------------------------------- compare at one layer


@pytest.fixture()
def three(tmp_path):
    a = _save_direction(tmp_path / "a", [0, 1, 2, 3], best=1, seed=1)
    b = _save_direction(tmp_path / "b", [0, 1, 2, 3], best=3, seed=2)
    c = _save_direction(tmp_path / "c", [0, 1], best=0, seed=3)
    return tmp_path, a, b, c


def test_compare_defaults_to_the_first_directions_layer(three):
    root, a, b, _ = three
    res = compare_directions([str(root / "a"), str(root / "b")])
    assert res["layer"] == 1 and res["names"] == ["a@1", "random-control@1", "b@1"]  # not b's own best (3)
    assert res["cosine"][0][2] == pytest.approx(cosine(a.at(1), b.at(1)), abs=1e-4)
    res = compare_directions([str(root / "b"), str(root / "a")])
    assert res["layer"] == 3 and res["names"][0] == "b@3"
    res = compare_directions([str(root / "a"), str(root / "b")], layer="2")
    assert res["layer"] == 2 and res["cosine"][0][2] == pytest.approx(cosine(a.at(2), b.at(2)), abs=1e-4)
    pinned = compare_directions([str(root / "a"), f"b={root / 'b'}@0"], layer=2)  # one direction pinned
    assert pinned["names"] == ["a@2", "random-control@2", "b@0"]


def test_compare_per_layer(three):
    root, a, b, _ = three
    res = compare_directions([str(root / "a"), str(root / "b"), str(root / "c")], per_layer=True,
                             out=root / "cmp")
    assert res["layers"] == [0, 1] and res["names"] == ["a", "random-control", "b", "c"]
    assert res["cosine"]["1"][0][2] == pytest.approx(cosine(a.at(1), b.at(1)), abs=1e-4)
    html = (root / "cmp" / "cosine.html").read_text()
    assert "layer 0" in html and "layer 1" in html and "layer 2" not in html  # one heatmap per shared layer
    with pytest.raises(PersonaProbeError, match="drop --layer"):
        compare_directions([str(root / "a"), str(root / "b")], per_layer=True, layer=1)


def test_compare_layer_not_covered_is_one_line(three):
    root, *_ = three
    with pytest.raises(PersonaProbeError) as e:
        compare_directions([str(root / "a"), str(root / "c")], layer=3)
    msg = str(e.value)
    assert "\n" not in msg and "layer 3" in msg and "c has no layer 3 (it covers 0-1)" in msg
    assert "a has" not in msg  # only the directions that lack it
    with pytest.raises(PersonaProbeError, match="named 'a'"):
        compare_directions([str(root / "a"), f"a={root / 'b'}"])


def test_compare_cli_always_writes_the_heatmap(three, home, capsys):
    root, *_ = three
    assert main(["compare", str(root / "a"), str(root / "b")]) == 0
    res = _printed(capsys.readouterr().out)
    assert res["out"] == str(home / "compare" / "a-b-L1") and res["layer"] == 1
    assert (home / "compare" / "a-b-L1" / "cosine.html").exists()
    assert main(["compare", str(root / "a"), str(root / "b"), "--layer", "2"]) == 0
    assert _printed(capsys.readouterr().out)["out"] == str(home / "compare" / "a-b-L2")
    assert main(["compare", str(root / "a"), str(root / "b"), "--per-layer"]) == 0
    res = _printed(capsys.readouterr().out)
    assert res["layers"] == [0, 1, 2, 3] and (Path(res["out"]) / "cosine.html").exists()
    assert main(["compare", str(root / "a"), str(root / "c"), "--layer", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it covers 0-1" in err


# ----------------------------------------------------------------------------- missing folders


def test_missing_folder_is_reported_as_missing(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(PersonaProbeError, match="does not exist"):
        read_manifest(missing)
    with pytest.raises(PersonaProbeError, match=r"nope does not exist \(expected a direction folder\)"):
        load_direction(missing)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PersonaProbeError, match="is a file"):
        read_manifest(tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonaProbeError, match="has no manifest.json"):  # an existing folder keeps that message
        read_manifest(tmp_path / "empty")

    monkeypatch.setattr(common, "load_handle", lambda args: None)
    d = _save_direction(tmp_path / "d", [0], best=0)
    assert d is not None
    for argv in (["compare", str(missing)], ["steer", "--direction", str(missing)],
                 ["icl", "--direction", str(missing)], ["judge", "--answers", str(missing)],
                 ["sae", "decompose", "--sae", str(missing), "--direction", str(tmp_path / "d")],
                 ["sae", "decompose", "--sae", str(tmp_path / "empty"), "--direction", str(missing)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "does not exist" in err and "manifest" not in err, (argv, err)
