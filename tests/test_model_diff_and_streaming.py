from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from persona_probe import load_model
from persona_probe.directions.derive import cosine
from persona_probe.prompts.records import PromptRecord


def test_model_diff_on_base_plus_lora(tiny_model_dir, tiny, tmp_path):
    """Base + a locally built LoRA adapter: the model-diff direction equals mean(ft) - mean(base)."""
    from peft import LoraConfig, get_peft_model

    from persona_probe.activations.extraction import extract
    from persona_probe.directions.workflows import model_diff_direction

    base_model = load_model(str(tiny_model_dir)).model
    torch.manual_seed(1)
    peft_model = get_peft_model(base_model, LoraConfig(r=4, target_modules=["o_proj", "down_proj"],
                                                       init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    ft = load_model(str(tiny_model_dir), adapter=str(tmp_path / "lora"))
    recs = [PromptRecord(f"p{i}", f"Question number {i}: what do you think about topic {i}?",
                         labels={"question_id": f"q{i}"}) for i in range(12)]
    d = model_diff_direction(tiny, ft, recs, layers="all", out=tmp_path / "md", progress=False)
    a_ft = extract(ft, recs, layers="all", progress=False).get("prompt_last")
    a_b = extract(tiny, recs, layers="all", progress=False).get("prompt_last")
    train = [i for i, r in enumerate(recs)
             if r.labels["question_id"] not in {recs[j].labels["question_id"] for j in range(12)
                                                if j not in _train_idx(d)}]
    expected = a_ft[train].mean(0) - a_b[train].mean(0)
    torch.testing.assert_close(d.vectors, expected, atol=1e-5, rtol=1e-4)
    assert d.manifest["method"] == "model_diff" and d.manifest["base_model"]["fingerprint"] == tiny.info.fingerprint
    assert cosine(d.vectors[-1], expected[-1]) > 0.999
    assert (tmp_path / "md" / "manifest.json").exists()


def _train_idx(d) -> set[int]:
    n_train = d.manifest["split"]["n_train"][0]
    from persona_probe.directions.derive import grouped_split

    groups = [f"q{i}" for i in range(12)]
    tr, _ = grouped_split(sorted(set(groups)), d.manifest["split"]["test_frac"], d.manifest["split"]["seed"])
    keep = {sorted(set(groups))[i] for i in tr}
    idx = {i for i, g in enumerate(groups) if g in keep}
    assert len(idx) == n_train
    return idx


SCRIPT = textwrap.dedent('''
    import json, resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from persona_probe.models.loading import ModelHandle, ModelInfo
    from persona_probe.activations.extraction import extract
    from persona_probe.prompts.records import PromptRecord
    n = int(sys.argv[1]); tok_dir = sys.argv[2]; out = sys.argv[3]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    h = ModelHandle(m, tok, ModelInfo("synthetic", "local", "-", None, "fp", n_layers=2, d_model=256))
    recs = [PromptRecord(str(i), "word " * 40) for i in range(n)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extract(h, recs, layers="all", positions="all", out=out, shard_size=64, batch_size=16, progress=False)
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_kb": before}))
''')


def _peak(n: int, tok_dir: str, out: str) -> int:
    # the loader validates shards at the end, so measure the streaming phase: no load_activations here
    code = SCRIPT.replace("\nextract(h, recs", "\nimport persona_probe.activations.extraction as ex\n"
                                                "ex.load_activations = lambda f: None\nextract(h, recs")
    assert code != SCRIPT  # the patch must land, or the loader's full merge is what gets measured
    r = subprocess.run([sys.executable, "-c", code, str(n), tok_dir, out], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return d["peak_kb"] - d["before_kb"]


def test_streaming_memory_does_not_grow_with_prompt_count(tiny_model_dir, tmp_path):
    """Token-level extraction of 64 vs 1024 prompts (~64 KB each) streams to shards of 64 prompts: peak
    memory stays flat instead of growing by the ~60 MB that holding every prompt would need."""
    small = _peak(64, str(tiny_model_dir), str(tmp_path / "a"))
    large = _peak(1024, str(tiny_model_dir), str(tmp_path / "b"))
    per_prompt_kb = 2 * 48 * 256 * 4 / 1024  # layers x tokens x d x fp32 (upper bound on tokens)
    assert large - small < 0.25 * (1024 - 64) * per_prompt_kb, (small, large)
    assert len(list((tmp_path / "b").glob("shard-*.safetensors"))) == 16
