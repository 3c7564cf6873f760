"""Shared test helper: a CLI call that must fail fast with one line (bad input, no model load)."""

from __future__ import annotations

import time

from persona_probe.cli.main import main


def fails_fast(argv, capsys, *needles):
    """`main(argv)` returns 2 in < 2 s with a one-line error containing every needle."""
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
