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


def test_plotly_written_once_per_folder_and_self_contained_on_request(tmp_path):
    import plotly.graph_objects as go
    import plotly.offline

    from persona_probe.report.figures import PLOTLY_JS, html_page, write_figure, write_page, write_plotlyjs

    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    js_size = len(plotly.offline.get_plotlyjs().encode())
    for name in ("a.html", "b.html", "c.html"):
        write_figure(fig, tmp_path / "pages" / name)
    write_page(tmp_path / "pages" / "table.html", "t", [("figure", "<p>x</p>")])
    files = sorted(p.name for p in (tmp_path / "pages").iterdir())
    assert files == ["a.html", "b.html", "c.html", PLOTLY_JS, "table.html"]
    assert (tmp_path / "pages" / PLOTLY_JS).stat().st_size == js_size  # one copy, the installed plotly's
    for name in ("a.html", "b.html", "c.html", "table.html"):
        page = (tmp_path / "pages" / name).read_text()
        assert f'src="{PLOTLY_JS}"' in page.replace("'", '"') and len(page) < js_size / 10
    stamp = (tmp_path / "pages" / PLOTLY_JS).stat().st_mtime_ns
    write_figure(fig, tmp_path / "pages" / "d.html")
    assert (tmp_path / "pages" / PLOTLY_JS).stat().st_mtime_ns == stamp  # not rewritten
    # a run folder with plotly.min.js: its stage folders' pages load that one copy
    write_plotlyjs(tmp_path / "run")
    write_figure(fig, tmp_path / "run" / "steering" / "sweep.html")
    assert not (tmp_path / "run" / "steering" / PLOTLY_JS).exists()
    assert f'src="../{PLOTLY_JS}"' in (tmp_path / "run" / "steering" / "sweep.html").read_text()
    # self-contained: one file that opens anywhere (the run's report.html)
    write_figure(fig, tmp_path / "alone" / "fig.html", self_contained=True)
    assert [p.name for p in (tmp_path / "alone").iterdir()] == ["fig.html"]
    assert (tmp_path / "alone" / "fig.html").stat().st_size > js_size
    page = html_page("report", [("s", "<p>x</p>")])
    assert len(page) > js_size and PLOTLY_JS not in page
