"""Residual-stream extraction: batched, streamed to safetensors shards, resumable.

Pooled positions give `[n_prompts, n_layers, d_model]`; `all` gives token-level
`[n_prompts, n_layers, n_tokens, d_model]` plus a `[n_prompts, n_tokens]` mask. Shards hold
`shard_size` prompts each, so memory grows with batch x layers x positions kept, never with the
number of prompts; a killed run keeps its finished shards and skips them on rerun.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from persona_probe.backends import get_backend
from persona_probe.core.artifacts import (
    MANIFEST,
    base_manifest,
    load_tensors,
    read_manifest,
    save_tensors,
    write_manifest,
)
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import read_jsonl
from persona_probe.core.layers import parse_layers
from persona_probe.core.paths import atomic_write_text
from persona_probe.core.types import LayerId
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.records import (
    POSITIONS,
    Batch,
    PromptRecord,
    PromptSet,
    length_sorted_batches,
    load_prompts,
    tokenize_record,
)


def check_positions(positions: Sequence[str] | str, prompts: PromptSet) -> list[str]:
    pos = [p.strip() for p in positions.split(",")] if isinstance(positions, str) else list(positions)
    for p in pos:
        if p not in POSITIONS:
            raise PersonaProbeError(f"unknown position {p!r}: use one of {', '.join(POSITIONS)}")
    if "response_mean" in pos and not prompts.has_responses:
        missing = next(r.id for r in prompts.records if r.assistant is None)
        raise PersonaProbeError(
            f"position response_mean needs an assistant turn in every record (record {missing!r} has none): "
            "add responses (e.g. generate them) or use prompt_last/prompt_mean"
        )
    if not pos:
        raise PersonaProbeError("no positions given: use e.g. --positions prompt_last")
    return pos


def pool(resid: Tensor, batch: Batch, position: str) -> Tensor:
    """Pool one layer's residuals [b, s, d] to [b, d] at `position` (`all` handled by the caller).

    prompt_mean skips token 0: it is an attention sink whose norm dwarfs the others in most models.
    """
    b, s, _ = resid.shape
    ar = torch.arange(s, device=resid.device)[None, :]
    if position == "prompt_last":
        return resid[torch.arange(b, device=resid.device), (batch.prompt_len - 1).to(resid.device)]
    if position == "prompt_mean":
        lo, hi = torch.ones_like(batch.prompt_len), batch.prompt_len
        lo = torch.where(hi > 1, lo, torch.zeros_like(lo))
    elif position == "response_mean":
        lo, hi = batch.resp_start, batch.resp_end
    else:
        raise PersonaProbeError(f"cannot pool position {position!r}")
    m = ((ar >= lo.to(resid.device)[:, None]) & (ar < hi.to(resid.device)[:, None])).to(resid.dtype)
    return (resid * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)


def layer_key(L: LayerId) -> str:
    return str(L)


@dataclass
class ActivationSet:
    """Loaded activations: `pooled[position]` is [n, n_layers, d]; `tokens` is [n, n_layers, T, d]."""

    folder: Path | None
    manifest: dict[str, Any]
    records: list[PromptRecord]
    pooled: dict[str, Tensor]
    tokens: Tensor | None = None
    token_mask: Tensor | None = None

    @property
    def layers(self) -> list[LayerId]:
        return [L if L == "embed" else int(L) for L in self.manifest["layers"]]

    def layer_index(self, layer: LayerId) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise PersonaProbeError(f"layer {layer} was not extracted here (layers: {self.manifest['layers']})") from None

    def get(self, position: str, layer: LayerId | None = None) -> Tensor:
        """[n, n_layers, d] at a pooled position, or [n, d] for one layer."""
        if position not in self.pooled:
            raise PersonaProbeError(f"position {position!r} not extracted here (have: {', '.join(self.pooled)})")
        x = self.pooled[position]
        return x if layer is None else x[:, self.layer_index(layer)]

    @property
    def d_model(self) -> int:
        return int(self.manifest["model"]["d_model"])


def _run_config(handle: ModelHandle, prompts: PromptSet, layers: list[LayerId], positions: list[str], backend: str,
                seed: int, shard_size: int) -> dict[str, Any]:
    return {
        "model": handle.info.to_dict(), "backend": backend, "layers": [layer_key(L) for L in layers],
        "positions": positions, "prompt_set": {"name": prompts.name, "hash": prompts.hash, "n": len(prompts)},
        "dtype": str(handle.dtype).replace("torch.", ""), "seed": seed, "shard_size": shard_size,
    }


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("layers", "positions", "prompt_set", "shard_size", "dtype")
    return all(a.get(k) == b.get(k) for k in keys) and (a["model"]["fingerprint"], a["model"]["adapter_fingerprint"]) \
        == (b["model"]["fingerprint"], b["model"]["adapter_fingerprint"])


def extract_batch(backend_obj: Any, batch: Batch, layers: list[LayerId], positions: list[str]) -> dict[str, Any]:
    """Run one batch; return pooled {position: [b, L, d]} and, for `all`, token-level [b, L, s, d]."""
    _, store = backend_obj.run(batch.input_ids, batch.attention_mask, capture=layers, return_logits=False)
    out: dict[str, Any] = {}
    for p in positions:
        if p == "all":
            out["all"] = torch.stack([store[L] for L in layers], 1).float().cpu()  # [b, L, s, d]
            out["all_mask"] = batch.attention_mask.clone()
        else:
            out[p] = torch.stack([pool(store[L], batch, p) for L in layers], 1).float().cpu()
    return out


def auto_batch_size(handle: ModelHandle, max_len: int, n_capture: int, *, free_bytes: int | None = None,
                    default: int = 8, cap: int = 256, headroom: float = 0.7) -> int:
    """Largest batch whose forward pass fits in free accelerator memory (CPU: `default`).

    Per sequence of `max_len` tokens: logits [s, vocab] (+ fp32 copy), captured residuals [n_capture, s, d],
    ~16 working copies of [s, d] (attention/MLP intermediates) and eager attention scores [heads, s, s].
    `free_bytes` overrides the CUDA query (tests)."""
    if free_bytes is None:
        if handle.device.type != "cuda":
            return default
        free_bytes, _ = torch.cuda.mem_get_info(handle.device)
    cfg = handle.model.config
    el = torch.finfo(handle.dtype).bits // 8
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    d, s = handle.d_model, max(int(max_len), 1)
    per_seq = s * vocab * (el + 4) + n_capture * s * d * el + 16 * s * d * el + heads * s * s * el
    return int(max(1, min(cap, headroom * free_bytes // max(per_seq, 1))))


def extract(
    handle: ModelHandle,
    prompts: str | Path | PromptSet,
    *,
    layers: str | Sequence[LayerId] | None = "all",
    positions: str | Sequence[str] = ("prompt_last",),
    backend: str = "hf",
    batch_size: int | str = 8,
    out: str | Path | None = None,
    shard_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    backend_kwargs: dict[str, Any] | None = None,
) -> ActivationSet:
    """Extract residual-stream activations. With `out`, shards stream to disk and the run resumes.
    `batch_size="auto"` sizes batches to free GPU memory per shard (`auto_batch_size`; CPU: 8)."""
    ps = load_prompts(prompts)
    Ls = parse_layers(layers, handle.n_layers)
    pos = check_positions(positions, ps)
    be = get_backend(backend, handle, **(backend_kwargs or {}))
    torch.manual_seed(seed)
    cfg = _run_config(handle, ps, Ls, pos, be.name, seed, shard_size)
    folder = Path(out) if out is not None else None
    if folder is not None:
        _prepare_folder(folder, cfg, overwrite)
        atomic_write_text(folder / "records.jsonl",
                          "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in ps.records))
    n_shards = (len(ps) + shard_size - 1) // shard_size
    results: list[dict[str, Tensor]] = []
    tok = handle.tokenizer
    bar = tqdm(total=len(ps), desc=f"extract [{be.name}]", unit="prompt", disable=not progress)
    n_tokens = n_padded = 0
    for si in range(n_shards):
        shard_path = folder / f"shard-{si:05d}.safetensors" if folder is not None else None
        lo, hi = si * shard_size, min((si + 1) * shard_size, len(ps))
        if shard_path is not None and shard_path.exists():
            load_tensors(shard_path)  # validates; a corrupt shard raises a one-line error
            bar.update(hi - lo)
            continue
        toks = [tokenize_record(tok, r) for r in ps.records[lo:hi]]
        bs = auto_batch_size(handle, max(len(t.ids) for t in toks), len(Ls)) if batch_size == "auto" else batch_size
        shard = _extract_shard(be, toks, Ls, pos, int(bs), tok.pad_token_id, bar)
        n_tokens += shard.pop("_n_tokens")  # type: ignore[arg-type]
        n_padded += shard.pop("_n_padded")  # type: ignore[arg-type]
        if shard_path is not None:
            save_tensors(shard_path, shard)
        else:
            results.append(shard)
    bar.close()
    if folder is not None:
        cfg_done = {**base_manifest("activations"), **cfg, "status": "complete", "n_shards": n_shards,
                    "padding_waste": (1 - n_tokens / n_padded) if n_padded else None}
        write_manifest(folder, cfg_done)
        return load_activations(folder)
    merged = _merge(results, pos)
    return ActivationSet(None, {**base_manifest("activations"), **cfg}, list(ps.records), **merged)


def _extract_shard(be: Any, toks: list, layers: list[LayerId], positions: list[str], batch_size: int, pad_id: int,
                   bar: Any) -> dict[str, Any]:
    batches = length_sorted_batches(toks, batch_size, pad_id)
    n = len(toks)
    pooled: dict[str, Tensor] = {}
    token_level: Tensor | None = None
    token_mask: Tensor | None = None
    width = max(len(t.ids) for t in toks)
    for b in batches:
        res = extract_batch(be, b, layers, positions)
        idx = torch.tensor(b.index)
        for p in positions:
            if p == "all":
                x = res["all"]
                if token_level is None:
                    token_level = torch.zeros((n, len(layers), width, x.shape[-1]), dtype=x.dtype)
                    token_mask = torch.zeros((n, width), dtype=torch.long)
                token_level[idx, :, : x.shape[2]] = x
                token_mask[idx, : x.shape[2]] = res["all_mask"]  # type: ignore[index]
            else:
                x = res[p]
                if p not in pooled:
                    pooled[p] = torch.zeros((n, *x.shape[1:]), dtype=x.dtype)
                pooled[p][idx] = x
        bar.update(len(b.index))
    out: dict[str, Any] = dict(pooled)
    if token_level is not None:
        out["all"], out["all_mask"] = token_level, token_mask
    out["_n_tokens"] = sum(b.n_tokens for b in batches)
    out["_n_padded"] = sum(b.n_padded for b in batches)
    return out


def _merge(shards: list[dict[str, Tensor]], positions: list[str]) -> dict[str, Any]:
    pooled = {p: torch.cat([s[p] for s in shards]) for p in positions if p != "all"}
    tokens = mask = None
    if "all" in positions:
        width = max(s["all"].shape[2] for s in shards)
        tokens = torch.cat([torch.nn.functional.pad(s["all"], (0, 0, 0, width - s["all"].shape[2])) for s in shards])
        mask = torch.cat([torch.nn.functional.pad(s["all_mask"], (0, width - s["all_mask"].shape[1])) for s in shards])
    return {"pooled": pooled, "tokens": tokens, "token_mask": mask}


def _prepare_folder(folder: Path, cfg: dict[str, Any], overwrite: bool) -> None:
    """Fresh folder, or resume the same run; a different run's folder needs `overwrite`."""
    if (folder / MANIFEST).exists():
        old = read_manifest(folder)
        if old.get("kind") == "activations" and _same_run(old, cfg):
            return  # same run: resume (finished shards are kept and reused)
        if not overwrite:
            raise PersonaProbeError(
                f"{folder} holds a different run ({old.get('kind')}, prompts {old.get('prompt_set', {}).get('name')}, "
                f"layers {len(old.get('layers', []))}): choose another --out or pass --overwrite"
            )
        for p in folder.glob("shard-*.safetensors"):
            p.unlink()
    elif folder.exists() and any(folder.iterdir()) and not overwrite:
        raise PersonaProbeError(f"{folder} exists and is not an activation folder: choose another --out or --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, {**base_manifest("activations"), **cfg, "status": "running"})


def load_activations(folder: str | Path) -> ActivationSet:
    """Load an activation folder written by `extract` (validates every shard)."""
    folder = Path(folder)
    m = read_manifest(folder, kind="activations")
    if m.get("status") != "complete":
        raise PersonaProbeError(f"{folder} is an unfinished extraction: rerun the same extract command to resume it")
    records = [PromptRecord.from_dict(d, default_id=str(i))
               for i, d in enumerate(read_jsonl(folder / "records.jsonl", what="activation records file"))]
    shards = [load_tensors(folder / f"shard-{i:05d}.safetensors") for i in range(m["n_shards"])]
    merged = _merge(shards, m["positions"])
    return ActivationSet(folder, m, records, **merged)
