"""argparse helpers of the CLI (no persona_probe imports, so `persona-probe --help` stays cheap): the help
formatter, `add_command`, and flags whose defaults live in the API, not in the CLI: from an API function's
keyword defaults (`api_arg`) or a config dataclass's fields (`dataclass_args`). No default is typed twice.

Each option added here carries `action.api_source = (fn_or_class, name)` so tests can check that the CLI's
default is the API's (or a documented CLI override, `action.cli_override = True`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_MISSING = object()

Command = Callable[[argparse.Namespace], int]  # runs a parsed command, returns the exit status
Options = Callable[[argparse.ArgumentParser], None]  # adds a command's options to its parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to an option's help, except where the default says nothing (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_command(sub: Any, name: str, help: str, func: Command) -> argparse.ArgumentParser:
    """A (sub-)command parser with the shared formatter; `func` runs it (main dispatches on args.func)."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


def api_default(fn: Callable[..., Any], name: str) -> Any:
    """Default of keyword `name` of `fn` (a function or a class); error if it has none."""
    p = inspect.signature(fn).parameters[name]
    if p.default is inspect.Parameter.empty:
        raise TypeError(f"{getattr(fn, '__qualname__', fn)}({name}) has no default to mirror")
    return p.default


def csv(values: Sequence[Any]) -> str:
    """A sequence default as the comma list the CLI parses: (0.0, 0.25, 1.0) -> '0,0.25,1'."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def api_arg(p: argparse.ArgumentParser, flag: str, fn: Callable[..., Any], param: str | None = None, *,
            help: str, override: Any = _MISSING, **kw: Any) -> argparse.Action:
    """Add `flag` mirroring keyword `param` (default: the flag's name) of `fn`: default from the signature.

    A tuple/list default becomes a comma list (the CLI's spelling). `override` replaces the API default with
    a CLI constant where the two differ on purpose (marked `cli_override` so tests know it is deliberate).
    The type is taken from the default unless given (None defaults need an explicit `type`).
    """
    param = param or flag.lstrip("-").replace("-", "_")
    default = api_default(fn, param)
    if isinstance(default, (tuple, list)):
        default = csv(default)
    if override is not _MISSING:
        default = override
    if isinstance(default, bool):
        raise TypeError(f"{flag}: boolean keywords are store_true/--no-X flags; add them directly")
    if "type" not in kw and isinstance(default, (int, float)):
        kw["type"] = type(default)
    a = p.add_argument(flag, default=default, help=help, **kw)
    a.api_source = (fn, param)  # type: ignore[attr-defined]
    a.cli_override = override is not _MISSING  # type: ignore[attr-defined]
    return a


def _scalar_type(hint: Any) -> Any:
    """int | None -> int; int -> int (the argparse type of a dataclass field)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def dataclass_args(p: argparse.ArgumentParser, cls: type, *, flags: Mapping[str, str] | None = None,
                   skip: Sequence[str] = ()) -> list[argparse.Action]:
    """Add one `--kebab-name` option per field of dataclass `cls` (dest = the field name), with the field's
    default and type and the help in `field(metadata={"help": ...})`. `flags` renames a field's flag
    (kept CLI spellings, e.g. generate_n -> --generate); `skip` leaves fields out."""
    hints = typing.get_type_hints(cls)
    actions = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = (flags or {}).get(f.name) or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        t = _scalar_type(hints.get(f.name, str))
        help_ = f.metadata.get("help") or f"{cls.__name__}.{f.name}"
        if t is bool:
            a = p.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                               help=help_)
        else:  # metavar from the flag, not the dest, where a field keeps an older flag name
            a = p.add_argument(flag, dest=f.name, default=default, type=t if t in (int, float, str) else str,
                               metavar=flag.lstrip("-").replace("-", "_").upper(), help=help_)
        a.api_source = (cls, f.name)  # type: ignore[attr-defined]
        a.cli_override = False  # type: ignore[attr-defined]
        actions.append(a)
    return actions


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build `cls` from the options `dataclass_args` added (fields it skipped keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)})
