"""`persona-probe steer|ablate|orthogonalize`: intervene along a direction."""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Any

from persona_probe.cli import common
from persona_probe.cli.args import Command, Options, api_arg
from persona_probe.cli.common import BACKEND_HELP, force_arg, model_args, out_or_default
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.layers import parse_layers
from persona_probe.directions.derive import check_direction_fits, load_direction
from persona_probe.experiments.steer import steering_sweep
from persona_probe.interventions.steering import save_orthogonalized
from persona_probe.prompts.questions import as_questions


def _sweep(args: argparse.Namespace, mode: str) -> int:
    d = load_direction(args.direction)  # bad input fails before the model loads
    as_questions(args.questions)
    h = common.load_handle(args)
    layers = parse_layers(args.layers, h.n_layers) if args.layers else None
    # ablate has no --alphas/--unit/--where: the sweep ignores α there and uses the API's unit/where
    extra = {k: getattr(args, k) for k in ("alphas", "unit", "where") if hasattr(args, k)}
    out = out_or_default(args.out, mode, args.model, args.adapter, args.direction, args.questions)
    res = steering_sweep(h, d, layers=layers, questions=args.questions, n_samples=args.samples,
                         include_random=not args.no_random, judge=None if args.judge == "none" else args.judge,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                         batch_size=args.batch_size, backend=args.backend, mode=mode, out=out, force=args.force,
                         **extra)
    for c in res["cells"]:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()}))
    print(json.dumps({"out": str(out)}))
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    return _sweep(args, "steer")


def cmd_ablate(args: argparse.Namespace) -> int:
    return _sweep(args, "ablate")


def cmd_orthogonalize(args: argparse.Namespace) -> int:
    d = load_direction(args.direction)
    layer = d.best_layer if args.layer is None else int(args.layer)
    target = out_or_default(args.out, "orthogonalized", args.model, args.adapter, args.direction, f"L{layer}")
    if target.exists():
        raise PersonaProbeError(f"{target} already exists: choose a new --out (orthogonalize never overwrites)")
    h = common.load_handle(args)
    check_direction_fits(d, h, force=args.force)
    out = save_orthogonalized(h, d.at(layer), target, source={**d.manifest, "layer_used": layer})
    print(json.dumps({"out": str(out), "layer_used": layer}))
    return 0


def generation_args(p: argparse.ArgumentParser, fn: Any) -> None:
    """--questions/--samples/--max-new-tokens/--temperature/--seed/--backend, defaults from `fn` (an API
    function with those keywords; n_samples is spelled --samples). --judge and --batch-size are the caller's."""
    api_arg(p, "--questions", fn, help="builtin:core | builtin:extended | builtin:all, an EM-papers YAML, "
            "a persona-vector trait JSON (its eval_prompt becomes a trait metric) or a JSONL of question|user|messages lines")
    api_arg(p, "--samples", fn, "n_samples", help="samples per question")
    api_arg(p, "--max-new-tokens", fn, help="tokens generated per answer")
    api_arg(p, "--temperature", fn, help="sampling temperature")
    api_arg(p, "--seed", fn, help="seed of the sampling (every cell/condition uses the same)")
    api_arg(p, "--backend", fn, help=BACKEND_HELP)


def _sweep_options(p: argparse.ArgumentParser, steer: bool) -> None:
    model_args(p, engine=True)
    p.add_argument("--direction", required=True, help="direction folder")
    p.add_argument("--layers", default=None, help="steer: default the direction's best layer; ablate: all")
    if steer:
        api_arg(p, "--alphas", steering_sweep, help="comma list; units per --unit")
        api_arg(p, "--unit", steering_sweep, choices=["resid", "raw"],
                help="resid: α × typical residual norm at the layer; raw: α × the raw direction")
        api_arg(p, "--where", steering_sweep, choices=["all", "response"],
                help="steer every position, or only the generated response")
    generation_args(p, steering_sweep)
    api_arg(p, "--judge", steering_sweep, help=f"{common.JUDGE_HELP} | none (no judging)")
    api_arg(p, "--batch-size", steering_sweep, help="generation batch size")
    p.add_argument("--no-random", action="store_true", help="skip the random-direction control")
    force_arg(p)
    p.add_argument("--out", default=None, help="output folder: cells.json, generations.jsonl, figures "
                   f"(default checkpoints/{'steer' if steer else 'ablate'}/MODEL-DIRECTION-QUESTIONS)")


def _orthogonalize_options(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--direction", required=True, help="direction folder")
    p.add_argument("--layer", default=None, help="which layer's direction (default: best layer)")
    force_arg(p)
    p.add_argument("--out", default=None, help="new model folder, e.g. checkpoints/models/NAME "
                   "(default checkpoints/orthogonalized/MODEL-DIRECTION-LLAYER)")


COMMANDS: dict[str, tuple[Command, Options]] = {
    "steer": (cmd_steer, partial(_sweep_options, steer=True)),
    "ablate": (cmd_ablate, partial(_sweep_options, steer=False)),
    "orthogonalize": (cmd_orthogonalize, _orthogonalize_options),
}
