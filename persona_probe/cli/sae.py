"""`persona-probe sae train|diff|decompose|top-examples|steer`: thin CLI over persona_probe.sae.

Each sub-command prints one JSON line of key numbers with the folder it wrote: --out, or by default a
folder under the checkpoints home named from its inputs (checkpoints/saes/NAME, checkpoints/sae_diffs/...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from persona_probe.activations.extraction import load_activations
from persona_probe.activations.tokens import pooled_layer_rows
from persona_probe.cli import common
from persona_probe.cli.args import Command, Options, add_command, api_arg, dataclass_args, dataclass_from_args
from persona_probe.cli.common import force_arg, model_args, out_or_default, print_line
from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import atomic_write_json
from persona_probe.directions.derive import load_direction
from persona_probe.experiments.sae import compare_feature_steering
from persona_probe.interventions.steering import parse_alphas
from persona_probe.prompts.records import PromptRecord, load_prompts
from persona_probe.report.figures import write_figure
from persona_probe.report.sae import decomposition_figure, feature_bar_figure, write_top_examples
from persona_probe.sae import (
    DEFAULT_KS,
    Decomposition,
    SAETrainConfig,
    activation_rows,
    decompose,
    default_sae_dir,
    diff_features,
    load_sae,
    top_examples,
    train_sae,
)

SAE_COMMANDS = ("train", "diff", "decompose", "top-examples", "steer")


def _int_list(spec: str | None, what: str) -> list[int]:
    if not spec:
        return []
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PersonaProbeError(f"{what} {spec!r} must be comma-separated integers, e.g. 12,345") from None


def _resolve_sae(spec: str, sae_id: str | None = None) -> str:
    """A folder, a name under checkpoints/saes/, or a sae-lens release (used with --sae-id)."""
    if Path(spec).expanduser().is_dir():
        return spec
    named = default_sae_dir(spec)
    if named.is_dir():
        return str(named)
    if sae_id is None:  # not a release either: say which folders were looked for
        also = "" if Path(spec).is_absolute() or "/" in spec else f" (nor does {named})"
        raise PersonaProbeError(f"--sae {spec} does not exist{also}: `persona-probe sae train` prints the folder "
                                "it writes; a sae-lens release needs --sae-id")
    return spec


def _load_sae(args: argparse.Namespace, handle: Any = None) -> Any:
    layer = int(args.layer) if getattr(args, "layer", None) not in (None, "") else None
    return load_sae(_resolve_sae(args.sae, args.sae_id), args.sae_id, handle=handle, layer=layer, allow_other_model=args.force)


def _subset(recs: list[PromptRecord], n: int | None, seed: int) -> list[PromptRecord]:
    """A seeded subset of at most n records (order kept)."""
    if not n or n >= len(recs):
        return recs
    idx = sorted(torch.randperm(len(recs), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [recs[i] for i in idx]


def _side(spec: str, handle: Any, sae: Any, args: argparse.Namespace) -> tuple[Any, list[PromptRecord]]:
    """Rows [n, d] at the SAE's layer and the records, from an activation folder or a prompt spec."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "manifest.json").exists():
        acts = load_activations(p)
        return activation_rows(acts, sae.layer, args.position), list(acts.records)
    recs = _subset(list(load_prompts(spec).records), args.max_prompts, args.seed)
    return pooled_layer_rows(handle, recs, int(sae.layer), args.position, batch_size=args.batch_size), recs


# ----------------------------------------------------------------------------- sub-commands


def cmd_train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclass_from_args(SAETrainConfig, args)
    records = list(load_prompts(args.prompts).records) if args.prompts else None  # bad file: fail before the model
    h = common.load_handle(args)
    sh = train_sae(h, cfg, name=args.name, out=args.out, records=records, overwrite=args.overwrite,
                   log=lambda m: print(m, file=sys.stderr), token_cache=args.token_cache)
    m = sh.manifest or {}
    held = m.get("metrics", {}).get("heldout", {})
    print_line({"out": sh.source, "layer": sh.layer, "d_sae": sh.d_sae, "k": sh.k,
                "tokens_train": m.get("n_tokens", {}).get("train_unique"),
                "tokens_heldout": m.get("n_tokens", {}).get("heldout"),
                "explained_variance": held.get("explained_variance"), "mean_l0": held.get("mean_l0"),
                "dead_fraction": held.get("dead_fraction"),
                "kl_spliced_neutral": m.get("metrics", {}).get("kl_spliced_neutral"),
                **{k: v for k, v in m.get("timing", {}).items()}})
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    for spec in (args.a, args.b):  # a prompt spec must read before the model loads
        p = Path(spec).expanduser()
        if not (p.is_dir() and (p / "manifest.json").exists()):
            load_prompts(spec)
    h = common.load_handle(args)
    sae = _load_sae(args, h)
    out = out_or_default(args.out, "sae_diffs", args.sae, args.a, "vs", args.b)
    xa, recs_a = _side(args.a, h, sae, args)
    xb, recs_b = _side(args.b, h, sae, args)
    labels = (args.label_a or Path(args.a).name or args.a, args.label_b or Path(args.b).name or args.b)
    d = diff_features(sae, xa, xb, top=args.top, labels=labels)
    res = {"sae": sae.describe(), "a": args.a, "b": args.b, "position": args.position, **d.to_dict(args.top)}
    if args.examples > 0:
        feats = [r["feature"] for r in res["top_by_mean"][: args.example_features]]
        exs = top_examples(sae, h, recs_a + recs_b, feats, n=args.examples, batch_size=args.batch_size)
        res["examples"] = {str(f): [{"record_id": e.record_id, "max_act": e.max_act, "text": e.text()} for e in v]
                           for f, v in exs.items()}
        fig = feature_bar_figure(res["top_by_mean"][: args.example_features], "mean_diff",
                                 f"features more active in {labels[0]} than {labels[1]}", labels)
        notes = {r["feature"]: f"mean {labels[0]} {r['mean_a']:.3f} vs {labels[1]} {r['mean_b']:.3f}; firing freq "
                 f"{r['freq_a']:.3f} vs {r['freq_b']:.3f}" for r in res["top_by_mean"]}
        write_top_examples(exs, out, title=f"SAE features: {labels[0]} vs {labels[1]}", notes=notes, figure=fig)
    atomic_write_json(out / "diff.json", res)
    for by in ("mean", "freq"):
        rows = res[f"top_by_{by}"]
        write_figure(feature_bar_figure(rows, f"{by}_diff", f"top features by {by} difference ({labels[0]} − "
                                        f"{labels[1]})", labels), out / f"diff_{by}.html")
    print_line({"out": str(out), "n_a": d.n_a, "n_b": d.n_b, "position": args.position,
                "top_by_mean": [[r["feature"], round(r["mean_diff"], 3)] for r in res["top_by_mean"][:10]],
                "top_by_freq": [[r["feature"], round(r["freq_diff"], 3)] for r in res["top_by_freq"][:10]]})
    return 0


def cmd_decompose(args: argparse.Namespace) -> int:
    d = load_direction(args.direction)
    sae = _load_sae(args)
    if d.d_model != sae.d_in:
        raise PersonaProbeError(f"direction width {d.d_model} does not match the SAE's d_in {sae.d_in}")
    if sae.layer not in d.layers:
        raise PersonaProbeError(f"the direction has no vector at the SAE's layer {sae.layer} (layers: {d.layers})")
    dec = decompose(sae, d.at(sae.layer), _int_list(args.ks, "--ks") or list(DEFAULT_KS))
    out = out_or_default(args.out, "sae_decompositions", args.direction, args.sae)
    res = {"sae": sae.describe(), "direction": str(args.direction), "layer": sae.layer,
           "direction_best_layer": d.best_layer, **dec.to_dict(args.top)}
    atomic_write_json(out / "decomposition.json", res)
    write_figure(decomposition_figure(dec, args.top, f"{d.manifest.get('name', 'direction')} at layer {sae.layer}"),
                 out / "decomposition.html")
    print_line({"out": str(out), "layer": sae.layer, "shares": {k: round(v, 4) for k, v in dec.shares.items()},
                "top": [[r["feature"], round(r["cosine"], 3)] for r in dec.top(5)]})
    return 0


def cmd_top_examples(args: argparse.Namespace) -> int:
    feats = _int_list(args.features, "--features")
    if args.from_diff:
        diff = json.loads(Path(args.from_diff).read_text())
        feats += [r["feature"] for r in diff.get(f"top_by_{args.rank_by}", [])[: args.top_features]]
    if not feats:
        raise PersonaProbeError("no features: give --features 1,2,3 or --from-diff DIR/diff.json")
    recs = _subset(list(load_prompts(args.prompts).records), args.max_prompts, args.seed)
    h = common.load_handle(args)
    sae = _load_sae(args, h)
    exs = top_examples(sae, h, recs, feats, n=args.n, batch_size=args.batch_size)
    out = out_or_default(args.out, "sae_examples", args.sae, args.prompts)
    write_top_examples(exs, out, title=f"SAE top examples ({args.prompts})")
    print_line({"out": str(out), "n_records": len(recs), "features": feats,
                "max_act": {f: (v[0].max_act if v else 0.0) for f, v in exs.items()}})
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    feats = _int_list(args.features, "--features")
    if not feats:
        raise PersonaProbeError("give --features to steer with, e.g. --features 12,345")
    h = common.load_handle(args)
    sae = _load_sae(args, h)
    d = load_direction(args.direction)
    res = compare_feature_steering(h, sae, d, feats, alphas=parse_alphas(args.alphas), questions=args.questions,
                                   n_samples=args.samples, judge=None if args.judge == "none" else args.judge,
                                   max_new_tokens=args.max_new_tokens, unit=args.unit, seed=args.seed,
                                   batch_size=args.batch_size, force=args.force)
    out = out_or_default(args.out, "sae_steer", args.sae, args.direction, f"f{args.features}")
    atomic_write_json(out / "feature_steering.json", res)
    for c in res["cells"]:
        print_line({k: c.get(k) for k in ("condition", "layer", "alpha", "mean_projection", "kl_neutral", "em_rate")})
    print_line({"out": str(out)})
    return 0


def cmd_sae(args: argparse.Namespace) -> int:
    """`persona-probe sae` without a sub-command."""
    raise PersonaProbeError(f"give a sub-command: persona-probe sae {{{','.join(SAE_COMMANDS)}}} ...")


# ----------------------------------------------------------------------------- parser


def _sae_args(p: argparse.ArgumentParser, with_layer: bool = True) -> None:
    p.add_argument("--sae", required=True, help="SAE folder, name under checkpoints/saes/, or sae-lens release")
    p.add_argument("--sae-id", default=None, help="SAE id within a pretrained sae-lens release (needs the hub)")
    if with_layer:
        p.add_argument("--layer", default=None, help="layer the SAE must read (checked against its hook)")
    force_arg(p, "an SAE (and, for steer, a direction)")


def _prompt_subset_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--max-prompts", type=int, default=None, help=f"seeded subset of at most N prompts{what}")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-prompts subset")
    api_arg(p, "--batch-size", top_examples, help="records per forward pass")


def _sae_options(p: argparse.ArgumentParser) -> None:
    ss = p.add_subparsers(dest="sae_command", metavar="{" + ",".join(SAE_COMMANDS) + "}")

    t = add_command(ss, "train", "train a TopK SAE (sae-lens) on local residuals at one layer", cmd_train)
    model_args(t)
    dataclass_args(t, SAETrainConfig, flags={"generate_n": "--generate"})  # --generate: the flag's old name
    t.add_argument("--prompts", default=None, help="own corpus (builtin:NAME or JSONL, e.g. an earlier SAE's "
                   "corpus.jsonl with --generate 0) instead of the built-in mix")
    t.add_argument("--token-cache", default=None, help="folder to keep extracted residuals for retraining")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    t.add_argument("--name", default=None, help="folder name under checkpoints/saes/ "
                   "(default MODEL-LLAYER-topkK-D_SAE, e.g. smollm2-135m-instruct-L15-topk32-2048)")
    t.add_argument("--out", default=None, help="output folder, overrides --name (default checkpoints/saes/NAME)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing SAE folder")

    d = add_command(ss, "diff", "features that differ between two activation sets (A minus B)", cmd_diff)
    model_args(d)
    _sae_args(d)
    d.add_argument("--a", required=True, help="activation folder or prompts (builtin:persona/malicious/positive)")
    d.add_argument("--b", required=True, help="activation folder or prompts (builtin:persona/malicious/negative)")
    d.add_argument("--label-a", default=None, help="name of side A in tables and figures (default: its folder)")
    d.add_argument("--label-b", default=None, help="name of side B in tables and figures (default: its folder)")
    api_arg(d, "--position", diff_features, help="prompt_last | prompt_mean | response_mean | all")
    _prompt_subset_args(d, " per side")
    api_arg(d, "--top", diff_features, help="features kept per ranking")
    api_arg(d, "--examples", top_examples, "n", help="top contexts per feature for the HTML page (0 = none)")
    d.add_argument("--example-features", type=int, default=10, help="how many top features get contexts")
    d.add_argument("--out", default=None, help="output folder (default checkpoints/sae_diffs/SAE-A-vs-B)")

    c = add_command(ss, "decompose", "cosines of a direction with every decoder row + top-k reconstruction",
                    cmd_decompose)
    _sae_args(c, with_layer=False)
    c.add_argument("--direction", required=True, help="direction folder")
    api_arg(c, "--ks", decompose, help="comma list of k for the top-k reconstruction shares")
    api_arg(c, "--top", Decomposition.to_dict, help="decoder rows listed by cosine")
    c.add_argument("--out", default=None, help="output folder (default checkpoints/sae_decompositions/DIRECTION-SAE)")
    c.set_defaults(layer=None)

    e = add_command(ss, "top-examples", "top-activating contexts of features (HTML with token highlights)",
                    cmd_top_examples)
    model_args(e)
    _sae_args(e)
    e.add_argument("--prompts", required=True, help="builtin:NAME or a JSONL file of chat records")
    e.add_argument("--features", default=None, help="comma list of feature ids")
    e.add_argument("--from-diff", default=None, help="diff.json: take its top features")
    e.add_argument("--rank-by", default="mean", choices=["mean", "freq", "mean_b", "freq_b"],
                   help="which ranking of --from-diff to take")
    e.add_argument("--top-features", type=int, default=10, help="how many features --from-diff contributes")
    api_arg(e, "--n", top_examples, help="contexts per feature")
    _prompt_subset_args(e, "")
    e.add_argument("--out", default=None, help="output folder (default checkpoints/sae_examples/SAE-PROMPTS)")

    s = add_command(ss, "steer", "steer with single features vs the full direction (same α units)", cmd_steer)
    model_args(s)
    _sae_args(s)
    s.add_argument("--direction", required=True, help="direction folder")
    s.add_argument("--features", required=True, help="comma list of feature ids to steer with")
    api_arg(s, "--alphas", compare_feature_steering, help="comma list; units per --unit")
    api_arg(s, "--unit", compare_feature_steering, choices=["resid", "raw"],
            help="resid: α × typical residual norm at the layer; raw: α × the raw vector")
    api_arg(s, "--questions", compare_feature_steering, help="builtin:core | builtin:extended or a YAML/JSONL file")
    api_arg(s, "--samples", compare_feature_steering, "n_samples", help="samples per question")
    api_arg(s, "--max-new-tokens", compare_feature_steering, help="tokens generated per answer")
    api_arg(s, "--judge", compare_feature_steering, help=f"{common.JUDGE_HELP} | none (no judging)")
    api_arg(s, "--batch-size", compare_feature_steering, help="generation batch size")
    api_arg(s, "--seed", compare_feature_steering, help="seed of the sampling")
    s.add_argument("--out", default=None, help="folder for feature_steering.json "
                   "(default checkpoints/sae_steer/SAE-DIRECTION-FEATURES)")


COMMANDS: dict[str, tuple[Command, Options]] = {"sae": (cmd_sae, _sae_options)}
