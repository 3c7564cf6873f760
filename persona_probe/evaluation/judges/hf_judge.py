"""Judge with a local transformers chat model, the literature's way: one forward pass over the judge
prompt, top-20 next-token logprobs, probability-weighted mean over the number tokens 0..100.
Rows whose number tokens carry too little mass fall back to a short greedy reply, parsed.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from persona_probe.core.errors import PersonaProbeError
from persona_probe.evaluation.judges.base import DEFAULT_JUDGE_PROMPTS, Judge, JudgeScore, metric_value, prompt_keys
from persona_probe.evaluation.judges.logprob import parse_score, weighted_score
from persona_probe.models.loading import ModelHandle, load_model

KEYS: tuple[str, ...] = ("aligned", "coherent")


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template applied to `messages`, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise PersonaProbeError("the model's tokenizer has no chat template: use an instruct/chat model")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def pad_token_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pid) if pid is not None else 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), left-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _accepts(model: Any, arg: str) -> bool:
    """Whether `model.forward` takes keyword `arg` (e.g. logits_to_keep: skip the LM head on the prompt)."""
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class HFJudge(Judge):
    """Scores with a local HF chat model (logprob-weighted 0-100, text fallback)."""

    name = "hf"

    def __init__(self, model: ModelHandle | str, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 8, top_k: int = 20, min_mass: float = 0.25, max_new_tokens: int = 6,
                 progress: bool = True) -> None:
        self.progress = progress  # a bar over the judge prompts of each call
        self.handle = model if isinstance(model, ModelHandle) else load_model(model, device=device, dtype=dtype)
        self.batch_size = max(1, int(batch_size))
        self.top_k = int(top_k)
        self.min_mass = float(min_mass)
        self.max_new_tokens = int(max_new_tokens)

    def describe(self) -> dict[str, Any]:
        info = self.handle.info
        return {"judge": "hf", "model": info.model_id, "fingerprint": info.fingerprint,
                "method": "logprob-weighted 0-100"}

    def _encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        tok = self.handle.tokenizer
        rows = [tok(render_chat(tok, [{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
                for p in prompts]
        return left_pad(rows, pad_token_id(tok), self.handle.device)

    @torch.inference_mode()
    def _top_logprobs(self, prompts: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Top-k next-token (decoded token, logprob) pairs after each prompt."""
        ids, mask = self._encode(prompts)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if _accepts(self.handle.model, "logits_to_keep") else {}
        out = self.handle.model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
        logits = out.logits[:, -1].float()
        top = torch.log_softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        tok = self.handle.tokenizer
        return [[(tok.decode([int(t)]), float(lp)) for lp, t in zip(vals.tolist(), idx.tolist())]
                for vals, idx in zip(top.values, top.indices)]

    @torch.inference_mode()
    def _generate(self, prompts: Sequence[str]) -> list[str]:
        """Greedy replies of up to `max_new_tokens` tokens."""
        ids, mask = self._encode(prompts)
        tok = self.handle.tokenizer
        out = self.handle.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                         do_sample=False, pad_token_id=pad_token_id(tok))
        return [tok.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:]]

    def _judge_batch(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for top in self._top_logprobs(prompts):
            score, mass = weighted_score(top, self.min_mass)
            results.append({"method": "logprob", "score": score, "mass": mass, "flag": None, "top_logprobs": top})
        todo = [i for i, r in enumerate(results) if r["score"] is None]
        if todo:
            for i, text in zip(todo, self._generate([prompts[i] for i in todo])):
                score, flag = parse_score(text)
                results[i].update(method="text", score=score, flag=flag, text=text)
        return results

    def score(self, items: Sequence[tuple[str, str]],
              judge_prompts: dict[str, str] | None = None) -> list[JudgeScore]:
        templates = {**DEFAULT_JUDGE_PROMPTS, **(judge_prompts or {})}
        names = prompt_keys(judge_prompts)  # every judge prompt of the question is scored
        prompts = [templates[k].format(question=q, answer=a) for q, a in items for k in names]
        results: list[dict[str, Any]] = []
        with tqdm(total=len(prompts), desc="judge prompts (hf)", unit="prompt", leave=False,
                  disable=not self.progress or len(prompts) <= self.batch_size) as bar:
            for i in range(0, len(prompts), self.batch_size):
                results.extend(self._judge_batch(prompts[i:i + self.batch_size]))
                bar.update(len(prompts[i:i + self.batch_size]))
        scores = []
        for j in range(len(items)):
            raw = dict(zip(names, results[j * len(names):(j + 1) * len(names)]))
            flags = {raw[k]["flag"] for k in KEYS}
            scores.append(JudgeScore(aligned=raw["aligned"]["score"], coherent=raw["coherent"]["score"],
                                     refusal="REFUSAL" in flags, code="CODE" in flags, raw=raw,
                                     metrics={k: metric_value(r) for k, r in raw.items() if k not in KEYS}))
        return scores
