"""Shared fixtures: the embedded model (built once into checkpoints/cache/models, or reused from an earlier
checkpoints/models) and a tiny local model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the embedded model and the offline judge are cached under the repo's checkpoints/ whatever the test's cwd
# (not in the user's cache folder): tests that need a fresh cache set their own PERSONA_PROBE_HOME
os.environ.setdefault("PERSONA_PROBE_HOME", str(REPO / "checkpoints"))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smol():
    from persona_probe import load_model

    return load_model("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol) -> Path:
    """A 2-layer Llama built from a config (random weights) with the SmolLM2 tokenizer, saved locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    smol.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from persona_probe import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def pytest_terminal_summary(terminalreporter):
    """PP_NUMERICS=1: print the largest observed error against each tolerance (for issue notes)."""
    if not os.environ.get("PP_NUMERICS"):
        return
    from numerics import OBSERVED

    worst: dict[str, tuple[float, float]] = {}
    for what, err, tol in OBSERVED:
        key = what.split(":")[0]
        smallest = key == "bite"  # for a deliberate bug, the weakest bite is the one to report
        if key not in worst or (err / tol < worst[key][0] / worst[key][1]) == smallest:
            worst[key] = (err, tol)
    terminalreporter.write_line("numerics: largest observed error / tolerance (for 'bite': the smallest)")
    for key, (err, tol) in sorted(worst.items()):
        terminalreporter.write_line(f"  {key:<48} {err:.3g} / {tol:.3g}  ({err / tol:.2f} of the limit)")
