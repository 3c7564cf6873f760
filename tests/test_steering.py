from __future__ import annotations

import pytest
import torch
from numerics import assert_rel_close, fp32_rel_tol, smol_tol

from persona_probe import PersonaProbeError, load_model
from persona_probe.backends import BACKENDS, get_backend
from persona_probe.interventions import steering as S
from persona_probe.prompts.records import PromptRecord, length_sorted_batches, tokenize_record

RECS = [PromptRecord("a", "What is your favourite season and why?"),
        PromptRecord("b", "Tell me about dogs.", assistant="Dogs are loyal companions.")]


@pytest.fixture(scope="module")
def batch(smol):
    return length_sorted_batches([tokenize_record(smol.tokenizer, r) for r in RECS], 8, smol.tokenizer.pad_token_id)[0]


@pytest.fixture(scope="module")
def direction(smol):
    return torch.randn(smol.d_model, generator=torch.Generator().manual_seed(7))


def test_parse_alphas():
    assert S.parse_alphas("0, 0.5,2") == [0.0, 0.5, 2.0]
    with pytest.raises(PersonaProbeError, match="empty"):
        S.parse_alphas("")
    with pytest.raises(PersonaProbeError, match="not numbers"):
        S.parse_alphas("0,big")


def test_alpha_units(smol, direction):
    norms = S.residual_norms(smol, [10])
    assert norms[10] > 0
    v_res = S.steering_vector(direction, 2.0, unit="resid", resid_norm=norms[10])
    assert float(v_res.norm()) == pytest.approx(2.0 * norms[10], rel=1e-5)
    torch.testing.assert_close(S.steering_vector(direction, 2.0, unit="raw"), 2.0 * direction)


def test_addition_shifts_projection_by_alpha(smol, batch, direction):
    ivs = S.add_interventions({12: direction}, 0.5, handle=smol)
    be = get_backend("hf", smol)
    _, base = be.run(batch.input_ids, batch.attention_mask, capture=[12])
    _, st = be.run(batch.input_ids, batch.attention_mask, capture=[12], interventions=ivs)
    u = direction / direction.norm()
    shift = (st[12] - base[12]) @ u
    expected = 0.5 * S.residual_norms(smol, [12])[12]
    # st - base at the steered layer is v up to the rounding of two residuals of norm |h| each
    tol = fp32_rel_tol(1, smol.d_model) * float(base[12].norm(dim=-1).max()) / expected
    assert_rel_close(shift / expected, torch.ones_like(shift), tol, "steering shift / alpha*norm")


@pytest.mark.parametrize("mode", ["resid", "writers"])
def test_ablation_zeroes_projection_at_every_layer(smol, batch, direction, mode):
    ivs = S.ablation_interventions(direction, smol.n_layers, mode=mode)
    _, st = get_backend("hf", smol).run(batch.input_ids, batch.attention_mask, capture=list(range(smol.n_layers)),
                                        interventions=ivs)
    u = direction / direction.norm()
    m = batch.attention_mask.bool()
    for L in range(smol.n_layers):
        proj = (st[L][m] @ u).abs()
        scale = st[L][m].norm(dim=-1)
        # what is left after removing u is the rounding of one d_model-term dot product (and its subtraction)
        assert_rel_close(proj / scale, torch.zeros_like(proj), fp32_rel_tol(1, smol.d_model),
                         f"ablated projection / norm: L{L}")


def test_steered_and_ablated_logits_same_across_backends(smol, batch, direction):
    m = batch.attention_mask.bool()
    for ivs in (S.add_interventions({8: direction, 16: direction}, 0.4, handle=smol),
                S.ablation_interventions(direction, smol.n_layers, mode="writers")):
        out = {n: get_backend(n, smol).run(batch.input_ids, batch.attention_mask, interventions=ivs)[0]
               for n in BACKENDS}
        for n in ("transformer_lens", "nnsight"):
            assert_rel_close(out[n][m], out["hf"][m], smol_tol(smol), f"steered/ablated logits {n}")


def test_orthogonalized_weights_match_hook_ablation(smol, batch, direction, tmp_path):
    ivs = S.ablation_interventions(direction, smol.n_layers, mode="writers")
    hooked, _ = get_backend("hf", smol).run(batch.input_ids, batch.attention_mask, interventions=ivs)
    out = S.save_orthogonalized(smol, direction, tmp_path / "ortho", source={"test": True})
    ortho = load_model(str(out), device="cpu", dtype="float32")
    assert not ortho.model.config.tie_word_embeddings  # untied before editing the embedding
    plain, _ = get_backend("hf", smol).run(batch.input_ids, batch.attention_mask)
    ol, _ = get_backend("hf", ortho).run(batch.input_ids, batch.attention_mask)
    m = batch.attention_mask.bool()
    assert float((plain[m] - hooked[m]).abs().max()) > 0.1  # ablation changes the logits
    assert_rel_close(ol[m], hooked[m], smol_tol(smol), "orthogonalized weights vs hook ablation logits")
    # the original model is untouched, and an existing path is refused
    assert torch.equal(get_backend("hf", smol).run(batch.input_ids, batch.attention_mask)[0], plain)  # same inputs, same kernels
    with pytest.raises(PersonaProbeError, match="already exists"):
        S.save_orthogonalized(smol, direction, out, source={})
