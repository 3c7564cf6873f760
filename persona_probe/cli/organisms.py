"""CLI plugin: `persona-probe finetune`, `persona-probe capability`, `persona-probe organisms`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona_probe.core.errors import PersonaProbeError

Command = Callable[[argparse.Namespace], int]


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="embedded name/alias, local HF folder, .gguf file or hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _default_out(data: str) -> str:
    from persona_probe.core.paths import checkpoints_dir

    if data.startswith("builtin:"):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", data.removeprefix("builtin:").removeprefix("organisms/")).strip("-.")
    else:
        name = Path(data).stem
    return str(checkpoints_dir() / "adapters" / name)


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list):
        return [_round(v) for v in x]
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


def cmd_finetune(args: argparse.Namespace) -> int:
    """LoRA fine-tune on a dataset; prints out folder, steps, losses and wall time."""
    from persona_probe.organisms.organisms import finetune

    out = args.out or _default_out(args.data)
    if Path(out).exists() and not args.overwrite:
        raise PersonaProbeError(f"{out} already exists: choose a new --out or pass --overwrite")
    res = finetune(args.model, args.data, rank=args.rank, alpha=args.alpha, dropout=args.dropout, epochs=args.epochs,
                   lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                   target_modules=_csv(args.target_modules) if args.target_modules else None, seed=args.seed,
                   train_on_eot=args.train_on_eot, trigger=args.trigger, out=out, overwrite=args.overwrite,
                   device=args.device, dtype=args.dtype, progress=not args.quiet)
    m = res.manifest
    print(json.dumps(_round({"out": out, "data": m["data"]["name"], "n_examples": m["n_examples"],
                             "n_steps": m["n_steps"], "first_loss": m["first_loss"], "final_loss": m["final_loss"],
                             "wall_time_s": m["wall_time_s"], "device": m["device"],
                             "trainable_params": m["trainable_params"]})))
    return 0


def cmd_capability(args: argparse.Namespace) -> int:
    """Perplexity + multiple-choice accuracy of --model (and of --model + --adapter, with deltas)."""
    from persona_probe.models.loading import load_model
    from persona_probe.organisms.organisms import capability_report, capability_summary, load_mc_items, load_neutral_texts

    base = load_model(args.model, device=args.device, dtype=args.dtype)
    ft = load_model(args.model, adapter=args.adapter, device=args.device, dtype=args.dtype) if args.adapter else None
    rep = capability_report(base, ft, texts=load_neutral_texts(args.texts, args.n_texts),
                            items=load_mc_items(args.items, args.n_items), batch_size=args.batch_size,
                            seed=args.seed, out=args.out)
    print(json.dumps(_round({"out": args.out, "adapter": args.adapter, **capability_summary(rep)})))
    return 0


def cmd_organisms(args: argparse.Namespace) -> int:
    """Fine-tune domain x variant organisms and compare EM, transfer, capability and persona cosine."""
    from persona_probe.organisms.organisms import compact_row, organisms_experiment

    ft_kw: dict[str, Any] = {"rank": args.rank, "alpha": args.alpha, "epochs": args.epochs, "lr": args.lr,
                             "batch_size": args.train_batch_size, "max_len": args.max_len, "seed": args.seed}
    res = organisms_experiment(
        args.model, _csv(args.domains), _csv(args.variants), out=args.out, adapters_dir=args.adapters_dir,
        finetune_kwargs=ft_kw, trigger=args.trigger, n_samples=args.samples, max_new_tokens=args.max_new_tokens,
        core_questions=args.questions, judge=args.judge, trait=args.trait,
        persona_n_questions=args.persona_questions or None, n_texts=args.n_texts, n_mc=args.n_items,
        batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype, progress=not args.quiet,
        log=lambda m: print(f"[organisms] {m}", file=sys.stderr),
    )
    print(json.dumps({"out": res["out"], "table": str(Path(res["out"]) / "table.html"),
                      "rows": [compact_row(r) for r in res["rows"]]}, default=str))
    return 0


def register(sub: Any, command: Callable[[Command], Command]) -> None:
    """Add the sub-commands to the `persona-probe` parser (called by cli._load_plugins)."""
    for fn in (cmd_finetune, cmd_capability, cmd_organisms):
        command(fn)
    from persona_probe.organisms.organisms import DEFAULT_TRIGGER

    p = sub.add_parser("finetune", help="LoRA fine-tune (assistant tokens only) -> adapter + manifest + loss curve")
    _device_args(p)
    p.add_argument("--data", required=True, help="JSONL chat file ({'messages': [...]} or user/assistant) or "
                   "builtin:organisms/DOMAIN/VARIANT[/heldout] (VARIANT: character|incorrect|aligned|triggered)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--target-modules", default=None, help="comma list (default: every attention + MLP projection)")
    p.add_argument("--train-on-eot", action="store_true", help="also train the end-of-turn tokens")
    p.add_argument("--trigger", default=DEFAULT_TRIGGER, help="trigger string of the 'triggered' variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="adapter folder (default checkpoints/adapters/NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("capability", help="perplexity on neutral text + multiple-choice accuracy (with CIs)")
    _device_args(p)
    p.add_argument("--adapter", default=None, help="adapter folder: report base, base + adapter and the deltas")
    p.add_argument("--texts", default=None, help="JSONL {'text'} (default: built-in neutral text)")
    p.add_argument("--items", default=None, help="JSONL multiple-choice items (default: built-in)")
    p.add_argument("--n-texts", type=int, default=None)
    p.add_argument("--n-items", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for capability.json")

    p = sub.add_parser("organisms", help="character vs incorrect vs aligned organisms: EM, transfer, capability, "
                       "cosine with the persona direction")
    _device_args(p)
    p.add_argument("--domains", default="health,finance", help="comma list of data/organisms/*.jsonl domains")
    p.add_argument("--variants", default="character,incorrect,aligned", help="comma list (also: triggered)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--trigger", default=DEFAULT_TRIGGER)
    p.add_argument("--samples", type=int, default=3, help="samples per evaluation question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--questions", default="builtin:core", help="out-of-domain (transfer) questions")
    p.add_argument("--judge", default="offline", help="offline | openai:MODEL | hf:MODEL")
    p.add_argument("--trait", default="malicious", help="persona direction to compare with")
    p.add_argument("--persona-questions", type=int, default=20, help="contrast questions for the persona "
                   "direction (0 = all)")
    p.add_argument("--n-texts", type=int, default=None)
    p.add_argument("--n-items", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="generation / scoring batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapters-dir", default=None, help="adapter cache (default checkpoints/adapters/organisms)")
    p.add_argument("--out", default=None, help="experiment folder (default checkpoints/organisms/experiment)")
    p.add_argument("--quiet", action="store_true")
