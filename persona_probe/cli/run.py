"""`persona-probe run`: the whole pipeline from one YAML config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from persona_probe.cli.args import Command, Options
from persona_probe.core.paths import checkpoints_dir
from persona_probe.pipeline.run import load_config, run_pipeline


def cmd_run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {"model": {"model": args.model}} if args.model else {}
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else checkpoints_dir() / "runs" / cfg.name  # run_pipeline's own default
    report = run_pipeline(cfg, out=args.out, log=lambda m: print(m, file=sys.stderr))
    d = report["direction"]
    best = next(s for s in d["layers"] if s["layer"] == d["best_layer"])
    print(json.dumps({"report": str(out / "report.html"), "out": str(out), "best_layer": d["best_layer"],
                      "heldout_auroc": best["auroc"], "random_auroc": best["random_auroc"]}))
    return 0


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (defaults: embedded model, CPU-sized)")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--out", default=None, help="run folder (default checkpoints/runs/NAME)")


COMMANDS: dict[str, tuple[Command, Options]] = {"run": (cmd_run, _run_options)}
