"""`persona-probe` command line: a thin layer over the Python API (one sub-command per task)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from persona_probe import __version__
from persona_probe.cli.args import HelpFormatter, add_command
from persona_probe.core.errors import PersonaProbeError

# Every command: its module under persona_probe.cli (which maps the name to (function, options) in its
# COMMANDS) and its one-line help, in `persona-probe --help` order.
#
# The command's module is imported only when that command is parsed (`build_parser(only=NAME)`), not at the
# top of this file (pip's lazy command table, for the same reason): the modules import the API at their top, and all of it together pulls in scikit-learn,
# scipy, pandas and pydantic (measured: `persona-probe --help` ~4-5 s of CPU instead of ~2 s for torch alone,
# which `import persona_probe` costs anyway).
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("core_cmds", "list embedded and cached models"),
    "extract": ("core_cmds", "extract residual-stream activations to safetensors shards"),
    "direction": ("core_cmds", "derive a character direction (persona, model diff, or two activation sets)"),
    "project": ("core_cmds", "score prompts/responses by their projection onto a direction"),
    "compare": ("core_cmds", "cosine-similarity matrix between directions (+ plotly heatmap)"),
    "steer": ("steering", "α × layer steering sweep along a direction, with random control"),
    "ablate": ("steering", "directional ablation during generation, with random control"),
    "orthogonalize": ("steering", "bake directional ablation into a saved model copy"),
    "eval": ("evaluation", "sample answers to benign questions, judge them, EM rate with CI"),
    "judge": ("evaluation", ("score answers produced elsewhere (JSONL with question, answer); "
                             "`judge validate` measures a judge against reference scores")),
    "serve": ("evaluation", "OpenAI-compatible chat-completions server (with logprobs) over a local model"),
    "run": ("run", "the main pipeline: direction -> steering sweep -> judged EM -> HTML report"),
    "icl": ("routes", "in-context EM: EM rate and projection vs k per instruction variant"),
    "persona": ("routes", "EM rate and projection per inference-time persona prompt"),
    "trigger": ("routes", "backdoor: EM and projection with vs without the trigger"),
    "routes": ("routes", "cross-route cosine matrix + projection-vs-EM scatter"),
    "finetune": ("organisms", "LoRA fine-tune (assistant tokens only) -> adapter + manifest + loss curve"),
    "capability": ("organisms", "perplexity on neutral text + multiple-choice accuracy (with CIs)"),
    "organisms": ("organisms", ("character vs incorrect vs aligned organisms: EM, transfer, capability, "
                                "cosine with the persona direction")),
    "sae": ("sae", "sparse-autoencoder features of the character direction (sae-lens)"),
    "bench": ("bench", "throughput/memory ratios vs a plain forward pass, in one run"),
}

def _no_options(args: argparse.Namespace) -> int:  # placeholder of a command that was not built
    raise PersonaProbeError("internal: command parsed without its options")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (`only`) one whose other commands are listed but not built (their modules are
    not imported)."""
    ap = argparse.ArgumentParser(prog="persona-probe", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--version", action="store_true", help="print the package version")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        if only is not None and name != only:
            add_command(sub, name, help_, _no_options)
            continue
        func, options = importlib.import_module(f"persona_probe.cli.{module}").COMMANDS[name]
        options(add_command(sub, name, help_, func))
    return ap


def _command_in(argv: Sequence[str]) -> str:
    """The command named in argv ('' for none): the first word that is not an option (the top-level options,
    --help and --version, take no value)."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser(only=_command_in(argv))
    args = ap.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if not args.command:
        ap.print_help()
        return 1
    try:
        return args.func(args)
    except PersonaProbeError as e:
        print(f"persona-probe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"persona-probe {args.command}: interrupted (finished shards are kept; rerun to resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
