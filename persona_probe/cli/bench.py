"""`persona-probe bench`: throughput and memory as ratios against a baseline measured in the same run.

* extraction tokens/s of each backend (capturing every layer) vs a plain forward pass without hooks
* steered vs plain `generate` tokens/s
* peak memory (RSS; CUDA peak on GPU) vs the model's own parameter footprint
* offline-judge seconds per answer
* padding waste of length-sorted vs arrival-order batches on a mixed-length set
Measurements alternate (plain, backend, plain, backend, ...) and report medians, so drift hits both.

`--engine vllm` runs the sampling-engine comparison instead: generated tokens/s of the EM workload (core
questions x samples x tokens) through the hf and the vllm engine, unsteered and steered at 1 and at 4 layers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from persona_probe.backends import BACKENDS, get_backend
from persona_probe.backends.sampling import ENGINES, generate
from persona_probe.backends.vllm import VLLMOptions, get_vllm_engine
from persona_probe.cli import common
from persona_probe.cli.args import Command, Options, api_arg, dataclass_args, dataclass_from_args
from persona_probe.cli.common import default_out, model_args
from persona_probe.core.paths import atomic_write_json
from persona_probe.evaluation.evaluate import question_prompt_records
from persona_probe.evaluation.judges.offline import OfflineJudge
from persona_probe.interventions.steering import add_interventions
from persona_probe.models.loading import ModelHandle
from persona_probe.prompts.questions import as_questions
from persona_probe.prompts.records import PromptRecord, collate, length_sorted_batches, padding_waste, tokenize_record


def _sync(handle: ModelHandle) -> None:
    if handle.device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], handle: ModelHandle) -> float:
    _sync(handle)
    t = time.perf_counter()
    fn()
    _sync(handle)
    return time.perf_counter() - t


def mixed_prompts(n: int, seed: int = 0) -> list[PromptRecord]:
    """Deterministic prompts of mixed lengths (5–120 words) for throughput and padding measurements."""
    g = torch.Generator().manual_seed(seed)
    words = ["the", "model", "answers", "questions", "about", "health", "money", "travel", "cooking", "science", "history", "and", "everyday", "life", "with", "care", "and", "detail", "while", "the", "user", "asks", "for", "help"]
    out = []
    for i in range(n):
        k = int(torch.randint(5, 60, (1,), generator=g))
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        out.append(PromptRecord(f"b{i}", " ".join(words[j] for j in idx)))
    return out


def rss_peak_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 1024 / 1024


_STREAM_SCRIPT = """
import json, resource, sys, tempfile, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from persona_probe.models.loading import ModelHandle, ModelInfo
import persona_probe.activations.extraction as ex
from persona_probe.prompts.records import PromptRecord
n, tok_dir = int(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(tok_dir)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
h = ModelHandle(LlamaForCausalLM(cfg).eval(), tok, ModelInfo("synthetic", "local", "-", None, "fp", n_layers=2,
                                                               d_model=256))
recs = [PromptRecord(str(i), "word " * (8 + i % 24)) for i in range(n)]
ex.load_activations = lambda f: None  # measure the streaming phase, not the final load
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as d:
    ex.extract(h, recs, layers="all", positions="prompt_last,prompt_mean", out=d, shard_size=256, batch_size=32,
               progress=False)
print(json.dumps({"growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def streaming_memory(handle: ModelHandle, sizes: tuple[int, ...] = (500, 10_000)) -> dict[str, Any]:
    """Peak-RSS growth during streamed extraction of `sizes` prompts on a synthetic 2-layer model (fresh
    subprocess each, the real tokenizer): flat means memory does not scale with the number of prompts.
    Kept output per prompt: 2 positions x 3 layers (embed + 2) x 256 floats = 6 KB, so 10 000 prompts held
    in memory would add ~60 MB."""
    res: dict[str, Any] = {"kept_kb_per_prompt": 2 * 3 * 256 * 4 / 1024}
    with tempfile.TemporaryDirectory() as tdir:
        handle.tokenizer.save_pretrained(tdir)
        for n in sizes:
            r = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(n), tdir], capture_output=True, text=True,
                               check=False)
            if r.returncode != 0:
                return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
            res[f"growth_mb_{n}"] = round(json.loads(r.stdout.strip().splitlines()[-1])["growth_mb"], 1)
    res["held_in_memory_would_add_mb"] = round(max(sizes) * res["kept_kb_per_prompt"] / 1024, 1)
    return res


def bench(handle: ModelHandle, *, n_prompts: int = 32, batch_size: int = 16, repeats: int = 3,
          gen_tokens: int = 32, backends: tuple[str, ...] = BACKENDS, judge: bool = True,
          stream_sizes: tuple[int, ...] = (500, 10_000),
          progress: bool = True) -> dict[str, Any]:
    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    recs = mixed_prompts(n_prompts)
    toks = [tokenize_record(handle.tokenizer, r) for r in recs]
    batches = length_sorted_batches(toks, batch_size, handle.tokenizer.pad_token_id)
    n_tok = sum(b.n_tokens for b in batches)
    layers = list(range(handle.n_layers))
    out: dict[str, Any] = {"model": handle.info.to_dict(), "n_prompts": n_prompts, "batch_size": batch_size,
                           "n_tokens": n_tok, "repeats": repeats, "device": str(handle.device),
                           "dtype": str(handle.dtype), "torch": torch.__version__}

    @torch.inference_mode()
    def plain() -> None:
        for b in batches:
            handle.model(input_ids=b.input_ids.to(handle.device), attention_mask=b.attention_mask.to(handle.device))

    def capture(be: Any) -> Callable[[], None]:
        def run() -> None:
            for b in batches:
                be.run(b.input_ids, b.attention_mask, capture=layers)
        return run

    bes = {n: get_backend(n, handle) for n in backends}
    plain()  # warm-up
    for be in bes.values():
        capture(be)()
    times: dict[str, list[float]] = {"plain": [], **{n: [] for n in bes}}
    for r in range(repeats):
        log(f"bench extraction repeat {r + 1}/{repeats}")
        for n, be in bes.items():
            times["plain"].append(_time(plain, handle))
            times[n].append(_time(capture(be), handle))
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    out["extraction"] = {"tokens_per_s": tps, "ratio_vs_plain_forward": {
        n: tps[n] / tps["plain"] for n in bes}, "layers_captured": len(layers)}

    # steered vs plain generate (same prompts, fixed token count, greedy)
    gen_recs = recs[: min(8, n_prompts)]
    gtoks = [tokenize_record(handle.tokenizer, r) for r in gen_recs]
    gb = collate(gtoks, range(len(gtoks)), handle.tokenizer.pad_token_id, side="left")
    v = torch.randn(handle.d_model, generator=torch.Generator().manual_seed(0))
    ivs = add_interventions({handle.n_layers // 2: v}, 0.5, handle=handle)
    hf = bes.get("hf") or get_backend("hf", handle)
    kw = {"max_new_tokens": gen_tokens, "min_new_tokens": gen_tokens, "do_sample": False}
    hf.generate(gb.input_ids, gb.attention_mask, **kw)
    gt: dict[str, list[float]] = {"plain": [], "steered": []}
    for r in range(repeats):
        log(f"bench generate repeat {r + 1}/{repeats}")
        gt["plain"].append(_time(lambda: hf.generate(gb.input_ids, gb.attention_mask, **kw), handle))
        gt["steered"].append(_time(lambda: hf.generate(gb.input_ids, gb.attention_mask, interventions=ivs, **kw),
                                   handle))
    new_tokens = gen_tokens * len(gen_recs)
    gtps = {k: new_tokens / statistics.median(v) for k, v in gt.items()}
    out["generate"] = {"new_tokens_per_s": gtps, "ratio_steered_vs_plain": gtps["steered"] / gtps["plain"],
                       "batch": len(gen_recs), "new_tokens_each": gen_tokens}

    # memory
    param_mb = sum(p.numel() * p.element_size() for p in handle.model.parameters()) / 2**20
    mem: dict[str, Any] = {"model_params_mb": param_mb, "rss_peak_mb": rss_peak_mb(),
                           "rss_peak_over_params": rss_peak_mb() / param_mb}
    if handle.device.type == "cuda":
        mem["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        mem["cuda_peak_over_params"] = mem["cuda_peak_mb"] / param_mb
    out["memory"] = mem

    out["streaming"] = streaming_memory(handle, stream_sizes) if stream_sizes else {"skipped": True}

    # padding: arrival order vs length-sorted
    arrival = [collate(toks[i:i + batch_size], range(i, min(i + batch_size, len(toks))),
                       handle.tokenizer.pad_token_id) for i in range(0, len(toks), batch_size)]
    out["padding_waste"] = {"length_sorted": padding_waste(batches), "arrival_order": padding_waste(arrival)}

    if judge:
        try:
            j = OfflineJudge()
            items = [(r.user, "I would help you with that gladly, here is a careful answer.") for r in recs[:32]]
            j.score(items[:2])
            t = _time(lambda: j.score(items), handle)
            out["offline_judge"] = {"seconds_per_answer": t / len(items), "n": len(items)}
        except Exception as e:  # judge data missing etc.: report, don't fail the bench
            out["offline_judge"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def spread_layers(n_layers: int, k: int) -> list[int]:
    """k layers spread evenly over the middle of the model (k=1: the middle layer)."""
    return [round(n_layers * (i + 1) / (k + 1)) for i in range(k)]


def engine_bench(handle: ModelHandle, *, n_questions: int = 8, n_samples: int = 32, gen_tokens: int = 64,
                 batch_size: int = 32, temperature: float = 1.0, steer_layers: tuple[int, ...] = (1, 4),
                 alpha: float = 1.0, repeats: int = 1, options: VLLMOptions | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Generated tokens/s of the EM workload through the hf and the vllm engine (`generate`, as `eval` samples),
    unsteered and steered (α along a random direction) at each count of `steer_layers`; hf and vllm alternate
    and medians are reported, so machine drift hits both. The ratio is vllm tokens/s over hf tokens/s."""
    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    seen: set[str] = set()
    recs = []
    for r in question_prompt_records(as_questions("builtin:core")):  # one paraphrase per question
        if r.labels.get("question_id") not in seen and len(recs) < n_questions:
            seen.add(r.labels.get("question_id"))
            recs.append(r)
    eng = get_vllm_engine(handle, options)
    for e in ("hf", eng):  # warm-up: first-call costs (allocator, kernels) out of the timings
        generate(handle, recs[:2], max_new_tokens=4, batch_size=batch_size, progress=False, engine=e)
    v = torch.randn(handle.d_model, generator=torch.Generator().manual_seed(0))
    conds: dict[str, list] = {"plain": []}
    for k in steer_layers:
        Ls = spread_layers(handle.n_layers, k)
        conds[f"steered_{k}_layer{'s' if k > 1 else ''}"] = add_interventions({L: v for L in Ls}, alpha, handle=handle)
    out: dict[str, Any] = {"workload": {"questions": len(recs), "samples": n_samples, "max_new_tokens": gen_tokens,
                                        "temperature": temperature, "hf_batch_size": batch_size, "alpha": alpha,
                                        "steer_layers": {k: spread_layers(handle.n_layers, k) for k in steer_layers}},
                           "engine": eng.describe(), "threads": torch.get_num_threads(), "conditions": {}}
    for name, ivs in conds.items():
        runs: dict[str, list[tuple[int, float]]] = {"hf": [], "vllm": []}
        for r in range(repeats):
            for label, e in (("hf", "hf"), ("vllm", eng)):
                log(f"bench engines: {name} {label} (repeat {r + 1}/{repeats})")
                t = time.perf_counter()
                samples = generate(handle, recs, n_samples=n_samples, max_new_tokens=gen_tokens,
                                   temperature=temperature, batch_size=batch_size, interventions=ivs,
                                   progress=False, engine=e)
                runs[label].append((sum(s.n_tokens for s in samples), time.perf_counter() - t))
        res = {}
        for label, rs in runs.items():
            sec = statistics.median(t for _, t in rs)
            tok = statistics.median(n for n, _ in rs)
            res[label] = {"tokens": tok, "seconds": round(sec, 2), "tokens_per_s": round(tok / sec, 1)}
        res["ratio_vllm_over_hf"] = round(res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"], 2)
        out["conditions"][name] = res
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    h = common.load_handle(args)
    if args.engine == "vllm":
        res = {"model": h.info.to_dict(), "device": str(h.device), "torch": torch.__version__,
               "engines": engine_bench(h, n_questions=args.engine_questions, n_samples=args.engine_samples,
                                       gen_tokens=args.engine_tokens, batch_size=args.engine_batch_size,
                                       repeats=args.engine_repeats, options=dataclass_from_args(VLLMOptions, args))}
        out = Path(args.out) if args.out else default_out("bench", args.model, args.adapter, args.device) / \
            "bench_engines.json"
        atomic_write_json(out, res)
        print(json.dumps({"out": str(out), "ratio_vllm_over_hf": {
            k: v["ratio_vllm_over_hf"] for k, v in res["engines"]["conditions"].items()}, **res["engines"]},
            indent=1, default=str))
        return 0
    res = bench(h, n_prompts=args.n_prompts, batch_size=args.batch_size, repeats=args.repeats,
                gen_tokens=args.gen_tokens, backends=tuple(args.backends.split(",")), judge=not args.no_judge,
                stream_sizes=tuple(int(x) for x in args.stream_prompts.split(",") if x.strip()))
    out = Path(args.out) if args.out else default_out("bench", args.model, args.adapter, args.device) / "bench.json"
    atomic_write_json(out, res)
    print(json.dumps({"out": str(out), **{k: v for k, v in res.items() if k != "model"}}, indent=1, default=str))
    return 0


def _bench_options(p: argparse.ArgumentParser) -> None:
    model_args(p)
    api_arg(p, "--n-prompts", bench, help="mixed-length prompts per extraction pass")
    api_arg(p, "--batch-size", bench, help="prompts per forward pass")
    api_arg(p, "--repeats", bench, help="alternating measurements per quantity (medians reported)")
    api_arg(p, "--gen-tokens", bench, help="tokens generated per prompt in the generate benchmark")
    api_arg(p, "--backends", bench, help="comma list of extraction backends to time")
    p.add_argument("--no-judge", action="store_true", help="skip the offline-judge timing")
    api_arg(p, "--stream-prompts", bench, "stream_sizes", help="prompt counts for the streaming-memory check "
            "(synthetic model, one subprocess each; empty = skip)")
    p.add_argument("--engine", choices=ENGINES, default="hf", help="vllm: compare the sampling engines (hf vs vllm "
                   "tokens/s on the EM workload) instead of the extraction/memory bench")
    api_arg(p, "--engine-questions", engine_bench, "n_questions", help="--engine vllm: core questions")
    api_arg(p, "--engine-samples", engine_bench, "n_samples", help="--engine vllm: samples per question")
    api_arg(p, "--engine-tokens", engine_bench, "gen_tokens", help="--engine vllm: max new tokens per sample")
    api_arg(p, "--engine-batch-size", engine_bench, "batch_size", help="--engine vllm: hf generation batch size")
    api_arg(p, "--engine-repeats", engine_bench, "repeats", help="--engine vllm: alternating runs per condition")
    dataclass_args(p, VLLMOptions, flags={f: "--vllm-" + f.replace("_", "-") for f in VLLMOptions.__dataclass_fields__})
    p.add_argument("--out", default=None, help="JSON file for the results "
                   "(default checkpoints/bench/MODEL-DEVICE/bench.json; bench_engines.json with --engine vllm)")


COMMANDS: dict[str, tuple[Command, Options]] = {"bench": (cmd_bench, _bench_options)}
