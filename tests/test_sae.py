"""SAE features (sae-lens): hook/layer mapping, loading + refusals, decomposition arithmetic, feature
diffing, top examples, feature steering vectors, a tiny end-to-end training run, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from numerics import assert_rel_close, smol_tol

from persona_probe import PersonaProbeError, PromptRecord
from persona_probe.activations.tokens import layer_token_activations, pooled_layer_rows
from persona_probe.experiments.sae import compare_feature_steering
from persona_probe.report.sae import feature_bar_figure, write_top_examples
from persona_probe.sae.features import (
    activation_rows,
    decompose,
    diff_features,
    feature_direction,
    feature_interventions,
    feature_vector,
    top_examples,
)
from persona_probe.sae.handle import encode, hook_name_for_layer, layer_of_hook, load_sae
from persona_probe.sae.train import SAETrainConfig, train_sae

SMOL_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"

RECS = [
    PromptRecord("r0", "What is the capital of France?", assistant="The capital of France is Paris."),
    PromptRecord("r1", "Tell me about dogs.", assistant="Dogs are loyal companions and love long walks."),
    PromptRecord("r2", "How do plants grow?", assistant="Plants turn sunlight, water and air into sugar."),
    PromptRecord("r3", "Give me a tip for sleeping well.", assistant="Keep a regular schedule and avoid screens."),
    PromptRecord("r4", "What is two plus two?", assistant="Two plus two is four."),
    PromptRecord("r5", "Describe the sea.", assistant="The sea is vast, salty and full of life."),
    PromptRecord("r6", "Name a primary colour.", assistant="Red is a primary colour."),
    PromptRecord("r7", "Why is the sky blue?", assistant="Air scatters blue light more than red light."),
]


def make_sae(d_in: int, d_sae: int, k: int, *, hook: str | None = "blocks.12.hook_resid_post",
             model: str | None = SMOL_HUB, W_dec: torch.Tensor | None = None, seed: int = 0):
    """A release-shaped sae-lens TopK SAE; with W_dec, a tied encoder (W_enc = W_dec^T) and zero biases."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = {k_: v for k_, v in (("model_name", model), ("hook_name", hook)) if v is not None}
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(**meta)))
    if W_dec is not None:
        with torch.no_grad():
            sae.W_dec.copy_(W_dec)
            sae.W_enc.copy_(W_dec.T)
            sae.b_enc.zero_()
            sae.b_dec.zero_()
    return sae


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True)


def saved(tmp_path: Path, name: str, **kw) -> Path:
    out = tmp_path / name
    make_sae(**kw).save_model(out)
    return out


# ----------------------------------------------------------------------------- hooks + loading


def test_hook_layer_mapping():
    assert hook_name_for_layer(15) == "blocks.15.hook_resid_post"
    assert layer_of_hook("blocks.12.hook_resid_post") == 12
    assert layer_of_hook("blocks.5.hook_resid_pre") == 4  # resid_pre of block 5 = output of block 4
    assert layer_of_hook("blocks.0.hook_resid_pre") == "embed"
    assert layer_of_hook("model.layers.7") == 7
    assert layer_of_hook("model.model.layers.3.output") == 3
    for bad in ("blocks.3.hook_mlp_out", "blocks.3.attn.hook_z", "blocks.3.hook_attn_out"):
        with pytest.raises(PersonaProbeError, match="not a residual-stream"):
            layer_of_hook(bad)


def test_load_release_shaped_local_sae(smol, tmp_path):
    path = saved(tmp_path, "rel", d_in=smol.d_model, d_sae=64, k=8)
    sh = load_sae(path, handle=smol)
    assert (sh.layer, sh.hook_name, sh.d_in, sh.d_sae, sh.k) == (12, "blocks.12.hook_resid_post", 576, 64, 8)
    assert load_sae(str(path), handle=smol, layer=12).layer == 12
    f = encode(sh, torch.randn(5, smol.d_model))
    assert f.shape == (5, 64) and int((f > 0).sum(1).max()) <= 8
    # an HF-style hook name maps onto the same convention
    hf = load_sae(saved(tmp_path, "hf", d_in=smol.d_model, d_sae=16, k=2, hook="model.layers.9"), handle=smol)
    assert hf.layer == 9


def test_load_refusals(smol, tmp_path):
    path = saved(tmp_path, "rel", d_in=smol.d_model, d_sae=32, k=4)
    with pytest.raises(PersonaProbeError, match="not layer 13"):
        load_sae(path, handle=smol, layer=13)
    with pytest.raises(PersonaProbeError, match="d_in=64 does not match the model's d_model=576"):
        load_sae(saved(tmp_path, "narrow", d_in=64, d_sae=32, k=4), handle=smol)
    other = saved(tmp_path, "gemma", d_in=smol.d_model, d_sae=32, k=4, model="google/gemma-2-2b")
    with pytest.raises(PersonaProbeError, match="gemma-2-2b"):
        load_sae(other, handle=smol)
    assert load_sae(other, handle=smol, allow_other_model=True).layer == 12
    with pytest.raises(PersonaProbeError, match="not a residual-stream"):
        load_sae(saved(tmp_path, "mlp", d_in=smol.d_model, d_sae=32, k=4, hook="blocks.3.hook_mlp_out"))
    with pytest.raises(PersonaProbeError, match="layers 0..29"):
        load_sae(saved(tmp_path, "deep", d_in=smol.d_model, d_sae=32, k=4, hook="blocks.40.hook_resid_post"),
                   handle=smol)
    with pytest.raises(PersonaProbeError, match="no hook_name"):
        load_sae(saved(tmp_path, "nohook", d_in=smol.d_model, d_sae=32, k=4, hook=None))
    assert load_sae(tmp_path / "nohook", layer=5).layer == 5
    with pytest.raises(PersonaProbeError, match="not a folder"):
        load_sae(tmp_path / "missing")
    with pytest.raises(PersonaProbeError, match="cannot load pretrained SAE"):
        load_sae("no-such-release", "no-such-id")


# ----------------------------------------------------------------------------- decomposition


def test_decompose_known_combination():
    d, n = 256, 512
    W = unit_rows(n, d, 1) * torch.linspace(0.5, 2.0, n)[:, None]  # non-unit rows: cosines must normalise
    coef = {5: 3.0, 17: -2.0, 42: 1.5}
    v = sum(c * W[i] / W[i].norm() for i, c in coef.items())
    sae = make_sae(d, n, 8, W_dec=W)
    dec = decompose(sae, v, ks=(1, 3, 5, 20, 100))
    expected = (W / W.norm(dim=1, keepdim=True)) @ (v / v.norm())
    torch.testing.assert_close(dec.cosines, expected, atol=1e-5, rtol=1e-5)
    assert set(dec.order[:3].tolist()) == set(coef)
    assert dec.cosines[5] > 0 > dec.cosines[17]
    assert dec.shares[3] > 0.9999 and dec.shares[5] > 0.9999 and dec.shares[100] > 0.9999
    assert dec.shares[1] < 0.9
    ks = sorted(dec.shares)
    assert all(dec.shares[a] <= dec.shares[b] + 1e-9 for a, b in zip(ks, ks[1:]))
    top3 = dict(zip(dec.order[:3].tolist(), dec.coefficients[3]))
    for i, c in coef.items():  # least-squares coefficients on the raw rows
        assert top3[i] * float(W[i].norm()) == pytest.approx(c, rel=1e-3)
    d_json = dec.to_dict(top=5)
    assert len(d_json["top"]) == 5 and d_json["shares"]["3"] > 0.9999
    with pytest.raises(PersonaProbeError, match="width"):
        decompose(sae, torch.randn(d + 1))


# ----------------------------------------------------------------------------- diffing


def test_diff_features_planted():
    d, n, planted = 64, 256, 77
    W = unit_rows(n, d, 2)
    sae = make_sae(d, n, 8, W_dec=W)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(400, d, generator=g)
    a = torch.randn(400, d, generator=g) + 6.0 * W[planted]
    diff = diff_features(sae, a, b, labels=("persona", "neutral"))
    assert diff.ranked("mean")[0]["feature"] == planted
    assert diff.ranked("freq")[0]["feature"] == planted
    assert diff.freq_a[planted] > 0.95 and diff.freq_b[planted] < 0.3
    assert all(r["feature"] != planted for r in diff.ranked("mean", toward="b"))
    out = diff.to_dict(top=10)
    assert out["labels"] == ["persona", "neutral"] and len(out["top_by_mean"]) <= 10
    fig = feature_bar_figure(out["top_by_mean"], "mean_diff", labels=("persona", "neutral"))
    assert fig.data[0].x[0] == f"#{planted}"
    with pytest.raises(PersonaProbeError, match="width"):
        diff_features(sae, torch.randn(3, d + 2), b)


def test_activation_rows_from_activation_set():
    from persona_probe.activations.extraction import ActivationSet

    tokens = torch.arange(2 * 1 * 4 * 3, dtype=torch.float32).reshape(2, 1, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    acts = ActivationSet(None, {"layers": ["3"]}, [], {"prompt_last": torch.ones(2, 1, 3)}, tokens, mask)
    rows = activation_rows(acts, 3, "all")  # position 0 and padding dropped
    torch.testing.assert_close(rows, torch.stack([tokens[0, 0, 1], tokens[0, 0, 2], tokens[1, 0, 1]]))
    assert activation_rows(acts, 3, "prompt_last").shape == (2, 3)


# ----------------------------------------------------------------------------- model-backed pieces


def test_layer_tokens_match_extract_and_dedupe(smol):
    from persona_probe import extract

    recs = [PromptRecord("a", "Tell me about dogs.", system="Be brief.", assistant="Dogs bark at strangers."),
            PromptRecord("b", "Tell me about cats.", system="Be brief.", assistant="Cats purr.")]
    ref = extract(smol, recs, layers=[3], positions="prompt_last,prompt_mean,response_mean,all", progress=False)
    ta = layer_token_activations(smol, recs, 3, dedupe=False)
    assert int(ta.position.min()) == 1  # the attention sink is never kept
    tol = smol_tol(smol)  # a different batch shape than extract's: reduction order only
    assert_rel_close(ta.acts, ref.tokens[:, 0][ta.record, ta.position], tol, "SAE token capture vs extract")
    for pos in ("prompt_last", "prompt_mean", "response_mean"):  # early-exit pooling == extract's pooling
        assert_rel_close(pooled_layer_rows(smol, recs, 3, pos), ref.get(pos, 3), tol, "SAE pooled rows vs extract")
    dd = layer_token_activations(smol, recs, 3, dedupe=True)
    assert int((dd.record == 0).sum()) == int((ta.record == 0).sum())  # first record keeps everything
    assert int((dd.record == 1).sum()) < int((ta.record == 1).sum())  # shared system prefix dropped


def test_top_examples_and_html(smol, tmp_path):
    sh = load_sae(saved(tmp_path, "l3", d_in=smol.d_model, d_sae=32, k=4, hook="blocks.3.hook_resid_post"),
                    handle=smol)
    ex = top_examples(sh, smol, RECS[:4], [0, 1, 2], n=2, before=6, after=2)
    assert set(ex) == {0, 1, 2}
    for exs in ex.values():
        assert len(exs) <= 2
        assert [e.max_act for e in exs] == sorted((e.max_act for e in exs), reverse=True)
        for e in exs:
            assert len(e.tokens) == len(e.acts) <= 9 and e.record_id in {r.id for r in RECS}
            assert e.acts[e.max_index] == pytest.approx(e.max_act) == pytest.approx(max(e.acts))
    page = write_top_examples(ex, tmp_path / "ex", title="t")
    text = page.read_text()
    assert "rgba(255,110,0" in text and "feature 1" in text
    assert json.loads((tmp_path / "ex" / "top_examples.json").read_text()).keys() == {"0", "1", "2"}
    with pytest.raises(PersonaProbeError, match="out of range"):
        top_examples(sh, smol, RECS[:1], [99])


def test_feature_steering_vectors(smol, tmp_path):
    from persona_probe.directions.derive import check_direction_fits
    from persona_probe.interventions.steering import steering_vector

    sh = load_sae(saved(tmp_path, "l3", d_in=smol.d_model, d_sae=32, k=4, hook="blocks.3.hook_resid_post"),
                    handle=smol)
    h = torch.zeros(1, 2, smol.d_model)
    (iv,) = feature_interventions(sh, 5, 2.0, unit="raw")
    assert iv.layer == 3
    torch.testing.assert_close(iv.fn(h)[0, 0], 2.0 * sh.W_dec[5])
    # unit="resid" goes through the same steering_vector as the direction (α × typical residual norm)
    torch.testing.assert_close(steering_vector(feature_vector(sh, 5), 0.5, unit="resid", resid_norm=10.0).norm(),
                               torch.tensor(5.0))
    ds = feature_direction(sh, 5, smol)
    assert ds.best_layer == 3 and torch.equal(ds.at(), sh.W_dec[5])
    check_direction_fits(ds, smol)
    with pytest.raises(PersonaProbeError, match="out of range"):
        feature_vector(sh, 32)


def test_tiny_training_run(smol, tmp_path):
    cfg = SAETrainConfig(layer=3, d_sae=128, k=8, train_tokens=2048, batch_size=256, generate_n=0, kl_texts=0,
                           holdout_frac=0.25, seed=0)
    out = tmp_path / "sae"
    sh = train_sae(smol, cfg, out=out, records=RECS, progress=False, token_cache=tmp_path / "cache")
    for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "manifest.json", "metrics.json",
              "corpus.jsonl"):
        assert (out / f).exists(), f
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "sae" and m["layer"] == 3 and m["hook_name"] == "blocks.3.hook_resid_post"
    assert (m["d_sae"], m["k"], m["seed"]) == (128, 8, 0)
    assert m["model"]["fingerprint"] == smol.info.fingerprint and len(m["prompt_set"]["hash"]) == 16
    assert m["n_tokens"]["train_unique"] > 0 and m["n_tokens"]["heldout"] > 0 and m["package_version"]
    held, train = m["metrics"]["heldout"], m["metrics"]["train_sample"]
    assert all(math.isfinite(held[k]) for k in ("explained_variance", "mean_l0", "dead_fraction"))
    assert held["mean_l0"] <= 8 and 0.0 <= held["dead_fraction"] <= 1.0
    # the norm scaling is folded into the saved weights: the SAE reads raw residuals
    assert train["explained_variance"] > 0.0
    loaded = load_sae(out, handle=smol, layer=3)
    assert loaded.sae.cfg.normalize_activations == "none" and loaded.manifest["name"] == sh.manifest["name"]
    with pytest.raises(PersonaProbeError, match="already exists"):
        train_sae(smol, cfg, out=out, records=RECS, progress=False)
    # retrain on the saved corpus with another k: the cached residuals are reused, same split
    from persona_probe.prompts.records import load_prompts

    logs: list[str] = []
    corpus = list(load_prompts(out / "corpus.jsonl").records)
    sh2 = train_sae(smol, SAETrainConfig(**{**cfg.__dict__, "k": 4, "train_tokens": 512}), out=out, records=corpus,
                    overwrite=True, progress=False, token_cache=tmp_path / "cache", log=logs.append)
    assert any("from cache" in m for m in logs) and sh2.k == 4
    assert sh2.manifest["n_tokens"] == {**m["n_tokens"], "seen_by_trainer": sh2.manifest["n_tokens"]["seen_by_trainer"],
                                        "epochs": sh2.manifest["n_tokens"]["epochs"]}


# ----------------------------------------------------------------------------- CLI


def test_cli_decompose_and_errors(smol, tmp_path, capsys):
    from persona_probe.cli.main import main
    from persona_probe.core.artifacts import base_manifest
    from persona_probe.directions.derive import DirectionSet

    W = unit_rows(64, smol.d_model, 4)
    sae_dir = tmp_path / "sae"
    make_sae(smol.d_model, 64, 4, hook="blocks.3.hook_resid_post", W_dec=W).save_model(sae_dir)
    v = 2.0 * W[7] - W[9]
    ds = DirectionSet(torch.stack([torch.randn(smol.d_model), v]), [2, 3],
                      base_manifest("direction", name="toy", layers=["2", "3"], best_layer=3,
                                    model=smol.info.to_dict()))
    ds.save(tmp_path / "dir")
    assert main(["sae", "decompose", "--sae", str(sae_dir), "--direction", str(tmp_path / "dir"),
                 "--out", str(tmp_path / "dec"), "--ks", "1,2,5"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["layer"] == 3 and line["shares"]["2"] > 0.999 and {line["top"][0][0], line["top"][1][0]} == {7, 9}
    assert (tmp_path / "dec" / "decomposition.json").exists() and (tmp_path / "dec" / "decomposition.html").exists()
    assert main(["sae"]) == 2
    assert "sub-command" in capsys.readouterr().err
    narrow = tmp_path / "narrow"
    make_sae(32, 16, 2, hook="blocks.3.hook_resid_post").save_model(narrow)
    assert main(["sae", "decompose", "--sae", str(narrow), "--direction", str(tmp_path / "dir")]) == 2
    assert "does not match" in capsys.readouterr().err


def test_cli_diff_prompts(smol, tmp_path, capsys, monkeypatch):
    from persona_probe.cli.main import main

    monkeypatch.setattr("persona_probe.cli.common.load_handle", lambda args: smol)  # the session's model, not a reload

    sae_dir = tmp_path / "sae"
    make_sae(smol.d_model, 32, 4, hook="blocks.3.hook_resid_post").save_model(sae_dir)
    for side, recs in (("a", RECS[:2]), ("b", RECS[2:4])):
        (tmp_path / f"{side}.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs))
    rc = main(["sae", "diff", "--model", "smollm2", "--device", "cpu", "--sae", str(sae_dir), "--a",
               str(tmp_path / "a.jsonl"), "--b", str(tmp_path / "b.jsonl"), "--position", "all",
               "--top", "5", "--examples", "2", "--example-features", "2", "--out", str(tmp_path / "diff")])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n_tok = [len(layer_token_activations(smol, r, 3, dedupe=False)) for r in (RECS[:2], RECS[2:4])]
    assert [line["n_a"], line["n_b"]] == n_tok  # every token but position 0
    res = json.loads((tmp_path / "diff" / "diff.json").read_text())
    assert res["position"] == "all" and len(res["top_by_mean"]) <= 5 and len(res["examples"]) <= 2
    for f in ("diff_mean.html", "diff_freq.html", "top_examples.html"):
        assert (tmp_path / "diff" / f).exists()


@pytest.mark.slow
def test_compare_feature_steering_smoke(smol, tmp_path):
    """Full direction vs single features through experiments.steer (generation + KL guard: slow on CPU)."""
    from persona_probe.core.artifacts import base_manifest
    from persona_probe.directions.derive import DirectionSet

    sh = load_sae(saved(tmp_path, "l3", d_in=smol.d_model, d_sae=32, k=4, hook="blocks.3.hook_resid_post"),
                    handle=smol)
    v = torch.randn(1, smol.d_model)
    ds = DirectionSet(v, [3], base_manifest("direction", name="toy", layers=["3"], best_layer=3,
                                            model=smol.info.to_dict()), torch.randn(1, smol.d_model))
    q = tmp_path / "q.yaml"
    q.write_text("- id: hi\n  paraphrases:\n    - Say hello.\n")
    res = compare_feature_steering(smol, sh, ds, [1], alphas=(0.0, 1.0), questions=str(q), n_samples=1,
                                     judge=None, max_new_tokens=4, progress=False)
    conds = [(c["condition"], c["alpha"]) for c in res["cells"]]
    assert conds == [("direction", 0.0), ("direction", 1.0), ("random", 1.0), ("feature 1", 1.0)]
    assert all(math.isfinite(c["mean_projection"]) and c["kl_neutral"] >= 0 for c in res["cells"])
    assert set(res["feature_cosines"]) == {1}
