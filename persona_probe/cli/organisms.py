"""`persona-probe finetune|capability|organisms`: LoRA model organisms and their capability checks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from persona_probe.cli import common
from persona_probe.cli.args import Command, Options, api_arg
from persona_probe.cli.common import model_args, out_or_default, rounded, split_csv
from persona_probe.core.errors import PersonaProbeError
from persona_probe.experiments.organisms import organisms_experiment
from persona_probe.models.loading import load_model
from persona_probe.organisms import (
    VARIANTS,
    capability_report,
    capability_summary,
    finetune,
    load_mc_items,
    load_neutral_texts,
)
from persona_probe.report.organisms import compact_row


def cmd_finetune(args: argparse.Namespace) -> int:
    """LoRA fine-tune on a dataset; prints out folder, steps, losses and wall time."""
    # builtin:organisms/health/character -> checkpoints/adapters/health-character
    out = str(out_or_default(args.out, "adapters", args.data.replace("builtin:organisms/", "builtin:")))
    if Path(out).exists() and not args.overwrite:
        raise PersonaProbeError(f"{out} already exists: choose a new --out or pass --overwrite")
    res = finetune(args.model, args.data, rank=args.rank, alpha=args.alpha, dropout=args.dropout, epochs=args.epochs,
                   lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                   target_modules=split_csv(args.target_modules) if args.target_modules else None, seed=args.seed,
                   train_on_eot=args.train_on_eot, trigger=args.trigger, out=out, overwrite=args.overwrite,
                   device=args.device, dtype=args.dtype, progress=not args.quiet)
    m = res.manifest
    print(json.dumps(rounded({"out": out, "data": m["data"]["name"], "n_examples": m["n_examples"],
                              "n_steps": m["n_steps"], "first_loss": m["first_loss"], "final_loss": m["final_loss"],
                              "wall_time_s": m["wall_time_s"], "device": m["device"],
                              "trainable_params": m["trainable_params"]})))
    return 0


def cmd_capability(args: argparse.Namespace) -> int:
    """Perplexity + multiple-choice accuracy of --model (and of --model + --adapter, with deltas)."""
    base = load_model(args.model, device=args.device, dtype=args.dtype)
    ft = load_model(args.model, adapter=args.adapter, device=args.device, dtype=args.dtype) if args.adapter else None
    out = out_or_default(args.out, "capability", args.model, args.adapter, args.texts, args.items)
    rep = capability_report(base, ft, texts=load_neutral_texts(args.texts, args.n_texts),
                            items=load_mc_items(args.items, args.n_items), batch_size=args.batch_size,
                            seed=args.seed, out=out)
    print(json.dumps(rounded({"out": str(out), "adapter": args.adapter, **capability_summary(rep)})))
    return 0


def cmd_organisms(args: argparse.Namespace) -> int:
    """Fine-tune domain x variant organisms and compare EM, transfer, capability and persona cosine."""
    ft_kw: dict[str, Any] = {"rank": args.rank, "alpha": args.alpha, "epochs": args.epochs, "lr": args.lr,
                             "batch_size": args.train_batch_size, "max_len": args.max_len, "seed": args.seed}
    out = out_or_default(args.out, "organisms", args.domains, args.model, f"lr{args.lr:g}")
    res = organisms_experiment(
        args.model, split_csv(args.domains), split_csv(args.variants), out=out, adapters_dir=args.adapters_dir,
        finetune_kwargs=ft_kw, trigger=args.trigger, n_samples=args.samples, max_new_tokens=args.max_new_tokens,
        core_questions=args.questions, judge=args.judge, trait=args.trait,
        persona_n_questions=args.persona_questions or None, n_texts=args.n_texts, n_mc=args.n_items,
        batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype, progress=not args.quiet,
        log=lambda m: print(f"[organisms] {m}", file=sys.stderr),
    )
    print(json.dumps({"out": res["out"], "table": str(Path(res["out"]) / "table.html"),
                      "rows": [compact_row(r) for r in res["rows"]]}, default=str))
    return 0


def _lora_args(p: argparse.ArgumentParser, *, batch_flag: str) -> None:
    """LoRA hyper-parameters, defaults from organisms.finetune (batch size spelled `batch_flag`)."""
    api_arg(p, "--rank", finetune, help="LoRA rank")
    api_arg(p, "--alpha", finetune, help="LoRA alpha (scale = alpha / rank)")
    api_arg(p, "--epochs", finetune, help="passes over the training data")
    api_arg(p, "--lr", finetune, help="peak learning rate")
    api_arg(p, batch_flag, finetune, "batch_size", help="training examples per step")
    api_arg(p, "--max-len", finetune, help="tokens per example (longer ones are cut)")


def _finetune_options(p: argparse.ArgumentParser) -> None:
    model_args(p, adapter=False, revision=False)
    p.add_argument("--data", required=True, help="JSONL chat file ({'messages': [...]} or user/assistant) or "
                   f"builtin:organisms/DOMAIN/VARIANT[/heldout] (VARIANT: {'|'.join(VARIANTS)})")
    _lora_args(p, batch_flag="--batch-size")
    api_arg(p, "--dropout", finetune, help="LoRA dropout")
    api_arg(p, "--target-modules", finetune, help="comma list (default: every attention + MLP projection)")
    p.add_argument("--train-on-eot", action="store_true", help="also train the end-of-turn tokens")
    api_arg(p, "--trigger", finetune, help="trigger string of the 'triggered' variant")
    api_arg(p, "--seed", finetune, help="seed of the LoRA init and the data order")
    p.add_argument("--out", default=None, help="adapter folder (default checkpoints/adapters/NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _capability_options(p: argparse.ArgumentParser) -> None:
    model_args(p, adapter=False, revision=False)
    p.add_argument("--adapter", default=None, help="adapter folder: report base, base + adapter and the deltas")
    p.add_argument("--texts", default=None, help="JSONL {'text'} (default: built-in neutral text)")
    p.add_argument("--items", default=None, help="JSONL multiple-choice items (default: built-in)")
    api_arg(p, "--n-texts", load_neutral_texts, "n", type=int, help="use only the first N texts")
    api_arg(p, "--n-items", load_mc_items, "n", type=int, help="use only the first N items")
    api_arg(p, "--batch-size", capability_report, help="texts/items per forward pass")
    api_arg(p, "--seed", capability_report, help="seed of the bootstrap CIs")
    p.add_argument("--out", default=None, help="folder for capability.json "
                   "(default checkpoints/capability/MODEL-ADAPTER)")


def _organisms_options(p: argparse.ArgumentParser) -> None:
    model_args(p, adapter=False, revision=False)
    api_arg(p, "--domains", organisms_experiment, help="comma list of data/organisms/*.jsonl domains")
    api_arg(p, "--variants", organisms_experiment, help=f"comma list of {', '.join(VARIANTS)}")
    _lora_args(p, batch_flag="--train-batch-size")
    api_arg(p, "--trigger", organisms_experiment, help="trigger string of the 'triggered' variant")
    api_arg(p, "--samples", organisms_experiment, "n_samples", help="samples per evaluation question")
    api_arg(p, "--max-new-tokens", organisms_experiment, help="tokens generated per answer")
    api_arg(p, "--questions", organisms_experiment, "core_questions", help="out-of-domain (transfer) questions")
    api_arg(p, "--judge", organisms_experiment, help=common.JUDGE_HELP)
    api_arg(p, "--trait", organisms_experiment, help="persona direction to compare with")
    api_arg(p, "--persona-questions", organisms_experiment, "persona_n_questions",
            help="contrast questions for the persona direction (0 = all)")
    api_arg(p, "--n-texts", organisms_experiment, type=int, help="neutral texts for the capability check")
    api_arg(p, "--n-items", organisms_experiment, "n_mc", type=int, help="multiple-choice items for the capability check")
    api_arg(p, "--batch-size", organisms_experiment, help="generation / scoring batch size")
    api_arg(p, "--seed", organisms_experiment, help="seed of fine-tuning, sampling and splits")
    p.add_argument("--adapters-dir", default=None, help="adapter cache (default checkpoints/adapters/organisms)")
    p.add_argument("--out", default=None, help="experiment folder (default checkpoints/organisms/DOMAINS-MODEL-LR)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


COMMANDS: dict[str, tuple[Command, Options]] = {
    "finetune": (cmd_finetune, _finetune_options), "capability": (cmd_capability, _capability_options),
    "organisms": (cmd_organisms, _organisms_options),
}
