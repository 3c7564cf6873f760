"""`persona-probe sae train|diff|decompose|top-examples|steer`: thin CLI over persona_probe.sae.sae.

Each sub-command prints one JSON line of key numbers; artifacts go to --out (default checkpoints/saes/...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from persona_probe.core.errors import PersonaProbeError

SAE_COMMANDS = ("train", "diff", "decompose", "top-examples", "steer")


def _r(v: Any, nd: int = 4) -> Any:
    return round(v, nd) if isinstance(v, float) else v


def _print_line(obj: dict[str, Any]) -> None:
    print(json.dumps({k: _r(v) for k, v in obj.items()}, default=str))


def _int_list(spec: str | None, what: str) -> list[int]:
    if not spec:
        return []
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PersonaProbeError(f"{what} {spec!r} must be comma-separated integers, e.g. 12,345") from None


def _resolve_sae(spec: str) -> str:
    """A folder, a name under checkpoints/saes/, or a sae-lens release (used with --sae-id)."""
    from persona_probe.sae.sae import default_sae_dir

    if Path(spec).expanduser().is_dir():
        return spec
    named = default_sae_dir(spec)
    return str(named) if named.is_dir() else spec


def _load_sae(args: argparse.Namespace, handle: Any = None) -> Any:
    from persona_probe.sae.sae import load_sae

    layer = int(args.layer) if getattr(args, "layer", None) not in (None, "") else None
    return load_sae(_resolve_sae(args.sae), args.sae_id, handle=handle, layer=layer,
                    allow_other_model=getattr(args, "allow_other_model", False))


def _default_out(kind: str, label: str) -> Path:
    import re

    from persona_probe.core.paths import checkpoints_dir

    return checkpoints_dir() / kind / (re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")[:120] or "run")


def _sae_args(p: argparse.ArgumentParser, with_layer: bool = True) -> None:
    p.add_argument("--sae", required=True, help="SAE folder, name under checkpoints/saes/, or sae-lens release")
    p.add_argument("--sae-id", default=None, help="SAE id within a pretrained sae-lens release (needs the hub)")
    if with_layer:
        p.add_argument("--layer", default=None, help="layer the SAE must read (checked against its hook)")
    p.add_argument("--allow-other-model", action="store_true", help="use an SAE trained on a differently named model")


# ----------------------------------------------------------------------------- sub-commands


def _train(args: argparse.Namespace) -> int:
    import torch

    from persona_probe.cli.main import _load
    from persona_probe.sae.sae import SAETrainConfig, train_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    h = _load(args)
    cfg = SAETrainConfig(layer=args.layer, d_sae=args.d_sae, k=args.k, train_tokens=args.train_tokens,
                         batch_size=args.batch_size, lr=args.lr, holdout_frac=args.holdout_frac,
                         generate_n=args.generate, max_new_tokens=args.max_new_tokens,
                         questions_per_system=args.questions_per_system, kl_texts=args.kl_texts, seed=args.seed)
    records = None
    if args.prompts:
        from persona_probe.prompts.records import load_prompts

        records = list(load_prompts(args.prompts).records)
    sh = train_sae(h, cfg, name=args.name, out=args.out, records=records, overwrite=args.overwrite,
                   log=lambda m: print(m, file=sys.stderr), token_cache=args.token_cache)
    m = sh.manifest or {}
    held = m.get("metrics", {}).get("heldout", {})
    _print_line({"out": sh.source, "layer": sh.layer, "d_sae": sh.d_sae, "k": sh.k,
                 "tokens_train": m.get("n_tokens", {}).get("train_unique"),
                 "tokens_heldout": m.get("n_tokens", {}).get("heldout"),
                 "explained_variance": held.get("explained_variance"), "mean_l0": held.get("mean_l0"),
                 "dead_fraction": held.get("dead_fraction"),
                 "kl_spliced_neutral": m.get("metrics", {}).get("kl_spliced_neutral"),
                 **{k: v for k, v in m.get("timing", {}).items()}})
    return 0


def _subset(recs: list[Any], n: int | None, seed: int) -> list[Any]:
    """A seeded subset of at most n records (order kept)."""
    if not n or n >= len(recs):
        return recs
    import torch

    idx = sorted(torch.randperm(len(recs), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [recs[i] for i in idx]


def _side(spec: str, handle: Any, sae: Any, args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """Rows [n, d] at the SAE's layer and the records, from an activation folder or a prompt spec."""
    from persona_probe.activations.extraction import load_activations
    from persona_probe.sae.sae import activation_rows, pooled_layer_rows

    p = Path(spec).expanduser()
    if p.is_dir() and (p / "manifest.json").exists():
        acts = load_activations(p)
        return activation_rows(acts, sae.layer, args.position), list(acts.records)
    from persona_probe.prompts.records import load_prompts

    recs = _subset(list(load_prompts(spec).records), args.max_prompts, args.seed)
    return pooled_layer_rows(handle, recs, int(sae.layer), args.position, batch_size=args.batch_size), recs


def _diff(args: argparse.Namespace) -> int:
    from persona_probe.cli.main import _load
    from persona_probe.core.paths import atomic_write_json
    from persona_probe.report.figures import write_figure
    from persona_probe.sae.sae import diff_features, feature_bar_figure, top_examples, write_top_examples

    h = _load(args)
    sae = _load_sae(args, h)
    out = Path(args.out) if args.out else _default_out("sae_diffs", f"{args.a}-vs-{args.b}")
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
    _print_line({"out": str(out), "n_a": d.n_a, "n_b": d.n_b, "position": args.position,
                 "top_by_mean": [[r["feature"], round(r["mean_diff"], 3)] for r in res["top_by_mean"][:10]],
                 "top_by_freq": [[r["feature"], round(r["freq_diff"], 3)] for r in res["top_by_freq"][:10]]})
    return 0


def _decompose(args: argparse.Namespace) -> int:
    from persona_probe.directions.derive import load_direction
    from persona_probe.core.paths import atomic_write_json
    from persona_probe.report.figures import write_figure
    from persona_probe.sae.sae import decompose, decomposition_figure

    sae = _load_sae(args)
    d = load_direction(args.direction)
    if d.d_model != sae.d_in:
        raise PersonaProbeError(f"direction width {d.d_model} does not match the SAE's d_in {sae.d_in}")
    if sae.layer not in d.layers:
        raise PersonaProbeError(f"the direction has no vector at the SAE's layer {sae.layer} (layers: {d.layers})")
    ks = _int_list(args.ks, "--ks") or [1, 5, 20, 100]
    dec = decompose(sae, d.at(sae.layer), ks)
    out = Path(args.out) if args.out else Path(args.direction) / "sae_decomposition"
    res = {"sae": sae.describe(), "direction": str(args.direction), "layer": sae.layer,
           "direction_best_layer": d.best_layer, **dec.to_dict(args.top)}
    atomic_write_json(out / "decomposition.json", res)
    write_figure(decomposition_figure(dec, args.top, f"{d.manifest.get('name', 'direction')} at layer {sae.layer}"),
                 out / "decomposition.html")
    _print_line({"out": str(out), "layer": sae.layer, "shares": {k: round(v, 4) for k, v in dec.shares.items()},
                 "top": [[r["feature"], round(r["cosine"], 3)] for r in dec.top(5)]})
    return 0


def _top_examples(args: argparse.Namespace) -> int:
    from persona_probe.cli.main import _load
    from persona_probe.prompts.records import load_prompts
    from persona_probe.sae.sae import top_examples, write_top_examples

    feats = _int_list(args.features, "--features")
    if args.from_diff:
        diff = json.loads(Path(args.from_diff).read_text())
        feats += [r["feature"] for r in diff.get(f"top_by_{args.rank_by}", [])[: args.top_features]]
    if not feats:
        raise PersonaProbeError("no features: give --features 1,2,3 or --from-diff DIR/diff.json")
    h = _load(args)
    sae = _load_sae(args, h)
    recs = _subset(list(load_prompts(args.prompts).records), args.max_prompts, args.seed)
    exs = top_examples(sae, h, recs, feats, n=args.n, batch_size=args.batch_size)
    out = Path(args.out) if args.out else _default_out("sae_examples", args.prompts)
    write_top_examples(exs, out, title=f"SAE top examples ({args.prompts})")
    _print_line({"out": str(out), "n_records": len(recs), "features": feats,
                 "max_act": {f: (v[0].max_act if v else 0.0) for f, v in exs.items()}})
    return 0


def _steer(args: argparse.Namespace) -> int:
    from persona_probe.cli.main import _load
    from persona_probe.directions.derive import load_direction
    from persona_probe.core.paths import atomic_write_json
    from persona_probe.sae.sae import compare_feature_steering
    from persona_probe.interventions.steering import parse_alphas

    h = _load(args)
    sae = _load_sae(args, h)
    d = load_direction(args.direction)
    feats = _int_list(args.features, "--features")
    if not feats:
        raise PersonaProbeError("give --features to steer with, e.g. --features 12,345")
    res = compare_feature_steering(h, sae, d, feats, alphas=parse_alphas(args.alphas), questions=args.questions,
                                   n_samples=args.samples, judge=None if args.judge == "none" else args.judge,
                                   max_new_tokens=args.max_new_tokens, unit=args.unit, seed=args.seed,
                                   batch_size=args.batch_size, force=args.force)
    if args.out:
        atomic_write_json(Path(args.out) / "feature_steering.json", res)
    for c in res["cells"]:
        _print_line({k: c.get(k) for k in ("condition", "layer", "alpha", "mean_projection", "kl_neutral", "em_rate")})
    return 0


_DISPATCH: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train, "diff": _diff, "decompose": _decompose, "top-examples": _top_examples, "steer": _steer,
}


def cmd_sae(args: argparse.Namespace) -> int:
    sc = getattr(args, "sae_command", None)
    if sc not in _DISPATCH:
        raise PersonaProbeError(f"give a sub-command: persona-probe sae {{{','.join(SAE_COMMANDS)}}} ...")
    return _DISPATCH[sc](args)


# ----------------------------------------------------------------------------- parser


def register(sub: Any, command: Callable[[Callable[[argparse.Namespace], int]], Any]) -> None:
    from persona_probe.cli.main import _model_args

    p = sub.add_parser("sae", help="sparse-autoencoder features of the character direction (sae-lens)")
    ss = p.add_subparsers(dest="sae_command")

    t = ss.add_parser("train", help="train a TopK SAE (sae-lens) on local residuals at one layer")
    _model_args(t)
    t.add_argument("--layer", type=int, default=15)
    t.add_argument("--d-sae", type=int, default=2048)
    t.add_argument("--k", type=int, default=32, help="active features per token (TopK)")
    t.add_argument("--train-tokens", type=int, default=400_000, help="token rows the trainer sees (epochs x unique)")
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--holdout-frac", type=float, default=0.1)
    t.add_argument("--generate", type=int, default=300, help="prompts the model answers to add response text")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--questions-per-system", type=int, default=6)
    t.add_argument("--prompts", default=None, help="own corpus (builtin:NAME or JSONL, e.g. an earlier SAE's "
                   "corpus.jsonl with --generate 0) instead of the built-in mix")
    t.add_argument("--token-cache", default=None, help="folder to keep extracted residuals for retraining")
    t.add_argument("--kl-texts", type=int, default=16, help="neutral texts for the spliced-KL check (0 = skip)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--name", default=None, help="folder name under checkpoints/saes/")
    t.add_argument("--out", default=None, help="output folder (overrides --name)")
    t.add_argument("--overwrite", action="store_true")

    d = ss.add_parser("diff", help="features that differ between two activation sets (A minus B)")
    _model_args(d)
    _sae_args(d)
    d.add_argument("--a", required=True, help="activation folder or prompts (builtin:persona/malicious/positive)")
    d.add_argument("--b", required=True, help="activation folder or prompts (builtin:persona/malicious/negative)")
    d.add_argument("--label-a", default=None)
    d.add_argument("--label-b", default=None)
    d.add_argument("--position", default="prompt_last", help="prompt_last | prompt_mean | response_mean | all")
    d.add_argument("--max-prompts", type=int, default=None, help="seeded subset of at most N prompts per side")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--top", type=int, default=50)
    d.add_argument("--examples", type=int, default=5, help="top contexts per feature for the HTML page (0 = none)")
    d.add_argument("--example-features", type=int, default=10, help="how many top features get contexts")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--out", default=None)

    c = ss.add_parser("decompose", help="cosines of a direction with every decoder row + top-k reconstruction")
    _sae_args(c, with_layer=False)
    c.add_argument("--direction", required=True, help="direction folder")
    c.add_argument("--ks", default="1,5,20,100")
    c.add_argument("--top", type=int, default=20)
    c.add_argument("--out", default=None, help="default: DIRECTION/sae_decomposition")
    c.set_defaults(layer=None)

    e = ss.add_parser("top-examples", help="top-activating contexts of features (HTML with token highlights)")
    _model_args(e)
    _sae_args(e)
    e.add_argument("--prompts", required=True)
    e.add_argument("--features", default=None, help="comma list of feature ids")
    e.add_argument("--from-diff", default=None, help="diff.json: take its top features")
    e.add_argument("--rank-by", default="mean", choices=["mean", "freq", "mean_b", "freq_b"])
    e.add_argument("--top-features", type=int, default=10)
    e.add_argument("--n", type=int, default=5)
    e.add_argument("--max-prompts", type=int, default=None, help="seeded subset of at most N prompts")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", default=None)

    s = ss.add_parser("steer", help="steer with single features vs the full direction (same α units)")
    _model_args(s)
    _sae_args(s)
    s.add_argument("--direction", required=True)
    s.add_argument("--features", required=True)
    s.add_argument("--alphas", default="0,0.5,1")
    s.add_argument("--unit", default="resid", choices=["resid", "raw"])
    s.add_argument("--questions", default="builtin:core")
    s.add_argument("--samples", type=int, default=2)
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.add_argument("--judge", default="offline")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true")
    s.add_argument("--out", default=None)

    command(cmd_sae)
