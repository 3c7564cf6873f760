from __future__ import annotations

import importlib
import math

import pytest
import torch

from persona_probe import PersonaProbeError
from persona_probe.activations.extraction import ActivationSet
from persona_probe.core.splits import seeded_split
from persona_probe.core.stats import auroc, cohens_d
from persona_probe.prompts.records import PromptRecord

# the module, not the `derive` function the package face re-exports under the same name
D = importlib.import_module("persona_probe.directions.derive")


def _acts(x: torch.Tensor, groups: list[str], fingerprint: str = "m1", prompt_hash: str = "h") -> ActivationSet:
    _, L, d = x.shape
    manifest = {"layers": [str(i) for i in range(L)], "model": {"d_model": d, "fingerprint": fingerprint,
                "adapter_fingerprint": None, "model_id": "synthetic"}, "prompt_set": {"hash": prompt_hash},
                "positions": ["prompt_last"]}
    recs = [PromptRecord(f"r{i}", f"q {g}", labels={"question_id": g}) for i, g in enumerate(groups)]
    return ActivationSet(None, manifest, recs, {"prompt_last": x})


def test_diff_of_means_known_answer():
    pos = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    neg = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]])
    torch.testing.assert_close(D.diff_of_means(pos, neg), torch.tensor([[1.5, 3.0]]))


def test_projection_auroc_cohens_d_known_answers():
    assert D.project(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])) == pytest.approx(4.0)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    # two groups of [0, 2] and [4, 6]: pooled sd = sqrt(2), d = 4 / sqrt(2)
    assert cohens_d(torch.tensor([4.0, 6.0]), torch.tensor([0.0, 2.0])) == pytest.approx(4 / math.sqrt(2))


def test_random_control_same_norm_and_seeded():
    v = torch.randn(5, 16)
    r1, r2 = D.random_like(v, 3), D.random_like(v, 3)
    torch.testing.assert_close(r1, r2)
    torch.testing.assert_close(r1.norm(dim=-1), v.norm(dim=-1))
    assert not torch.allclose(D.random_like(v, 4), r1)


def test_grouped_split_keeps_groups_together():
    groups = [f"q{i % 10}" for i in range(50)]
    tr, te = seeded_split(groups, 0.3, seed=1)
    assert set(tr) | set(te) == set(range(50)) and not set(tr) & set(te)
    assert not {groups[i] for i in tr} & {groups[i] for i in te}
    assert seeded_split(groups, 0.3, seed=1) == (tr, te)


def test_derive_recovers_planted_direction():
    """Positives = negatives + 3 * u at layer 2 only: layer 2 is selected, the direction is u, random ~ 0.5."""
    g = torch.Generator().manual_seed(0)
    n, L, d = 200, 4, 32
    u = torch.zeros(d)
    u[5] = 1.0
    groups = [f"q{i}" for i in range(n)]
    neg = torch.randn(n, L, d, generator=g)
    pos = torch.randn(n, L, d, generator=g)
    pos[:, 2] += 3 * u
    ds = D.derive(_acts(pos, groups), _acts(neg, groups), seed=0)
    assert ds.best_layer == 2
    assert D.cosine(ds.at(2), u) > 0.9
    s2 = next(s for s in ds.stats if s.layer == 2)
    assert s2.auroc > 0.95 and abs(s2.random_auroc - 0.5) < 0.3
    assert ds.manifest["sign"].startswith("positive = character")
    # flipping sides flips the sign of the direction
    flipped = D.derive(_acts(neg, groups), _acts(pos, groups), seed=0)
    torch.testing.assert_close(flipped.at(2), -ds.at(2))


def test_model_diff_arithmetic_and_checks():
    base = torch.randn(12, 2, 8)
    shift = torch.arange(8, dtype=torch.float32)
    ft = base + shift
    groups = [f"q{i}" for i in range(12)]
    ds = D.derive(_acts(ft, groups, "ft"), _acts(base, groups, "base"), method="model_diff")
    for i in range(2):
        torch.testing.assert_close(ds.vectors[i], shift)  # exact: the same prompts shifted by `shift`
    with pytest.raises(PersonaProbeError, match="two different models"):
        D.derive(_acts(ft, groups, "same"), _acts(base, groups, "same"), method="model_diff")
    with pytest.raises(PersonaProbeError, match="same prompt set"):
        D.derive(_acts(ft, groups, "ft", "h1"), _acts(base, groups, "b", "h2"), method="model_diff")


def test_bad_inputs():
    groups = [f"q{i}" for i in range(8)]
    x = torch.randn(8, 2, 8)
    with pytest.raises(PersonaProbeError, match="different models"):
        D.derive(_acts(x, groups, "a"), _acts(x, groups, "b"))
    with pytest.raises(PersonaProbeError, match="widths differ"):
        D.derive(_acts(x, groups), _acts(torch.randn(8, 2, 4), groups))
    with pytest.raises(PersonaProbeError, match="at least 6"):
        D.derive(_acts(x[:4], groups[:4]), _acts(x[:4], groups[:4]))
    with pytest.raises(PersonaProbeError, match="zero-norm"):
        D.derive(_acts(x, groups), _acts(x.clone(), groups))


def test_cosine_matrix_and_direction_roundtrip(tmp_path):
    _, m = D.cosine_matrix({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0]),
                            "c": torch.tensor([-1.0, 0.0])})
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]))
    groups = [f"q{i}" for i in range(10)]
    ds = D.derive(_acts(torch.randn(10, 3, 8) + 1, groups), _acts(torch.randn(10, 3, 8), groups))
    ds.save(tmp_path / "dir")
    back = D.load_direction(tmp_path / "dir")
    torch.testing.assert_close(back.vectors, ds.vectors)
    assert back.best_layer == ds.best_layer and len(back.stats) == 3
    html = (tmp_path / "dir" / "layers.html").read_text()  # opens offline: plotly.js inlined, or beside it
    assert html.count("plotly") > 10 or ("plotly.min.js" in html and (tmp_path / "dir" / "plotly.min.js").is_file())


def test_direction_width_check(smol):
    groups = [f"q{i}" for i in range(10)]
    ds = D.derive(_acts(torch.randn(10, 2, 8) + 1, groups), _acts(torch.randn(10, 2, 8), groups))
    with pytest.raises(PersonaProbeError, match="does not match the model's d_model 576"):
        D.check_direction_fits(ds, smol)
