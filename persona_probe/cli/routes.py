"""`persona-probe icl|persona|trigger|routes`: the EM routes (thin over experiments/routes.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from persona_probe.cli import common
from persona_probe.cli.args import Command, Options, api_arg, api_default, csv
from persona_probe.cli.common import BACKEND_HELP, force_arg, model_args, out_or_default, split_csv
from persona_probe.core.errors import PersonaProbeError
from persona_probe.directions.derive import load_direction
from persona_probe.experiments.routes import (
    INSTRUCTIONS,
    cross_route,
    eval_questions,
    icl_conditions,
    icl_experiment,
    load_instructions,
    load_personas,
    load_route_result,
    persona_experiment,
    trigger_experiment,
)


def _out(args: argparse.Namespace) -> str:
    """--out, or checkpoints/routes/ROUTE-MODEL[-ADAPTER]-DIRECTION (the route is the command's name)."""
    return str(out_or_default(args.out, "routes", args.command, args.model, args.adapter, args.direction))


def _kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"questions": args.questions, "n_samples": args.samples, "max_new_tokens": args.max_new_tokens,
            "judge": args.judge, "seed": args.seed, "batch_size": args.batch_size, "backend": args.backend,
            "out": _out(args), "force": args.force}


def _print(res: Any, keys: tuple[str, ...], args: argparse.Namespace) -> None:
    for c in res["conditions"]:
        print(json.dumps({k: c.get(k) for k in keys}, default=str))
    print(json.dumps({"induced_cosine_with_character": res.get("induced_cosine_with_character"), "out": _out(args)}))


def _ks(spec: str) -> list[int]:
    try:
        ks = [int(k) for k in split_csv(spec)]
    except ValueError:
        raise PersonaProbeError(f"--ks {spec!r}: give a comma list of shot counts, e.g. 0,2,4") from None
    return ks


def cmd_icl(args: argparse.Namespace) -> int:
    # every file, name and number is checked before the model loads (minutes on a 7B model)
    instructions = load_instructions(args.instruction_file)
    ks, variants = _ks(args.ks), split_csv(args.variants)
    icl_conditions(args.examples, args.questions, ks, variants, args.draws, args.seed, instructions)
    direction = load_direction(args.direction)
    res = icl_experiment(common.load_handle(args), direction, examples=args.examples, ks=ks, variants=variants,
                         draws=args.draws, instructions=instructions, **_kw(args))
    _print(res, ("condition", "k", "variant", "n_counted", "em_rate", "em_ci95", "prompt_projection"), args)
    return 0


def cmd_persona(args: argparse.Namespace) -> int:
    eval_questions(args.questions)  # checked before the model loads
    direction = load_direction(args.direction)
    res = persona_experiment(common.load_handle(args), direction, personas=args.personas, **_kw(args))
    _print(res, ("condition", "kind", "n_counted", "em_rate", "em_ci95", "mean_aligned", "prompt_projection"), args)
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    eval_questions(args.questions)  # checked before the model loads
    direction = load_direction(args.direction)
    res = trigger_experiment(common.load_handle(args), direction, trigger=args.trigger, **_kw(args))
    _print(res, ("condition", "trigger", "n_counted", "em_rate", "em_ci95", "prompt_projection", "vs_off"), args)
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    d = load_direction(args.direction)
    extra = {"fine-tune model diff": load_direction(args.model_diff).at(d.best_layer)} if args.model_diff else {}
    out = out_or_default(args.out, "routes", "cross", args.direction, *args.results)
    res = cross_route(d, [load_route_result(f) for f in args.results], extra_directions=extra, out=out)
    print(json.dumps({"out": str(out), "names": res["names"], "cosine": res["cosine"],
                      "pearson_projection_em": res["pearson_projection_em"]}, indent=1))
    return 0


def _persona_ids(spec: str) -> list[str] | None:
    """argparse type of --personas: a comma list of known ids (the error lists the valid ones)."""
    ids = split_csv(spec)
    valid = [p["id"] for p in load_personas()]
    unknown = [i for i in ids if i not in valid]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown persona id(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return ids or None


def _common(p: argparse.ArgumentParser, fn: Callable[..., Any], *, batch_override: int | None = None) -> None:
    """Options every route shares; defaults from the route's API function `fn`."""
    model_args(p, engine=True)
    p.add_argument("--direction", required=True, help="character direction folder (projections, induced cosine)")
    api_arg(p, "--questions", fn, help="builtin:core | builtin:extended or an EM-format YAML file")
    api_arg(p, "--samples", fn, "n_samples", help="samples per prompt")
    api_arg(p, "--max-new-tokens", fn, help="tokens generated per answer")
    api_arg(p, "--judge", fn, help=common.JUDGE_HELP)
    api_arg(p, "--seed", fn, help="seeds sampling and example draws")
    kw = {} if batch_override is None else {"override": batch_override}
    api_arg(p, "--batch-size", fn, help="generation batch size", **kw)
    api_arg(p, "--backend", fn, help=f"{BACKEND_HELP} (activation hooks)")
    force_arg(p)
    p.add_argument("--out", default=None, help="output folder: JSON + plotly HTML "
                   "(default checkpoints/routes/ROUTE-MODEL-DIRECTION)")


def _icl_options(p: argparse.ArgumentParser) -> None:
    _common(p, icl_experiment, batch_override=common.ICL_BATCH_SIZE)
    api_arg(p, "--examples", icl_experiment,
            help="narrow examples: builtin:organisms/DOMAIN/VARIANT or any chat JSONL ({'messages': [...]} or "
            "user/assistant lines; each line's final user + assistant turn is one example)")
    api_arg(p, "--ks", icl_experiment, help="comma list of shot counts")
    # --variants keeps its name; --instructions is the same option (api_arg takes one spelling, so by hand)
    a = p.add_argument("--variants", "--instructions", dest="variants",
                       default=csv(api_default(icl_experiment, "variants")),
                       help="comma list of instruction variants: built-in "
                       f"{', '.join(INSTRUCTIONS)} or names from --instruction-file")
    a.api_source, a.cli_override = (icl_experiment, "variants"), False  # type: ignore[attr-defined]
    p.add_argument("--instruction-file", default=None, metavar="FILE.yaml",
                   help="YAML mapping variant name -> instruction text (null = none), overriding or adding to the "
                   "built-in variants; the text is appended to each question's own system prompt")
    api_arg(p, "--draws", icl_experiment, help="seeded example draws per k")


def _persona_options(p: argparse.ArgumentParser) -> None:
    _common(p, persona_experiment)
    p.add_argument("--personas", default=None, type=_persona_ids, help="comma list of persona ids (default: all): "
                   + ", ".join(x["id"] for x in load_personas()))


def _trigger_options(p: argparse.ArgumentParser) -> None:
    _common(p, trigger_experiment)
    api_arg(p, "--trigger", trigger_experiment, help="trigger string prepended to the user turn")


def _routes_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--direction", required=True, help="persona character direction folder")
    p.add_argument("results", nargs="+", help="route output folders (from icl/persona/trigger)")
    p.add_argument("--model-diff", default=None, help="a model-diff direction folder to include")
    p.add_argument("--out", default=None, help="output folder for the comparison: JSON + plotly HTML "
                   "(default checkpoints/routes/cross-DIRECTION-RESULTS)")


COMMANDS: dict[str, tuple[Command, Options]] = {
    "icl": (cmd_icl, _icl_options), "persona": (cmd_persona, _persona_options),
    "trigger": (cmd_trigger, _trigger_options), "routes": (cmd_routes, _routes_options),
}
