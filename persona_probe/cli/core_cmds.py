"""`persona-probe models|extract|direction|project|compare`: find and read the character direction."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from persona_probe.activations.extraction import check_positions, extract, load_activations
from persona_probe.cli import common
from persona_probe.cli.args import Command, Options, api_arg
from persona_probe.cli.common import BACKEND_HELP, default_out, force_arg, model_args, out_or_default
from persona_probe.core.errors import PersonaProbeError
from persona_probe.directions.derive import derive, load_direction
from persona_probe.directions.monitor import compare_directions, parse_direction_spec, project_prompts
from persona_probe.directions.workflows import default_direction_dir, model_diff_direction, persona_direction
from persona_probe.evaluation.judging import make_judge
from persona_probe.experiments.trait import MAIN_POSITION, NO_JUDGE, check_trait_run, trait_direction
from persona_probe.models.loading import known_models, load_model
from persona_probe.prompts.records import POSITIONS, load_prompts, load_traits
from persona_probe.prompts.traits import load_trait_file


def cmd_models(args: argparse.Namespace) -> int:
    rows = known_models()
    if args.json:
        common.print_json(rows)
        return 0
    t = Table(title="persona_probe models")
    for c in ("name", "aliases", "kind", "cached", "description"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], ", ".join(r["aliases"]), r["kind"], "yes" if r["cached"] else "no", r["description"])
    Console().print(t)
    print("Also accepted: any local HF folder, a .gguf file, or a hub id (org/name) when the hub is reachable.")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    check_positions(args.positions, load_prompts(args.prompts))  # a bad prompt file or position: before the model
    h = common.load_handle(args)
    kw: dict[str, Any] | None = {"inplace": True} if args.backend in ("transformer_lens", "tl") else None
    if args.remote:
        if args.backend != "nnsight":
            raise PersonaProbeError("--remote needs --backend nnsight (NDIF executes nnsight traces)")
        kw = {"remote": {"ndif": True, "local": "local"}.get(args.remote, args.remote)}
    out = out_or_default(args.out, "activations", args.model, args.adapter, args.prompts)
    acts = extract(h, args.prompts, layers=args.layers, positions=args.positions, backend=args.backend,
                   batch_size=args.batch_size, out=out, shard_size=args.shard_size, seed=args.seed,
                   overwrite=args.overwrite, backend_kwargs=kw)
    shapes = {p: list(t.shape) for p, t in acts.pooled.items()}
    if acts.tokens is not None:
        shapes["all"] = list(acts.tokens.shape)
    print(json.dumps({"out": str(out), "n_prompts": len(acts.records), "shapes": shapes,
                      "padding_waste": acts.manifest.get("padding_waste")}))
    return 0


_check_layer_syntax = common.check_layer_syntax


def _check_direction_args(args: argparse.Namespace) -> Any:
    """Every input of `direction` checked before a model loads; returns the trait file (or None)."""
    _check_layer_syntax(args.layers)
    if args.position not in POSITIONS or args.position == "all":
        raise PersonaProbeError(f"unknown --position {args.position!r}: use prompt_last, prompt_mean or response_mean")
    if not 0 < args.test_frac < 1:
        raise PersonaProbeError(f"--test-frac must be in (0, 1), got {args.test_frac}")
    for flag, v in (("--n-questions", args.n_questions), ("--n-prompts", args.n_prompts)):
        if v is not None and v < 1:
            raise PersonaProbeError(f"{flag} must be >= 1, got {v}")
    if args.trait:
        if args.pos or args.neg or args.base_model:
            raise PersonaProbeError("--trait derives from the trait file's own instruction pairs: leave out "
                                    "--pos/--neg/--base-model")
        tf = load_trait_file(args.trait)
        check_trait_run(tf, n_questions=args.n_questions, n_prompts=args.n_prompts, n_samples=args.samples,
                        max_new_tokens=args.max_new_tokens, trait_min=args.trait_min, coherent_min=args.coherent_min,
                        test_frac=args.test_frac)
        return tf
    if args.base_model and not args.persona:
        load_prompts(args.prompts)  # a bad prompt file fails before either model loads
    return None


def _trait_judge(spec: str) -> Any:
    """--judge for --trait: built now (a bad spec or a missing API key fails before the model loads), except an
    hf: judge, which is a model itself and loads after the one being probed."""
    if spec == NO_JUDGE:
        return spec
    kind, _, name = spec.partition(":")
    if kind == "hf" and name:
        return spec
    return make_judge(spec)


def cmd_direction(args: argparse.Namespace) -> int:
    tf = _check_direction_args(args)
    if args.out:
        out = args.out
    elif tf is not None:
        out = str(default_direction_dir(tf.name))
    elif args.persona:
        out = str(default_direction_dir(args.persona))
    elif args.base_model:
        out = str(default_out("directions", "model_diff", args.base_model, args.model, args.adapter))
    else:
        out = str(default_out("directions", args.pos, "vs", args.neg))
    extra: dict[str, Any] = {}
    if tf is not None:
        judge = _trait_judge(args.judge)
        res = trait_direction(common.load_handle(args), tf, judge=judge, layers=args.layers,
                              n_questions=args.n_questions, n_prompts=args.n_prompts, n_samples=args.samples,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              trait_min=args.trait_min, coherent_min=args.coherent_min, backend=args.backend,
                              batch_size=args.batch_size, out=out, seed=args.seed, test_frac=args.test_frac)
        d = res.direction
        extra = {"position": MAIN_POSITION, "filter": res.filter,
                 "kept": {s: c["kept"] for s, c in res.counts.items()},
                 "other_positions": {p: v["folder"] for p, v in res.positions.items() if p != MAIN_POSITION}}
    elif args.persona:
        d = persona_direction(common.load_handle(args), args.persona, position=args.position, layers=args.layers,
                              n_questions=args.n_questions, n_prompts=args.n_prompts, backend=args.backend,
                              batch_size=args.batch_size, out=out, seed=args.seed, test_frac=args.test_frac)
    elif args.base_model:
        ft = common.load_handle(args)
        base = load_model(args.base_model, device=args.device, dtype=args.dtype)
        d = model_diff_direction(base, ft, args.prompts, position=args.position, layers=args.layers,
                                 backend=args.backend, batch_size=args.batch_size, out=out, seed=args.seed,
                                 test_frac=args.test_frac)
    elif args.pos and args.neg:
        d = derive(load_activations(args.pos), load_activations(args.neg), position=args.position,
                   method=args.method, name=args.name or Path(out).name, seed=args.seed, test_frac=args.test_frac)
        d.save(out)
    else:
        raise PersonaProbeError("give --persona TRAIT, --trait FILE_OR_NAME, or --pos DIR --neg DIR, or --base-model M "
                                "(model diff)")
    best = next(s for s in d.stats if s.layer == d.best_layer)
    print(json.dumps({"out": out, "best_layer": d.best_layer, "heldout_auroc": round(best.auroc, 4),
                      "heldout_cohens_d": round(best.cohens_d, 3), "random_control_auroc": round(best.random_auroc, 4),
                      "random_32_best_sign_auroc_mean": round(best.random_best_sign_auroc_mean or 0, 4),
                      "norm": round(best.norm, 3), **extra}))
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    out = out_or_default(args.out, "projections", args.model, args.adapter, args.direction, args.prompts,
                         args.position)
    res = project_prompts(common.load_handle(args), args.direction, args.prompts, layers=args.layers,
                          position=args.position, backend=args.backend, batch_size=args.batch_size, out=out,
                          force=args.force)
    print(json.dumps({"out": str(out), **res["summary"]}))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    out = args.out
    if not out:  # named from the directions and the layer (default: the first direction's selected layer)
        _, folder, pinned = parse_direction_spec(args.directions[0])
        at = "per_layer" if args.per_layer else f"L{args.layer or pinned or load_direction(folder).best_layer}"
        out = default_out("compare", *[parse_direction_spec(s)[0] for s in args.directions], at)
    res = compare_directions(args.directions, layer=args.layer, per_layer=args.per_layer, out=out)
    if args.per_layer:  # the matrices are in cosine.json / cosine.html
        print(json.dumps({"out": str(out), "names": res["names"], "layers": res["layers"]}))
    else:
        print(json.dumps({"out": str(out), **res}, indent=1))
    return 0


def _models_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the list as JSON instead of a table")


def _extract_options(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--prompts", required=True, help="builtin:NAME or a JSONL file of chat records")
    api_arg(p, "--layers", extract, help="all | embed | N | N,M | START:END")
    api_arg(p, "--positions", extract, help="comma list of prompt_last, prompt_mean, response_mean, all")
    api_arg(p, "--backend", extract, help=BACKEND_HELP)
    p.add_argument("--remote", default=None, help="nnsight only: ndif (NDIF-hosted hub model; add --device meta "
                   "to skip the weights), a host URL, or local (offline dry run of the remote path)")
    api_arg(p, "--batch-size", extract, type=common.batch_size, help="N or auto (fit to free GPU memory)")
    api_arg(p, "--shard-size", extract, help="prompts per safetensors shard")
    api_arg(p, "--seed", extract, help="seed recorded in the manifest (and used by sampling backends)")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/activations/MODEL-PROMPTS)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run's artifacts in --out")


def _direction_options(p: argparse.ArgumentParser) -> None:
    model_args(p, engine=True)
    route = p.add_mutually_exclusive_group()
    route.add_argument("--persona", default=None, choices=sorted(load_traits()), metavar="TRAIT",
                       help="derive from the built-in persona prompts of this trait: %(choices)s")
    route.add_argument("--trait", default=None, metavar="FILE_OR_NAME",
                       help="a persona-vector trait file (JSON with instruction pos/neg pairs, questions, eval_prompt) "
                       "or NAME for NAME.json in the user trait folder ($PERSONA_PROBE_HOME/traits, else "
                       "./checkpoints/traits; a built-in trait name works too): generate answers under each "
                       "instruction, judge and filter them, response-averaged direction at --out, prompt_last/ and "
                       "prompt_mean/ directions in subfolders (--position is not used)")
    p.add_argument("--pos", default=None, help="activation folder of the character side")
    p.add_argument("--neg", default=None, help="activation folder of the neutral side")
    api_arg(p, "--method", derive, choices=["persona", "response", "model_diff"],
            help="label recorded for a --pos/--neg direction")
    p.add_argument("--base-model", default=None, help="model diff: --model/--adapter (fine-tuned) minus this base")
    api_arg(p, "--prompts", model_diff_direction, help="prompts for the model-diff route")
    api_arg(p, "--position", persona_direction, help="prompt_last | prompt_mean | response_mean")
    api_arg(p, "--layers", persona_direction, help="all | embed | N | N,M | START:END")
    api_arg(p, "--n-questions", persona_direction, type=int, help="use only the first N questions (built-in, or "
            "the trait file's)")
    api_arg(p, "--n-prompts", persona_direction, type=int, help="use only the first N system prompts per side "
            "(instruction pairs of a trait file)")
    api_arg(p, "--backend", persona_direction, help=BACKEND_HELP)
    api_arg(p, "--batch-size", persona_direction, help="prompts per forward pass")
    api_arg(p, "--test-frac", persona_direction, help="held-out share of prompts (grouped by question)")
    api_arg(p, "--seed", persona_direction, help="seed of the train/test split and the random controls")
    t = p.add_argument_group("--trait options")
    api_arg(t, "--judge", trait_direction, help="judge of the trait file's eval_prompt and coherence: offline "
            "(cannot score a trait: no filtering) | openai:MODEL (OPENAI_BASE_URL/OPENAI_API_KEY) | hf:MODEL | none")
    api_arg(t, "--trait-min", trait_direction, help="keep positive answers with trait score >= this, negative "
            "answers below it")
    api_arg(t, "--coherent-min", trait_direction, help="keep answers with coherence score >= this")
    api_arg(t, "--samples", trait_direction, "n_samples", help="answers per instruction and question")
    api_arg(t, "--max-new-tokens", trait_direction, help="tokens generated per answer")
    api_arg(t, "--temperature", trait_direction, help="sampling temperature of the answers (0 = greedy)")
    p.add_argument("--name", default=None, help="direction name (default: the --out folder's name)")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/directions/TRAIT, for --trait the "
                   "file's stem; model diff: "
                   "checkpoints/directions/model_diff-BASE-MODEL-ADAPTER; --pos/--neg: POS-vs-NEG)")


def _project_options(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--direction", required=True, help="direction folder")
    p.add_argument("--prompts", required=True, help="builtin:NAME or a JSONL file (records, or question/answer rows)")
    api_arg(p, "--layers", project_prompts, help="default: the direction's best layer; 'all' for every layer")
    api_arg(p, "--position", project_prompts, help="prompt_last | prompt_mean | response_mean | all")
    api_arg(p, "--backend", project_prompts, help=BACKEND_HELP)
    api_arg(p, "--batch-size", project_prompts, help="prompts per forward pass")
    force_arg(p)
    p.add_argument("--out", default=None, help="folder for projections.jsonl + summary.json "
                   "(default checkpoints/projections/MODEL-DIRECTION-PROMPTS-POSITION)")


def _compare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("directions", nargs="+", help="direction folders, optionally NAME=FOLDER[@LAYER]")
    api_arg(p, "--layer", compare_directions, help="the one layer every direction is compared at (default: the "
            "first direction's selected layer); NAME=FOLDER@LAYER pins one direction's layer")
    p.add_argument("--per-layer", action="store_true", help="one cosine matrix per layer all directions cover "
                   "(cosine.html: one heatmap per layer)")
    p.add_argument("--out", default=None, help="folder for cosine.json + cosine.html "
                   "(default checkpoints/compare/NAMES-LAYER)")


COMMANDS: dict[str, tuple[Command, Options]] = {
    "models": (cmd_models, _models_options), "extract": (cmd_extract, _extract_options),
    "direction": (cmd_direction, _direction_options), "project": (cmd_project, _project_options),
    "compare": (cmd_compare, _compare_options),
}
