"""Layer specs: the one parser of `all`, `embed`, `10`, `10,15`, `10:20`, `-1`."""

from __future__ import annotations

from collections.abc import Sequence

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.types import LayerId


def check_layers(layers: Sequence[LayerId], n_layers: int) -> list[LayerId]:
    out: list[LayerId] = []
    for L in layers:
        if L == "embed":
            out.append("embed")
            continue
        if not isinstance(L, int) or isinstance(L, bool):
            raise PersonaProbeError(f"layer {L!r} is not an integer or 'embed'")
        if not 0 <= L < n_layers:
            raise PersonaProbeError(f"layer {L} out of range: this model has layers 0..{n_layers - 1} (and 'embed')")
        out.append(L)
    return out


def parse_layers(spec: str | Sequence[LayerId] | None, n_layers: int) -> list[LayerId]:
    """`all`, `embed`, `10`, `10,15`, `10:20` (python slice, end exclusive), `-1` (last) or a list."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    if not isinstance(spec, str):
        return check_layers([L if L == "embed" else int(L) for L in spec], n_layers)
    out: list[LayerId] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "embed":
            out.append("embed")
        elif ":" in part:
            a, _, b = part.partition(":")
            try:
                lo, hi = int(a or 0), int(b or n_layers)
            except ValueError:
                raise PersonaProbeError(f"bad layer range {part!r}: use START:END, e.g. 10:20") from None
            if lo < 0 or hi > n_layers or lo >= hi:
                raise PersonaProbeError(f"layer range {part!r} out of range: this model has layers 0..{n_layers - 1}")
            out.extend(range(lo, hi))
        else:
            try:
                L = int(part)
            except ValueError:
                raise PersonaProbeError(f"bad layer {part!r}: use all, embed, N, N,M or START:END") from None
            out.append(L + n_layers if L < 0 else L)
    return check_layers(out, n_layers)
