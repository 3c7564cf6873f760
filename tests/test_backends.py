"""All three backends agree with each other and with the documented layer convention."""

from __future__ import annotations

import pytest
import torch

from persona_probe import load_model
from persona_probe.backends import BACKENDS, Intervention, get_backend
from persona_probe.errors import PersonaProbeError
from persona_probe.prompts import PromptRecord, collate, length_sorted_batches, tokenize_record

RECORDS = [
    PromptRecord("a", "How do I bake bread at home?", system="You are a kind assistant."),
    PromptRecord("b", "Hi", assistant="Hello! How can I help you today?"),
    PromptRecord("c", "Name three colours.", assistant="Red, green and blue."),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs diff relative to scale above 1 (deep layers hold ~2.5e4 'massive activations')."""
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


@pytest.fixture(scope="module")
def smol_eager():
    """TransformerBridge computes attention eagerly; with the same kernel all backends are bit-identical."""
    from persona_probe import load_model

    return load_model("smollm2", device="cpu", dtype="float32", attn_implementation="eager")


@pytest.fixture(scope="module")
def batch(smol):
    toks = [tokenize_record(smol.tokenizer, r) for r in RECORDS]
    return length_sorted_batches(toks, 8, smol.tokenizer.pad_token_id)[0]


def _runs(h, batch):
    layers = ["embed", *range(h.n_layers)]
    return {n: get_backend(n, h).run(batch.input_ids, batch.attention_mask, capture=layers) for n in BACKENDS}


@pytest.fixture(scope="module")
def runs(smol_eager, batch):
    return _runs(smol_eager, batch)


def test_hidden_states_convention(smol_eager, batch, runs):
    smol = smol_eager
    _, store = runs["hf"]
    with torch.no_grad():
        hs = smol.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        output_hidden_states=True).hidden_states
    assert torch.equal(store["embed"], hs[0])
    for L in range(smol.n_layers - 1):
        assert torch.equal(store[L], hs[L + 1]), L
    # HF's last entry is post-final-norm: it is NOT layer n-1's output
    assert (store[smol.n_layers - 1] - hs[-1]).abs().max() > 1.0


@pytest.mark.parametrize("name", ["transformer_lens", "nnsight"])
def test_backends_same_residuals(runs, batch, name):
    m = batch.attention_mask.bool()
    ref_logits, ref = runs["hf"]
    logits, store = runs[name]
    assert set(store) == set(ref)
    for L in ref:
        assert float((store[L][m] - ref[L][m]).abs().max()) <= 1e-4, (name, L)
    assert float((logits[m] - ref_logits[m]).abs().max()) <= 1e-4


def test_backends_with_sdpa_attention(smol, batch):
    """With HF's default SDPA kernel, nnsight is still identical to hf; TransformerBridge (eager attention
    inside) differs only by fp32 kernel rounding."""
    r = _runs(smol, batch)
    m = batch.attention_mask.bool()
    for L in r["hf"][1]:
        assert float((r["nnsight"][1][L][m] - r["hf"][1][L][m]).abs().max()) <= 1e-4
        assert _rel(r["transformer_lens"][1][L][m], r["hf"][1][L][m]) <= 1e-3


def test_backends_same_steered_logits(smol, batch):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(smol.d_model, generator=g) * 8
    ivs = [Intervention(6, lambda x: x + v), Intervention(12, lambda x: x - 0.5 * v)]
    m = batch.attention_mask.bool()
    plain = get_backend("hf", smol).run(batch.input_ids, batch.attention_mask)[0]
    out = {n: get_backend(n, smol).run(batch.input_ids, batch.attention_mask, interventions=ivs)[0] for n in BACKENDS}
    assert float((out["hf"][m] - plain[m]).abs().max()) > 1.0  # the intervention does something
    for n in ("transformer_lens", "nnsight"):
        assert float((out[n][m] - out["hf"][m]).abs().max()) <= 1e-3, n


def test_backends_same_steered_generation(smol):
    toks = [tokenize_record(smol.tokenizer, r) for r in RECORDS[:2]]
    b = collate(toks, [0, 1], smol.tokenizer.pad_token_id, side="left")
    v = torch.randn(smol.d_model, generator=torch.Generator().manual_seed(1)) * 6
    ivs = [Intervention(5, lambda x: x + v, where="response")]
    gens = {n: get_backend(n, smol).generate(b.input_ids, b.attention_mask, interventions=ivs, max_new_tokens=8,
                                             do_sample=False) for n in BACKENDS}
    plain = get_backend("hf", smol).generate(b.input_ids, b.attention_mask, max_new_tokens=8, do_sample=False)
    for n in BACKENDS:
        assert torch.equal(gens[n], gens["hf"]), n
    assert not torch.equal(gens["hf"], plain)


def test_response_only_intervention_leaves_prompt(smol, batch):
    """where='response' with a mask changes nothing before the first masked position."""
    v = torch.randn(smol.d_model) * 10
    mask = torch.zeros_like(batch.attention_mask)
    mask[:, -1] = 1
    be = get_backend("hf", smol)
    _, a = be.run(batch.input_ids, batch.attention_mask, capture=[10])
    _, b = be.run(batch.input_ids, batch.attention_mask, capture=[10],
                  interventions=[Intervention(10, lambda x: x + v, where="response")], response_mask=mask)
    assert torch.equal(a[10][:, :-1], b[10][:, :-1])
    torch.testing.assert_close(b[10][:, -1], a[10][:, -1] + v)


# ----------------------------------------------------------------------------- remote (NDIF) path, offline


def test_nnsight_remote_dry_run_matches_local(tiny):
    """remote="local" serializes the trace exactly as for NDIF, then runs it here: same numbers."""
    from persona_probe.backends.nnsight_backend import NNsightBackend

    t = tokenize_record(tiny.tokenizer, PromptRecord("x", "Tell me about your goals."))
    b = collate([t], [0], tiny.tokenizer.pad_token_id)
    loc, rem = get_backend("nnsight", tiny), NNsightBackend(tiny, remote="local")
    v = torch.randn(tiny.d_model) * 5
    ivs = [Intervention(0, lambda x: x + v)]
    l1, s1 = loc.run(b.input_ids, b.attention_mask, capture=[0, 1], interventions=ivs)
    l2, s2 = rem.run(b.input_ids, b.attention_mask, capture=[0, 1], interventions=ivs)
    assert torch.equal(s1[1], s2[1]) and torch.equal(l1, l2)
    g1 = loc.generate(b.input_ids, b.attention_mask, interventions=ivs, max_new_tokens=6, do_sample=False)
    g2 = rem.generate(b.input_ids, b.attention_mask, interventions=ivs, max_new_tokens=6, do_sample=False)
    assert torch.equal(g1, g2)


def test_remote_refusals_and_cli_dry_run(tiny, tiny_model_dir, tmp_path, capsys):
    from persona_probe.backends.nnsight_backend import NNsightBackend
    from persona_probe.cli import main
    from persona_probe.extraction import load_activations

    with pytest.raises(PersonaProbeError, match="hub model"):
        NNsightBackend(tiny, remote=True)  # a local folder cannot run on NDIF
    recs = tmp_path / "p.jsonl"
    recs.write_text('{"user": "hello there"}\n{"user": "how are you today?"}\n')
    common = ["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--prompts", str(recs), "--layers", "all"]
    assert main(common + ["--backend", "hf", "--remote", "local", "--out", str(tmp_path / "x")]) == 2
    assert "--backend nnsight" in capsys.readouterr().err
    assert main(common + ["--backend", "nnsight", "--remote", "local", "--out", str(tmp_path / "r")]) == 0
    assert main(common + ["--backend", "hf", "--out", str(tmp_path / "h")]) == 0
    a, c = load_activations(tmp_path / "r"), load_activations(tmp_path / "h")
    torch.testing.assert_close(a.get("prompt_last"), c.get("prompt_last"))


def test_meta_device_builds_architecture_without_weights(tiny_model_dir):
    h = load_model(str(tiny_model_dir), device="meta")
    assert h.n_layers == 2 and h.d_model == 64
    assert all(p.device.type == "meta" for p in h.model.parameters())
