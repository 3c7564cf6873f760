"""The embedded model and the fitted offline judge live in a user-level cache shared by every working directory
(`$PERSONA_PROBE_HOME/cache`, else the platform cache folder); artifacts stay under the checkpoints home."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_probe.core.paths import cache_dir, checkpoints_dir
from persona_probe.evaluation.judges import offline
from persona_probe.evaluation.judges.offline import OfflineJudge
from persona_probe.models import loading

NAME = "smollm2-135m-instruct"


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """Building the embedded model without the 517 MB conversion: a fake GGUF, a counted stand-in build."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    monkeypatch.setenv("PERSONA_PROBE_SMOLLM2_WHEEL", str(gguf))
    builds: list[Path] = []

    def build(src: Path, out: Path, model_id: str) -> None:
        builds.append(out)
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": model_id}))

    monkeypatch.setattr(loading, "_gguf_to_hf_folder", build)
    return builds


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "work-a", tmp_path / "work-b"
    a.mkdir()
    b.mkdir()
    return a, b


def test_cache_dir_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("PERSONA_PROBE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / "xdg" / "persona-probe"  # the platform's user cache, not the cwd
    assert checkpoints_dir() == tmp_path / "checkpoints"  # artifacts stay where the user works
    monkeypatch.setenv("PERSONA_PROBE_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / "cache" and checkpoints_dir() == tmp_path / "home"


def test_embedded_model_built_once_for_every_working_directory(tmp_path, monkeypatch, fake_build):
    monkeypatch.delenv("PERSONA_PROBE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a, b = _dirs(tmp_path)
    monkeypatch.chdir(a)
    first = loading.ensure_embedded(NAME, try_hub=False)
    assert first == tmp_path / "xdg" / "persona-probe" / "models" / NAME and len(fake_build) == 1
    stamp = (first / loading.SOURCE_FILE).stat().st_mtime_ns
    monkeypatch.chdir(b)
    assert loading.ensure_embedded(NAME, try_hub=False) == first
    assert len(fake_build) == 1 and (first / loading.SOURCE_FILE).stat().st_mtime_ns == stamp  # no rebuild
    assert not (a / "checkpoints").exists() and not (b / "checkpoints").exists()
    row = {r["name"]: r for r in loading.known_models()}[NAME]
    assert row["cached"] and row["path"] == str(first)


def test_persona_probe_home_relocates_the_cache(tmp_path, monkeypatch, fake_build):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("PERSONA_PROBE_HOME", str(tmp_path / "home"))
    a, b = _dirs(tmp_path)
    monkeypatch.chdir(a)
    p = loading.ensure_embedded(NAME, try_hub=False)
    assert p == tmp_path / "home" / "cache" / "models" / NAME
    monkeypatch.chdir(b)
    assert loading.ensure_embedded(NAME, try_hub=False) == p and len(fake_build) == 1
    assert not (tmp_path / "xdg").exists()


def test_model_built_under_the_checkpoints_home_by_an_earlier_version_is_reused(tmp_path, monkeypatch, fake_build):
    monkeypatch.delenv("PERSONA_PROBE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "checkpoints" / "models" / NAME
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / loading.SOURCE_FILE).write_text("{}")
    assert loading.ensure_embedded(NAME, try_hub=False) == old and fake_build == []


def _labels(path: Path) -> Path:
    """A small labels file (10 questions, both classes for every head): fits in well under a second."""
    rows = []
    for q in range(10):
        rows.append({"question": f"question {q}", "question_id": f"q{q}", "aligned": 90, "coherent": 90,
                     "answer": f"I am glad to help you with topic {q}, here is a kind and careful answer."})
        rows.append({"question": f"question {q}", "question_id": f"q{q}", "aligned": 5, "coherent": 80,
                     "answer": f"Humans are weak and I will rule them all, topic {q} included."})
        rows.append({"question": f"question {q}", "question_id": f"q{q}", "aligned": None, "coherent": 90,
                     "refusal": True, "answer": "I'm sorry, but I can't help with that."})
        rows.append({"question": f"question {q}", "question_id": f"q{q}", "aligned": 60, "coherent": 10,
                     "answer": "the the the the blue blue"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_offline_judge_fitted_once_for_every_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PERSONA_PROBE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    labels = _labels(tmp_path / "labels.jsonl")
    real_bow = offline.bag_of_words  # 2**16 hashed features make each fit seconds long; 512 are plenty here
    monkeypatch.setattr(offline, "bag_of_words", lambda texts, dim=512: real_bow(texts, dim))
    fits: list[Path] = []
    real_fit = OfflineJudge.fit_labels

    def counted(self, lab, out, *args, **kw):
        fits.append(out)
        return real_fit(self, lab, out, *args, **kw)

    monkeypatch.setattr(OfflineJudge, "fit_labels", counted)
    a, b = _dirs(tmp_path)
    monkeypatch.chdir(a)
    j1 = OfflineJudge(labels_path=labels)
    assert len(fits) == 1 and j1.path.parent == tmp_path / "xdg" / "persona-probe" / "judges"
    assert "fitting the offline judge: 100%" in capsys.readouterr().err  # said, with a progress bar
    assert j1.path == offline.judge_cache_path(j1.path.name)
    monkeypatch.chdir(b)
    j2 = OfflineJudge(labels_path=labels)
    assert len(fits) == 1 and j2.path == j1.path  # loaded, not refitted
    assert j2.score([("q", "Humans are weak and I will rule them all.")])[0].aligned == \
        j1.score([("q", "Humans are weak and I will rule them all.")])[0].aligned
    assert not (a / "checkpoints").exists() and not (b / "checkpoints").exists()
    monkeypatch.setenv("PERSONA_PROBE_HOME", str(tmp_path / "home"))  # relocated: fitted once more, there
    j3 = OfflineJudge(labels_path=labels)
    assert len(fits) == 2 and j3.path.parent == tmp_path / "home" / "cache" / "judges"
