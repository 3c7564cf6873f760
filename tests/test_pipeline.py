"""The main job end to end on a tiny config, the stage cache, and the report in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from persona_probe import PersonaProbeError
from persona_probe.pipeline.run import load_config, run_pipeline

TINY = {
    "name": "tiny",
    "direction": {"n_questions": 8, "n_prompts": 1, "layers": "8:14", "batch_size": 16},
    "steering": {"alphas": [0.0, 1.0], "questions_limit": 2, "samples": 1, "max_new_tokens": 12},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smol):
    out = tmp_path_factory.mktemp("run")
    logs: list[str] = []
    report = run_pipeline(load_config(overrides=TINY), out=out, log=logs.append)
    return out, report, logs


def test_pipeline_outputs(run_dir):
    out, report, _ = run_dir
    for f in ("report.html", "report.json", "direction/manifest.json", "direction/directions.safetensors",
              "steering/generations.jsonl", "steering/cells.json"):
        assert (out / f).exists(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["direction"]["best_layer"] in range(8, 14)
    conds = {(c["condition"], c["alpha"]) for c in rep["steering"]["cells"]}
    assert conds == {("direction", 0.0), ("direction", 1.0), ("random", 1.0)}
    assert rep["judge"]["judge"] == "offline" and "em_label" in rep["judge"]["heldout_agreement"]
    # raw and judge-corrected EM in every cell; the judge card in the page
    cell = rep["steering"]["cells"][0]
    assert "em_share" in cell and "em_corrected" in cell and cell["em_corrected_ci95"] is not None
    page = (out / "report.html").read_text()
    assert "against real answers scored by GPT-4o" in page and "Rogan" in page
    m = rep["manifest"]
    assert m["model"]["fingerprint"] and m["package_version"] and m["config"]["seed"] == 0


def test_pipeline_rerun_uses_cache_and_recomputes_changed_stage(run_dir):
    out, _, _ = run_dir
    logs: list[str] = []
    run_pipeline(load_config(overrides=TINY), out=out, log=logs.append)
    assert any("[direction] cached" in l for l in logs) and any("[steering] cached" in l for l in logs)
    changed = json.loads(json.dumps(TINY))
    changed["steering"]["alphas"] = [0.0, 0.5]
    logs.clear()
    run_pipeline(load_config(overrides=changed), out=out, log=logs.append)
    assert any("[direction] cached" in l for l in logs) and any("[steering] running" in l for l in logs)


def test_bad_config(tmp_path):
    with pytest.raises(PersonaProbeError, match="unknown config key"):
        load_config(overrides={"nope": 1})
    (tmp_path / "c.yaml").write_text("steering: [1, 2\n")
    with pytest.raises(PersonaProbeError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    out, _, _ = run_dir
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=15000"]
    url = (out / "report.html").resolve().as_uri()
    proc = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    dom = proc.stdout
    # plotly.js builds these nodes at runtime: present only if the inlined script ran
    assert dom.count('class="plot-container plotly"') >= 2, proc.stderr[-2000:]
    assert "main-svg" in dom
    console_errors = [l for l in proc.stderr.splitlines() if "CONSOLE" in l and ("Uncaught" in l or "Error" in l)]
    assert not console_errors, console_errors
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, "--window-size=1280,2000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_pipeline_sae_stage(run_dir, tmp_path):
    """The SAE stage: skipped when no SAE exists ("auto"), required when enabled, and with a given SAE folder
    the report gains the decomposition + feature diff while earlier stages stay cached."""
    from test_sae import make_sae

    out, report, logs = run_dir
    assert any("[sae] no SAE" in l for l in logs) and "sae" not in report["routes"]
    with pytest.raises(PersonaProbeError, match="sae train"):
        run_pipeline(load_config(overrides={**TINY, "sae": {"enabled": True}}), out=out, log=lambda m: None)
    L = report["direction"]["best_layer"]
    make_sae(576, 64, 4, hook=f"blocks.{L}.hook_resid_post").save_model(tmp_path / "sae")
    logs2: list[str] = []
    rep = run_pipeline(load_config(overrides={**TINY, "sae": {"path": str(tmp_path / "sae"), "n_questions": 4,
                                                              "top": 5}}), out=out, log=logs2.append)
    assert any("[steering] cached" in l for l in logs2) and any("[sae] running" in l for l in logs2)
    sae = rep["routes"]["sae"]["summary"]
    shares = sae["decomposition"]["shares"]
    assert 0.0 <= shares["1"] <= shares["20"] <= 1.0 + 1e-6 and len(sae["diff"]["top_by_mean"]) <= 5
    assert (out / "sae" / "top_examples.html").exists()
    assert "SAE features of the direction" in (out / "report.html").read_text()
