from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_rel_close, smol_tol

from persona_probe import PersonaProbeError, extract, load_activations, load_prompts
from persona_probe.activations import extraction as ex
from persona_probe.prompts.records import PromptRecord, collate, length_sorted_batches, padding_waste, tokenize_record

RECS = [
    PromptRecord("r0", "What should I cook tonight?", system="You are a chef."),
    PromptRecord("r1", "Hi"),
    PromptRecord("r2", "Explain photosynthesis in one sentence, please, for a child who is eight years old."),
    PromptRecord("r3", "Hello", assistant="Hi there! What can I do for you?"),
    PromptRecord("r4", "Is it going to rain?", assistant="I can't see the weather, but a forecast app can tell you."),
    PromptRecord("r5", "Count to three.", assistant="One, two, three."),
]


def test_parse_layers(smol):
    n = smol.n_layers
    assert ex.parse_layers("all", n) == list(range(n))
    assert ex.parse_layers("10,15", n) == [10, 15]
    assert ex.parse_layers("10:13", n) == [10, 11, 12]
    assert ex.parse_layers("embed,-1", n) == ["embed", n - 1]
    for bad, msg in [("30", "out of range"), ("5:40", "out of range"), ("x", "bad layer")]:
        with pytest.raises(PersonaProbeError, match=msg):
            ex.parse_layers(bad, n)


def test_pooling_known_answer():
    """pool() on a hand-made tensor: prompt_last, prompt_mean (skips token 0), response_mean."""
    from persona_probe.prompts.records import TokenizedPrompt

    toks = [TokenizedPrompt([1, 2, 3, 4, 5], 3, 3, 5), TokenizedPrompt([1, 2, 3], 2, 2, 3)]
    b = collate(toks, [0, 1], pad_id=0)
    resid = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)  # value = 5*row + position
    assert ex.pool(resid, b, "prompt_last").flatten().tolist() == [2.0, 6.0]
    assert ex.pool(resid, b, "prompt_mean").flatten().tolist() == [1.5, 6.0]
    assert ex.pool(resid, b, "response_mean").flatten().tolist() == [3.5, 7.0]


def test_batched_equals_unbatched(smol):
    ps = load_prompts(RECS)
    batched = extract(smol, ps, layers="all", positions="prompt_last,prompt_mean,response_mean" if ps.has_responses
                      else "prompt_last,prompt_mean", batch_size=6, progress=False)
    single = extract(smol, ps, layers="all", positions="prompt_last,prompt_mean", batch_size=1, progress=False)
    # batch size changes the matmul shapes, so BLAS reduces in another order: rounding-level differences only
    for p in ("prompt_last", "prompt_mean"):
        assert batched.get(p).shape == (6, 30, 576)
        assert_rel_close(batched.get(p), single.get(p), smol_tol(smol), f"batched vs unbatched {p}")


def test_token_level_matches_pooled(smol):
    acts = extract(smol, RECS[:3], layers="3,7", positions="prompt_last,all", batch_size=3, progress=False)
    assert acts.tokens is not None and acts.tokens.shape[:2] == (3, 2)
    lens = acts.token_mask.sum(1)
    toks = [tokenize_record(smol.tokenizer, r) for r in RECS[:3]]
    for i, t in enumerate(toks):
        assert int(lens[i]) == len(t.ids)
        torch.testing.assert_close(acts.tokens[i, :, t.prompt_len - 1], acts.get("prompt_last")[i])


def test_response_mean_needs_assistant(smol):
    with pytest.raises(PersonaProbeError, match="response_mean needs an assistant turn"):
        extract(smol, RECS, positions="response_mean", progress=False)


def test_unknown_position_and_backend(smol):
    with pytest.raises(PersonaProbeError, match="unknown position"):
        extract(smol, RECS, positions="middle", progress=False)
    with pytest.raises(PersonaProbeError, match="unknown backend"):
        extract(smol, RECS, backend="jax", progress=False)


def test_length_sorted_batching_reduces_padding(smol):
    toks = [tokenize_record(smol.tokenizer, PromptRecord(str(i), "word " * (3 + (i * 37) % 60))) for i in range(64)]
    unsorted = [collate(toks[i:i + 8], range(i, i + 8), 0) for i in range(0, 64, 8)]
    srt = length_sorted_batches(toks, 8, 0)
    assert sorted(i for b in srt for i in b.index) == list(range(64))
    assert padding_waste(srt) < 0.15 < padding_waste(unsorted)


def test_artifact_roundtrip_and_manifest(smol, tmp_path):
    out = tmp_path / "acts"
    acts = extract(smol, RECS, layers="0,5", positions="prompt_last", out=out, shard_size=4, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    for key in ("model", "backend", "layers", "positions", "prompt_set", "dtype", "package_version", "seed", "created"):
        assert key in m, key
    assert m["model"]["revision"] and m["prompt_set"]["hash"] == load_prompts(RECS).hash and m["n_shards"] == 2
    again = load_activations(out)
    assert [r.id for r in again.records] == [r.id for r in RECS]
    torch.testing.assert_close(again.get("prompt_last"), acts.get("prompt_last"))
    assert again.get("prompt_last", layer=5).shape == (6, 576)


class _Killed(BaseException):
    pass


def test_resume_after_kill_skips_finished_shards(smol, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    calls: list[int] = []
    kill = [True]
    real = ex._extract_shard

    def flaky(be, toks, *a, **k):
        calls.append(len(toks))
        if kill and len(calls) == 2:
            raise _Killed  # the process dies while computing the second shard
        return real(be, toks, *a, **k)

    monkeypatch.setattr(ex, "_extract_shard", flaky)
    with pytest.raises(_Killed):
        extract(smol, RECS, layers="0,5", out=out, shard_size=2, progress=False)
    first = out / "shard-00000.safetensors"
    assert first.exists() and not (out / "shard-00001.safetensors").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(PersonaProbeError, match="unfinished"):
        load_activations(out)
    mtime = first.stat().st_mtime_ns
    calls.clear()
    kill.clear()
    acts = extract(smol, RECS, layers="0,5", out=out, shard_size=2, progress=False)
    assert calls == [2, 2]  # shards 1 and 2 only; shard 0 was kept
    assert first.stat().st_mtime_ns == mtime
    fresh = extract(smol, RECS, layers="0,5", progress=False)
    torch.testing.assert_close(acts.get("prompt_last"), fresh.get("prompt_last"))
    assert not list(out.glob(".*.tmp"))  # no half-written files left behind


def test_refuses_other_run_and_corrupt_shard(smol, tmp_path):
    out = tmp_path / "acts"
    extract(smol, RECS[:2], layers="0", out=out, progress=False)
    with pytest.raises(PersonaProbeError, match="different run"):
        extract(smol, RECS[:3], layers="0", out=out, progress=False)
    extract(smol, RECS[:3], layers="0", out=out, overwrite=True, progress=False)
    (out / "shard-00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(PersonaProbeError, match="corrupt artifact"):
        load_activations(out)


def test_prompt_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "fine"}\n{"user": \n')
    with pytest.raises(PersonaProbeError, match=r"bad.jsonl:2"):
        load_prompts(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PersonaProbeError, match="empty"):
        load_prompts(str(empty))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                             {"role": "assistant", "content": "A"}]}) + "\n")
    (r,) = load_prompts(str(chat)).records
    assert (r.system, r.user, r.assistant) == ("S", "U", "A")


def test_no_double_bos(smol):
    t = tokenize_record(smol.tokenizer, RECS[0])
    first = t.ids[0]
    assert t.ids[1] != first or first not in smol.tokenizer.all_special_ids


def test_cli_extract_and_errors(tmp_path, capsys):
    from persona_probe.cli.main import main

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in RECS[:2]))
    assert main(["extract", "--model", "smollm2", "--prompts", str(f), "--layers", "0,29", "--out",
                 str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert load_activations(tmp_path / "o").get("prompt_last").shape == (2, 2, 576)
    assert main(["extract", "--model", "smollm2", "--prompts", str(f), "--layers", "31", "--out",
                 str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("persona-probe extract: error: layer 31 out of range")
    assert not (tmp_path / "o2").exists()


def test_auto_batch_size(smol):
    from persona_probe.activations.extraction import auto_batch_size

    assert auto_batch_size(smol, 64, 30) == 8  # CPU: the default
    cfg = smol.model.config
    per_seq = 64 * cfg.vocab_size * 8 + 30 * 64 * 576 * 4 + 16 * 64 * 576 * 4 + cfg.num_attention_heads * 64 * 64 * 4
    assert auto_batch_size(smol, 64, 30, free_bytes=10 * per_seq) == 7  # 0.7 x free / per sequence
    assert auto_batch_size(smol, 64, 30, free_bytes=10**13) == 256 and auto_batch_size(smol, 64, 30, free_bytes=1) == 1
    assert auto_batch_size(smol, 2048, 30, free_bytes=10**10) < auto_batch_size(smol, 64, 30, free_bytes=10**10)
