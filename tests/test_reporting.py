"""Figures must not invent numbers: a cell without coherent answers has no EM point."""

from __future__ import annotations

import pytest

from persona_probe.report.figures import sweep_figure


def _cell(cond: str, alpha: float, em: float | None, ci: tuple[float, float]) -> dict:
    return {"condition": cond, "layer": 15, "alpha": alpha, "em_rate": em, "em_ci95": list(ci),
            "mean_coherent": 50.0, "mean_projection": 1.0 + alpha, "kl_neutral": alpha}


def test_sweep_figure_leaves_undefined_em_as_gap():
    cells = [_cell("direction", 0.0, 0.1, (0.02, 0.3)), _cell("direction", 1.0, None, (0.0, 1.0)),
             _cell("random", 1.0, 0.0, (0.0, 0.2))]
    fig = sweep_figure(cells)
    em = [t for t in fig.data if t.xaxis in ("x", None) and t.name == "direction L15"][0]
    assert list(em.y) == [0.1, None]
    assert list(em.error_y.array) == pytest.approx([0.2, 0.0])
    assert list(em.error_y.arrayminus) == pytest.approx([0.08, 0.0])
