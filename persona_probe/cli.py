"""`persona-probe` command line: a thin layer over the Python API (one sub-command per task)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import PersonaProbeError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="embedded name/alias, local HF folder, .gguf file or hub id")
    p.add_argument("--adapter", default=None, help="peft LoRA adapter folder applied on top of --model")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")


def _load(args: argparse.Namespace) -> Any:
    from .loading import load_model

    return load_model(args.model, adapter=args.adapter, device=args.device, dtype=args.dtype, revision=args.revision)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


@command
def cmd_models(args: argparse.Namespace) -> int:
    from .loading import known_models

    rows = known_models()
    if args.json:
        _print_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="persona_probe models")
    for c in ("name", "aliases", "kind", "cached", "description"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], ", ".join(r["aliases"]), r["kind"], "yes" if r["cached"] else "no", r["description"])
    Console().print(t)
    print("Also accepted: any local HF folder, a .gguf file, or a hub id (org/name) when the hub is reachable.")
    return 0


@command
def cmd_extract(args: argparse.Namespace) -> int:
    from .extraction import extract

    h = _load(args)
    acts = extract(h, args.prompts, layers=args.layers, positions=args.positions, backend=args.backend,
                   batch_size=args.batch_size, out=args.out, shard_size=args.shard_size, seed=args.seed,
                   overwrite=args.overwrite, backend_kwargs={"inplace": True} if args.backend in (
                       "transformer_lens", "tl") else None)
    shapes = {p: list(t.shape) for p, t in acts.pooled.items()}
    if acts.tokens is not None:
        shapes["all"] = list(acts.tokens.shape)
    print(json.dumps({"out": args.out, "n_prompts": len(acts.records), "shapes": shapes,
                      "padding_waste": acts.manifest.get("padding_waste")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="persona-probe", description=__doc__)
    ap.add_argument("--version", action="store_true", help="print the package version")
    sub = ap.add_subparsers(dest="command")

    p = sub.add_parser("models", help="list embedded and cached models")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("extract", help="extract residual-stream activations to safetensors shards")
    _model_args(p)
    p.add_argument("--prompts", required=True, help="builtin:NAME or a JSONL file of chat records")
    p.add_argument("--layers", default="all", help="all | embed | N | N,M | START:END")
    p.add_argument("--positions", default="prompt_last", help="prompt_last,prompt_mean,response_mean,all")
    p.add_argument("--backend", default="hf", help="hf | transformer_lens | nnsight")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (checkpoints/activations/NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run's artifacts in --out")

    for extra in _EXTRA_PARSERS:
        extra(sub)
    return ap


_EXTRA_PARSERS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.command:
        ap.print_help()
        return 1
    try:
        return COMMANDS[args.command](args)
    except PersonaProbeError as e:
        print(f"persona-probe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"persona-probe {args.command}: interrupted (finished shards are kept; rerun to resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
