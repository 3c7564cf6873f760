"""`persona-probe finetune|capability|organisms`: LoRA model organisms and their capability checks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from persona_probe.cli import common
from persona_probe.cli.args import Command, Options, api_arg, api_default, csv
from persona_probe.cli.common import model_args, out_or_default, rounded, split_csv
from persona_probe.core.errors import PersonaProbeError
from persona_probe.experiments.organisms import organisms_experiment
from persona_probe.models.loading import load_model
from persona_probe.organisms import (
    AUTO_MAX_LEN_CAP,
    VARIANTS,
    capability_report,
    capability_summary,
    check_max_len,
    finetune,
    load_mc_items,
    load_neutral_texts,
    parse_variant_files,
    resolve_dataset,
)
from persona_probe.report.organisms import compact_row


def cmd_finetune(args: argparse.Namespace) -> int:
    """LoRA fine-tune on a dataset; prints out folder, steps, losses and wall time."""
    # builtin:organisms/health/character -> checkpoints/adapters/health-character
    out = str(out_or_default(args.out, "adapters", args.data.replace("builtin:organisms/", "builtin:")))
    if Path(out).exists() and not args.overwrite:
        raise PersonaProbeError(f"{out} already exists: choose a new --out or pass --overwrite")
    if not args.trigger.strip():
        raise PersonaProbeError("--trigger must be non-empty")
    data = resolve_dataset(args.data, trigger=args.trigger)  # every line checked before the model loads
    res = finetune(args.model, data, rank=args.rank, alpha=args.alpha, dropout=args.dropout, epochs=args.epochs,
                   lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                   target_modules=split_csv(args.target_modules) if args.target_modules else None, seed=args.seed,
                   train_on_eot=args.train_on_eot, trigger=args.trigger, out=out, overwrite=args.overwrite,
                   device=args.device, dtype=args.dtype, progress=not args.quiet)
    m = res.manifest
    print(json.dumps(rounded({"out": out, "data": m["data"]["name"], "n_examples": m["n_examples"],
                              "max_len": m["max_len"], "n_dropped_too_long": m["n_dropped_too_long"],
                              "n_cut": m["n_cut"], "n_steps": m["n_steps"], "first_loss": m["first_loss"], "final_loss": m["final_loss"],
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
    data = _variant_files(args)
    inputs = list(dict.fromkeys(str(f) for f in data.values())) if data else [args.domains, args.data_dir]
    out = out_or_default(args.out, "organisms", *inputs, args.model, f"lr{args.lr:g}")
    common.check_before_load(args)  # engine, judge, layers: before the model loads
    res = organisms_experiment(
        args.model, split_csv(args.domains), split_csv(args.variants), data=data, data_dir=args.data_dir,
        out=out, adapters_dir=args.adapters_dir, finetune_kwargs=ft_kw, trigger=args.trigger, n_samples=args.samples, max_new_tokens=args.max_new_tokens,
        core_questions=args.questions, judge=args.judge, trait=args.trait,
        persona_n_questions=args.persona_questions or None, n_texts=args.n_texts, n_mc=args.n_items,
        batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype, engine=args.engine,
        progress=not args.quiet,
        log=lambda m: print(f"[organisms] {m}", file=sys.stderr),
    )
    print(json.dumps({"out": res["out"], "table": str(Path(res["out"]) / "table.html"),
                      "rows": [compact_row(r) for r in res["rows"]]}, default=str))
    return 0


def _variant_files(args: argparse.Namespace) -> dict[str, Path] | None:
    """--data VARIANT=FILE ... checked (names, duplicates, files exist); it replaces --domains/--variants."""
    if args.data is None:
        return None
    if args.data_dir is not None:
        raise PersonaProbeError("--data and --data-dir exclude each other: --data takes {'messages': [...]} files "
                                "per variant, --data-dir a folder of DOMAIN.jsonl question files")
    moved = [f for f, d, fn in (("--domains", args.domains, "domains"), ("--variants", args.variants, "variants"))
             if d != csv(api_default(organisms_experiment, fn))]
    if moved:
        raise PersonaProbeError(f"--data names the variants and their files: drop {' and '.join(moved)}")
    return parse_variant_files(args.data)


def _max_len(v: str) -> int | str:
    """argparse type of --max-len: 'auto' or a positive integer."""
    try:
        return check_max_len(v)
    except PersonaProbeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _lora_args(p: argparse.ArgumentParser, *, batch_flag: str) -> None:
    """LoRA hyper-parameters, defaults from organisms.finetune (batch size spelled `batch_flag`)."""
    api_arg(p, "--rank", finetune, help="LoRA rank")
    api_arg(p, "--alpha", finetune, help="LoRA alpha (scale = alpha / rank)")
    api_arg(p, "--epochs", finetune, help="passes over the training data")
    api_arg(p, "--lr", finetune, help="peak learning rate")
    api_arg(p, batch_flag, finetune, "batch_size", help="training examples per step")
    api_arg(p, "--max-len", finetune, type=_max_len,
            help=f"tokens per example: auto = the longest example, capped by the model's max positions and "
                 f"{AUTO_MAX_LEN_CAP}; longer ones are cut (a warning says how many)")


def _finetune_options(p: argparse.ArgumentParser) -> None:
    model_args(p, adapter=False, revision=False)
    p.add_argument("--data", required=True, help="JSONL chat file ({'messages': [...]} as fine-tuning sets ship, "
                   "or user/assistant; the final assistant turn is trained) or "
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
    model_args(p, adapter=False, revision=False, engine=True)
    api_arg(p, "--domains", organisms_experiment, help="comma list of data/organisms/*.jsonl domains")
    api_arg(p, "--variants", organisms_experiment, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--data", nargs="+", default=None, metavar="VARIANT=FILE",
                   help="fine-tuning sets as they are, one {'messages': [...]} JSONL per variant (any names, e.g. "
                   "character=bad_medical_advice.jsonl aligned=good_medical_advice.jsonl); replaces --domains and "
                   "--variants; each file's held-out questions give its in-domain EM")
    p.add_argument("--data-dir", default=None, help="folder of DOMAIN.jsonl question files in the built-in format "
                   "(id, user + the answers of the variants asked for) instead of the packaged domains")
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
