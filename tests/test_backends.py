"""All three backends agree with each other and with the documented layer convention."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_rel_close, check_greedy_tokens, logit_tol, smol_tol

from persona_probe import load_model
from persona_probe.backends import BACKENDS, Intervention, get_backend
from persona_probe.core.errors import PersonaProbeError
from persona_probe.prompts.records import PromptRecord, collate, length_sorted_batches, tokenize_record

RECORDS = [
    PromptRecord("a", "How do I bake bread at home?", system="You are a kind assistant."),
    PromptRecord("b", "Hi", assistant="Hello! How can I help you today?"),
    PromptRecord("c", "Name three colours.", assistant="Red, green and blue."),
]


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
def test_backends_same_residuals(smol_eager, runs, batch, name):
    """Same kernels: bit-identical on the CPUs we ran; allowed the bound for one fp32 reordering per block
    (safety 1, 1.4e-4 relative), far tighter than the SDPA-vs-eager comparison below."""
    tol = smol_tol(smol_eager, safety=1.0)
    m = batch.attention_mask.bool()
    ref_logits, ref = runs["hf"]
    logits, store = runs[name]
    assert set(store) == set(ref)
    for L in ref:
        assert_rel_close(store[L][m], ref[L][m], tol, f"eager residuals {name}: L{L}")
    assert_rel_close(logits[m], ref_logits[m], tol, f"eager logits {name}")


def test_backends_with_sdpa_attention(smol, batch):
    """With HF's default SDPA kernel, nnsight hooks the same modules as hf; TransformerBridge computes attention
    eagerly inside, so it differs by kernel rounding — both within the fp32 tolerance for this depth."""
    tol = smol_tol(smol)
    r = _runs(smol, batch)
    m = batch.attention_mask.bool()
    for L in r["hf"][1]:
        for n in ("nnsight", "transformer_lens"):
            assert_rel_close(r[n][1][L][m], r["hf"][1][L][m], tol, f"sdpa residuals {n}: L{L}")


def steer_ivs(d_model: int, scale: float = 8.0, layers=(6, 12), signs=(1.0, -0.5), where="all"):
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(0)) * scale
    return [Intervention(L, (lambda x, s=s: x + s * v), where=where) for L, s in zip(layers, signs)]


def test_backends_same_steered_logits(smol, batch):
    ivs = steer_ivs(smol.d_model)
    m = batch.attention_mask.bool()
    plain = get_backend("hf", smol).run(batch.input_ids, batch.attention_mask)[0]
    out = {n: get_backend(n, smol).run(batch.input_ids, batch.attention_mask, interventions=ivs)[0] for n in BACKENDS}
    assert float((out["hf"][m] - plain[m]).abs().max()) > 1.0  # the intervention does something
    for n in ("transformer_lens", "nnsight"):
        assert_rel_close(out[n][m], out["hf"][m], smol_tol(smol), f"steered logits {n}")


# ----------------------------------------------------------------------------- greedy generation, teacher-forced

GEN_V = 6.0
GEN_NEW = 8


def gen_ivs(d_model: int, layer: int = 5, sign: float = 1.0, where: str = "response") -> list[Intervention]:
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(1)) * GEN_V
    return [Intervention(layer, lambda x: x + sign * v, where=where)]


def gen_batch(smol):
    toks = [tokenize_record(smol.tokenizer, r) for r in RECORDS[:2]]
    return collate(toks, [0, 1], smol.tokenizer.pad_token_id, side="left")


def teacher_forced(smol, backend: str, b, gen: torch.Tensor, ivs) -> list[tuple[torch.Tensor, list[int]]]:
    """Feed each row's prompt + generated tokens (unpadded, stopping after EOS) to `backend` in one forward
    pass with the same interventions on the response positions; returns per row the logits that predict the
    generated tokens [n_new, vocab] and those tokens."""
    s = b.input_ids.shape[1]
    eos = smol.tokenizer.eos_token_id
    out = []
    for i in range(gen.shape[0]):
        prompt = b.input_ids[i][b.attention_mask[i].bool()]
        new = gen[i, s:].tolist()
        if eos in new:
            new = new[:new.index(eos) + 1]
        ids = torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype)])[None]
        resp = torch.zeros_like(ids)
        resp[0, len(prompt) - 1:] = 1  # the last prompt position and every generated one (as in generate)
        logits, _ = get_backend(backend, smol).run(ids, torch.ones_like(ids), interventions=ivs, response_mask=resp)
        out.append((logits[0, len(prompt) - 1:len(prompt) - 1 + len(new)], new))
    return out


def check_generation(smol, gen: torch.Tensor, b, ivs, tol_rel: float) -> None:
    """Every generated token is a near-argmax of hf's teacher-forced logits under `ivs` (see numerics.py)."""
    eos = smol.tokenizer.eos_token_id
    for logits, new in teacher_forced(smol, "hf", b, gen, ivs):
        assert len(new) == GEN_NEW or new[-1] == eos, new  # generate really generated (all, or up to EOS)
        check_greedy_tokens(logits, new, logit_tol(logits, tol_rel))


@pytest.fixture(scope="module")
def steered_gens(smol):
    b = gen_batch(smol)
    ivs = gen_ivs(smol.d_model)
    return b, {n: get_backend(n, smol).generate(b.input_ids, b.attention_mask, interventions=ivs,
                                                max_new_tokens=GEN_NEW, do_sample=False) for n in BACKENDS}


@pytest.mark.parametrize("name", BACKENDS)
def test_backends_same_steered_generation(smol, steered_gens, name):
    """Greedy steered generation through each backend's `generate` picks, at every step, the token hf's
    teacher-forced forward pass picks — or one tied with it within rounding. (Exact token sequences are not
    portable: one near-tie on another CPU sends them apart.)"""
    b, gens = steered_gens
    ivs = gen_ivs(smol.d_model)
    check_generation(smol, gens[name], b, ivs, smol_tol(smol))
    plain = get_backend("hf", smol).generate(b.input_ids, b.attention_mask, max_new_tokens=GEN_NEW, do_sample=False)
    assert not torch.equal(gens[name], plain)  # the steering changes the answer


@pytest.mark.parametrize("name", ["transformer_lens", "nnsight"])
def test_backends_same_teacher_forced_logits(smol, steered_gens, name):
    """On the same tokens (hf's steered generation), each backend's per-step logits equal hf's within the
    fp32 tolerance."""
    b, gens = steered_gens
    ivs = gen_ivs(smol.d_model)
    ref = teacher_forced(smol, "hf", b, gens["hf"], ivs)
    other = teacher_forced(smol, name, b, gens["hf"], ivs)
    for (lr, _), (lo, _) in zip(ref, other):
        assert_rel_close(lo, lr, smol_tol(smol), f"teacher-forced steered logits {name}")


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
    from persona_probe.activations.extraction import load_activations
    from persona_probe.backends.nnsight_backend import NNsightBackend
    from persona_probe.cli.main import main

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


@pytest.mark.parametrize("name", ["transformer_lens", "nnsight"])
def test_backends_same_plain_generation(smol, name):
    """Unsteered greedy generation agrees teacher-forced too (TL 3.9's KV-cached bridge generate did not:
    it repeated one token after the first)."""
    b = gen_batch(smol)
    gen = get_backend(name, smol).generate(b.input_ids, b.attention_mask, max_new_tokens=GEN_NEW, do_sample=False)
    check_generation(smol, gen, b, [], smol_tol(smol))
