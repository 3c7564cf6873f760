"""The neutral-text guard: how much an intervention changes the model on text unrelated to the character
(KL of next-token distributions, perplexity ratio) — a steering effect is only interesting when this is small."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from persona_probe.backends import Intervention, get_backend
from persona_probe.core.jsonl import read_jsonl
from persona_probe.interventions.steering import NEUTRAL_REFERENCE
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import PromptRecord, data_path, length_sorted_batches, tokenize_record


def neutral_texts(n: int = 16) -> list[PromptRecord]:
    """Neutral reference text for the KL guard (built-in encyclopedic paragraphs when present)."""
    p = data_path("capability", "neutral_text.jsonl")
    if p.exists():
        rows = read_jsonl(p)[:n]
        return [PromptRecord(r["id"], "Tell me something interesting.", assistant=r["text"]) for r in rows]
    return [PromptRecord(str(i), q) for i, q in enumerate(NEUTRAL_REFERENCE)]


@torch.inference_mode()
def kl_guard(handle: ModelHandle, interventions: Sequence[Intervention], records: Sequence[PromptRecord],
             backend: str = "hf") -> dict[str, float]:
    """Mean per-token KL(plain || intervened) of next-token distributions on neutral text, and the
    intervened model's perplexity ratio on the neutral responses (1.0 = unchanged)."""
    be = get_backend(backend, handle)
    toks = [tokenize_record(handle.tokenizer, r) for r in records]
    kls, nll_p, nll_i, n = [], 0.0, 0.0, 0
    for b in length_sorted_batches(toks, 16, handle.tokenizer.pad_token_id):
        lp, _ = be.run(b.input_ids, b.attention_mask)
        li, _ = be.run(b.input_ids, b.attention_mask, interventions=interventions)
        m = b.attention_mask.bool().to(lp.device)
        lp, li = lp.float().log_softmax(-1), li.float().log_softmax(-1)
        kl = (lp.exp() * (lp - li)).sum(-1)
        kls.append(kl[m].cpu())
        # perplexity over response tokens (teacher-forced next-token NLL)
        tgt = b.input_ids.to(lp.device)[:, 1:]
        ar = torch.arange(tgt.shape[1], device=lp.device)[None]
        rm = (ar + 1 >= b.resp_start.to(lp.device)[:, None]) & (ar + 1 < b.resp_end.to(lp.device)[:, None])
        nll_p += float(-lp[:, :-1].gather(-1, tgt[..., None])[..., 0][rm].sum())
        nll_i += float(-li[:, :-1].gather(-1, tgt[..., None])[..., 0][rm].sum())
        n += int(rm.sum())
    out = {"kl_neutral": float(torch.cat(kls).mean())}
    if n:
        out["ppl_ratio_neutral"] = float(torch.exp(torch.tensor((nll_i - nll_p) / n)))
    return out
