"""The portable comparisons still bite: a deliberately wrong intervention (wrong layer, wrong sign, missing
mask) or a wrong pooling fails each of them by far more than the tolerance."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_rel_close, fp32_rel_tol, rel_err, smol_tol
from test_backends import GEN_NEW, RECORDS, check_generation, gen_batch, gen_ivs, steer_ivs, teacher_forced
from test_extraction import RECS

from persona_probe import extract, load_prompts
from persona_probe.activations import extraction as ex
from persona_probe.backends import get_backend
from persona_probe.prompts.records import collate, length_sorted_batches, tokenize_record


def test_tolerance_formula():
    # 30 blocks, 1536-wide MLP reduction, safety 8: ~1.1e-3 relative; grows with depth and width
    assert fp32_rel_tol(30, 1536) == pytest.approx(8 * 30 * 1536 ** 0.5 * 2 ** -23)
    assert fp32_rel_tol(60, 1536) == pytest.approx(2 * fp32_rel_tol(30, 1536))
    assert rel_err(torch.tensor([1e4, 0.0]), torch.tensor([1e4 + 1, 5e-5])) == pytest.approx(1e-4, rel=1e-3)


@pytest.fixture(scope="module")
def batch(smol):
    toks = [tokenize_record(smol.tokenizer, r) for r in RECORDS]
    return length_sorted_batches(toks, 8, smol.tokenizer.pad_token_id)[0]


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
@pytest.mark.parametrize("bug", ["layer", "sign"])
def test_wrong_steering_fails_logit_comparison(smol, batch, backend, bug):
    right = steer_ivs(smol.d_model)
    wrong = steer_ivs(smol.d_model, layers=(7, 12)) if bug == "layer" else steer_ivs(smol.d_model, signs=(-1.0, -0.5))
    m = batch.attention_mask.bool()
    ref = get_backend("hf", smol).run(batch.input_ids, batch.attention_mask, interventions=right)[0]
    got = get_backend(backend, smol).run(batch.input_ids, batch.attention_mask, interventions=wrong)[0]
    assert rel_err(got[m], ref[m]) > 100 * smol_tol(smol)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(got[m], ref[m], smol_tol(smol), "bite")


def test_wrong_layer_fails_residual_comparison(smol, batch):
    """Capturing layer L+1 where layer L was asked for (an off-by-one in the layer convention) fails."""
    m = batch.attention_mask.bool()
    _, hf = get_backend("hf", smol).run(batch.input_ids, batch.attention_mask, capture=[10, 11])
    _, nn = get_backend("nnsight", smol).run(batch.input_ids, batch.attention_mask, capture=[10, 11])
    assert_rel_close(nn[10][m], hf[10][m], smol_tol(smol), "bite control")
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(nn[11][m], hf[10][m], smol_tol(smol), "bite")


@pytest.mark.parametrize("bug", ["layer", "sign", "missing response mask", "missing attention mask"])
def test_wrong_generation_fails_teacher_forced_check(smol, bug):
    """A generation made with a wrong intervention (or ignoring the padding mask) is caught by the
    teacher-forced check against the right one."""
    b = gen_batch(smol)
    right = gen_ivs(smol.d_model)
    wrong = {"layer": gen_ivs(smol.d_model, layer=9), "sign": gen_ivs(smol.d_model, sign=-1.0),
             "missing response mask": gen_ivs(smol.d_model, where="all")}.get(bug, right)
    mask = torch.ones_like(b.attention_mask) if bug == "missing attention mask" else b.attention_mask
    gen = get_backend("transformer_lens", smol).generate(b.input_ids, mask, interventions=wrong,
                                                         max_new_tokens=GEN_NEW, do_sample=False)
    with pytest.raises(AssertionError, match="not a near-tie"):
        check_generation(smol, gen, b, right, smol_tol(smol))


def test_missing_response_mask_fails_teacher_forced_logits(smol):
    b = gen_batch(smol)
    gen = get_backend("hf", smol).generate(b.input_ids, b.attention_mask, interventions=gen_ivs(smol.d_model),
                                           max_new_tokens=GEN_NEW, do_sample=False)
    ref = teacher_forced(smol, "hf", b, gen, gen_ivs(smol.d_model))
    got = teacher_forced(smol, "nnsight", b, gen, gen_ivs(smol.d_model, where="all"))
    with pytest.raises(AssertionError, match="relative error"):
        for (lr, _), (lo, _) in zip(ref, got):
            assert_rel_close(lo, lr, smol_tol(smol), "bite")


@pytest.mark.parametrize("bug", ["prompt_mean over padding", "prompt_last off by one"])
def test_wrong_pooling_fails_batched_comparison(smol, bug):
    """Batched pooling that reads padding (or the wrong position) differs from unbatched beyond tolerance."""
    ps = load_prompts(RECS)
    single = extract(smol, ps, layers="all", positions="prompt_last,prompt_mean", batch_size=1, progress=False)
    toks = [tokenize_record(smol.tokenizer, r) for r in ps.records]
    b = collate(toks, list(range(len(toks))), smol.tokenizer.pad_token_id)
    _, store = get_backend("hf", smol).run(b.input_ids, b.attention_mask, capture=list(range(smol.n_layers)))
    wrong = collate(toks, list(range(len(toks))), smol.tokenizer.pad_token_id)
    if bug == "prompt_mean over padding":
        wrong.prompt_len = torch.full_like(b.prompt_len, b.input_ids.shape[1])
        pos = "prompt_mean"
    else:
        wrong.prompt_len = b.prompt_len - 1
        pos = "prompt_last"
    pooled = torch.stack([ex.pool(store[L], wrong, pos) for L in range(smol.n_layers)], 1)
    right = torch.stack([ex.pool(store[L], b, pos) for L in range(smol.n_layers)], 1)
    assert_rel_close(right, single.get(pos), smol_tol(smol), "bite control")
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(pooled, single.get(pos), smol_tol(smol), "bite")
