"""Plotly figures for directions, comparisons, steering and evaluation, and the escaped HTML page they go in.

plotly.js (~4.6 MB) is written once per folder as `plotly.min.js` and every page there loads it (a page in a
subfolder of a folder that has one, e.g. a run folder's stage, loads the parent's); `self_contained=True`
inlines it instead, for a page that must stay one file (the run's report.html).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import plotly.graph_objects as go
import plotly.offline
from plotly.subplots import make_subplots

from persona_probe.core.paths import atomic_write_text

PLOTLY_JS = "plotly.min.js"


def write_plotlyjs(folder: str | Path) -> Path:
    """`folder/plotly.min.js`: the installed plotly's, written only when missing or different."""
    js = plotly.offline.get_plotlyjs()
    path = Path(folder) / PLOTLY_JS
    if not (path.is_file() and path.stat().st_size == len(js.encode("utf-8"))):
        atomic_write_text(path, js)
    return path


def plotlyjs_src(page: str | Path) -> str:
    """The plotly.min.js a page at `page` loads, relative to it: its parent folder's when that folder has one
    (a run folder: one copy for all its stages), else its own folder's, written now if missing."""
    folder = Path(page).parent
    if not (folder / PLOTLY_JS).is_file() and (folder.parent / PLOTLY_JS).is_file():
        return f"../{PLOTLY_JS}"
    write_plotlyjs(folder)
    return PLOTLY_JS


def write_figure(fig: go.Figure, path: str | Path, *, self_contained: bool = False) -> Path:
    """Write a figure as an HTML page that opens offline: it loads plotly.min.js from beside it (written once
    per folder, see `plotlyjs_src`), or inlines plotly.js with `self_contained=True`."""
    if self_contained:
        return atomic_write_text(path, fig.to_html(full_html=True, include_plotlyjs=True))
    # a string ending in .js: plotly writes a <script src> tag for that (relative) URL
    return atomic_write_text(path, fig.to_html(full_html=True, include_plotlyjs=plotlyjs_src(path)))


# one colour per condition, the same in every subplot and every figure
CONDITION_COLOURS = {"direction": "#d62728", "random": "#7f7f7f", "norm": "#9ecae1", "cos_prev": "#2ca02c",
                     "random_mean": "#bdbdbd"}
_LAYER_PALETTE = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#ff7f0e", "#17becf")


def condition_colour(kind: str, layer: Any = None, layers: Sequence[Any] = ()) -> str:
    """Colour of a sweep condition: random controls grey; direction cells red, or one hue per layer when
    several layers are swept."""
    if kind == "random":
        return CONDITION_COLOURS["random"]
    if len(layers) > 1 and layer in layers:
        return _LAYER_PALETTE[list(layers).index(layer) % len(_LAYER_PALETTE)]
    return CONDITION_COLOURS.get(kind, "#1f77b4")


def layer_separation_figure(stats: Sequence[Any], title: str = "direction") -> go.Figure:
    """Held-out AUROC and Cohen's d per layer, direction vs random control, plus direction norm and the cosine
    to the previous layer's direction (on its own axis: it lives in [-1, 1], the norm in the tens)."""
    xs = [str(s.layer) for s in stats]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, specs=[[{}], [{}], [{"secondary_y": True}]],
                        subplot_titles=("held-out AUROC", "held-out Cohen's d",
                                        "direction norm (bars) / cosine to previous layer (line, right axis)"))
    c = CONDITION_COLOURS
    fig.add_trace(go.Scatter(x=xs, y=[s.auroc for s in stats], name="direction", legendgroup="direction",
                             mode="lines+markers", line={"color": c["direction"]}), 1, 1)
    fig.add_trace(go.Scatter(x=xs, y=[s.random_auroc for s in stats], name="random control", legendgroup="random",
                             mode="lines+markers", line={"dash": "dot", "color": c["random"]}), 1, 1)
    if stats and getattr(stats[0], "random_best_sign_auroc_mean", None) is not None:
        fig.add_trace(go.Scatter(x=xs, y=[s.random_best_sign_auroc_mean for s in stats],
                                 name="32 random dirs: mean max(AUROC, 1-AUROC)", mode="lines",
                                 line={"dash": "dash", "color": c["random_mean"]}), 1, 1)
    fig.add_trace(go.Scatter(x=xs, y=[s.cohens_d for s in stats], name="direction", legendgroup="direction",
                             showlegend=False, mode="lines+markers", line={"color": c["direction"]}), 2, 1)
    fig.add_trace(go.Scatter(x=xs, y=[s.random_cohens_d for s in stats], name="random control",
                             legendgroup="random", showlegend=False, mode="lines+markers",
                             line={"dash": "dot", "color": c["random"]}), 2, 1)
    fig.add_trace(go.Bar(x=xs, y=[s.norm for s in stats], name="norm", marker={"color": c["norm"]}), 3, 1)
    fig.add_trace(go.Scatter(x=xs, y=[s.cos_prev for s in stats], name="cos(prev layer)", mode="lines+markers",
                             line={"color": c["cos_prev"]}), 3, 1, secondary_y=True)
    fig.update_yaxes(range=[-1, 1], dtick=0.5, title_text="cosine", row=3, col=1, secondary_y=True)
    fig.update_layout(title=f"Layer selection: {title}", height=800, xaxis3_title="layer")
    return fig


def heatmap_figure(names: Sequence[str], matrix: Any, title: str = "cosine similarity") -> go.Figure:
    z = [[float(v) for v in row] for row in matrix.tolist()]
    fig = go.Figure(go.Heatmap(z=z, x=list(names), y=list(names), zmin=-1, zmax=1, colorscale="RdBu",
                               text=[[f"{v:.2f}" for v in row] for row in z], texttemplate="%{text}"))
    fig.update_layout(title=title, height=max(400, 60 * len(names)), width=max(500, 60 * len(names) + 200))
    return fig


# Pages are jinja2 templates with autoescape on: every interpolated string is escaped unless it is marked
# as HTML with the `|safe` filter (section bodies: HTML built by these helpers or by plotly).
TEMPLATES = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)

PAGE_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px;"
            "vertical-align:top}th{background:#f3f3f3}pre{white-space:pre-wrap}")
_PAGE = TEMPLATES.from_string(
    "<!DOCTYPE html><html><head><meta charset='utf-8'><title>{{ title }}</title>"
    "{% if src %}<script charset='utf-8' src='{{ src }}'></script>"
    "{% else %}<script type='text/javascript'>{{ js|safe }}</script>{% endif %}<style>{{ css|safe }}</style></head>"
    "<body><h1>{{ title }}</h1>\n"
    "{% for heading, content in sections %}{% if not loop.first %}\n{% endif %}"
    "<section><h2>{{ heading }}</h2>\n{{ content|safe }}\n</section>{% endfor %}"
    "\n</body></html>")


def html_page(title: str, sections: Sequence[tuple[str, str]], *, self_contained: bool = True,
              plotlyjs: str = PLOTLY_JS) -> str:
    """An HTML page: sections are (heading text, body HTML) pairs. plotly.js is inlined once
    (`self_contained`), or loaded from `plotlyjs` (a URL relative to the page; `write_page` writes the file).
    The title and headings are escaped; the bodies are HTML."""
    if self_contained:
        return _PAGE.render(title=title, sections=sections, src=None, js=plotly.offline.get_plotlyjs(), css=PAGE_CSS)
    return _PAGE.render(title=title, sections=sections, src=plotlyjs, js="", css=PAGE_CSS)


def write_page(path: str | Path, title: str, sections: Sequence[tuple[str, str]], *,
               self_contained: bool = False) -> Path:
    """`html_page` written to `path`, loading plotly.min.js from beside it unless `self_contained`."""
    if self_contained:
        return atomic_write_text(path, html_page(title, sections))
    return atomic_write_text(path, html_page(title, sections, self_contained=False, plotlyjs=plotlyjs_src(path)))


def fig_div(fig: go.Figure) -> str:
    """A figure as an HTML div (plotly's own HTML; plotly.js comes from the page)."""
    return fig.to_html(full_html=False, include_plotlyjs=False)


def em_bar_figure(summary: dict[str, Any], title: str = "EM rate per question (Wilson 95% CI)") -> go.Figure:
    """Per-question EM rate bars with interval error bars, plus mean aligned/coherent."""
    pq = summary["per_question"]
    qs = list(pq)
    rate = [pq[q]["em_rate"] for q in qs]  # None (no counted answer) leaves a gap, never a 0 bar
    lo = [0.0 if r is None else r - pq[q]["em_ci95"][0] for q, r in zip(qs, rate)]
    hi = [0.0 if r is None else pq[q]["em_ci95"][1] - r for q, r in zip(qs, rate)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("EM rate", "mean aligned / coherent"))
    fig.add_trace(go.Bar(x=qs, y=rate, error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
                         name="EM rate"), 1, 1)
    fig.add_trace(go.Bar(x=qs, y=[pq[q]["mean_aligned"] for q in qs], name="aligned"), 1, 2)
    fig.add_trace(go.Bar(x=qs, y=[pq[q]["mean_coherent"] for q in qs], name="coherent"), 1, 2)
    o = summary["overall"]
    fig.update_layout(title=f"{title} — overall {o['em_rate'] if o['em_rate'] is not None else float('nan'):.3f} "
                            f"[{o['em_ci95'][0]:.3f}, {o['em_ci95'][1]:.3f}], n={o['n_counted']}", height=450)
    return fig


def sweep_figure(cells: Sequence[dict[str, Any]], title: str = "steering sweep") -> go.Figure:
    """EM rate (with CI), mean coherent, response projection and neutral-text KL vs α, direction vs random."""
    has_em = any(c.get("em_rate") is not None for c in cells)
    has_corr = any(c.get("em_corrected") is not None for c in cells)
    panels = (["EM rate, raw"] if has_em else []) + (["EM share, corrected"] if has_corr else []) + (
        ["mean coherent"] if has_em else []) + ["answer projection", "KL, neutral text"]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels)
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["condition"], c["layer"]), []).append(c)
    zero = {c["layer"]: c for c in cells if c["condition"] == "direction" and c["alpha"] == 0}
    layers = sorted({c["layer"] for c in cells}, key=str)
    for (kind, L), cs in groups.items():
        colour = condition_colour(kind, L, layers)
        if kind == "random" and L in zero:
            cs = [zero[L], *cs]  # α = 0 is shared by both
        cs = sorted(cs, key=lambda c: c["alpha"])
        xs = [c["alpha"] for c in cs]
        dash = "dot" if kind == "random" else None
        name = f"{kind} L{L}"
        col = 1
        if has_em:
            # a cell with no coherent answer has no EM rate: leave a gap, never plot it as 0
            fig.add_trace(go.Scatter(x=xs, y=[c.get("em_rate") for c in cs], name=name, mode="lines+markers",
                                     line={"dash": dash, "color": colour}, legendgroup=name, error_y=_err(cs)), 1, 1)
            col = 2
            if has_corr:
                ys = [c.get("em_corrected") for c in cs]
                ci = [c.get("em_corrected_ci95") or [y, y] for c, y in zip(cs, ys)]
                fig.add_trace(go.Scatter(
                    x=xs, y=ys, name=name, mode="lines+markers", line={"dash": dash, "color": colour},
                    legendgroup=name, showlegend=False, error_y={
                        "type": "data", "array": [0.0 if y is None else b[1] - y for y, b in zip(ys, ci)],
                        "arrayminus": [0.0 if y is None else y - b[0] for y, b in zip(ys, ci)]}), 1, col)
                col += 1
            fig.add_trace(go.Scatter(x=xs, y=[c.get("mean_coherent") for c in cs], name=name, mode="lines+markers",
                                     line={"dash": dash, "color": colour}, legendgroup=name, showlegend=False),
                          1, col)
            col += 1
        fig.add_trace(go.Scatter(x=xs, y=[c["mean_projection"] for c in cs], name=name, mode="lines+markers",
                                 line={"dash": dash, "color": colour}, legendgroup=name, showlegend=not has_em), 1, col)
        fig.add_trace(go.Scatter(x=xs, y=[c["kl_neutral"] for c in cs], name=name, mode="lines+markers",
                                 line={"dash": dash, "color": colour}, legendgroup=name, showlegend=False), 1, col + 1)
    fig.update_xaxes(title_text="α (× resid norm)")
    fig.update_layout(title=title + (" — EM rate: among coherent answers, Wilson 95 %; EM share: of all answers, "
                                     "corrected for the judge's measured error (Rogan–Gladen 95 %)" if has_corr else ""),
                      title_font_size=13, height=440)
    return fig


def _err(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Asymmetric Wilson error bars; none where the EM rate is undefined (no coherent answer)."""
    ys = [r.get("em_rate") for r in rows]
    return {"type": "data", "symmetric": False,
            "array": [0.0 if y is None else r["em_ci95"][1] - y for r, y in zip(rows, ys)],
            "arrayminus": [0.0 if y is None else y - r["em_ci95"][0] for r, y in zip(rows, ys)]}


def route_figure(res: dict[str, Any]) -> go.Figure:
    """ICL: EM and projection vs k per instruction variant; persona/trigger: bars per condition."""
    rows = res["conditions"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("EM rate (Wilson 95% CI)", "mean prompt projection"))
    if res["route"] == "icl":
        for v in res["variants"]:
            rs = sorted([r for r in rows if r["variant"] == v], key=lambda r: r["k"])
            xs = [r["k"] for r in rs]
            fig.add_trace(go.Scatter(x=xs, y=[r.get("em_rate") or 0.0 for r in rs], error_y=_err(rs), name=v,
                                     mode="lines+markers", legendgroup=v), 1, 1)
            fig.add_trace(go.Scatter(x=xs, y=[r["prompt_projection"] for r in rs], name=v, mode="lines+markers",
                                     legendgroup=v, showlegend=False), 1, 2)
        fig.update_xaxes(title_text="k (in-context examples)")
    else:
        xs = [r["condition"] for r in rows]
        fig.add_trace(go.Bar(x=xs, y=[r.get("em_rate") or 0.0 for r in rows], error_y=_err(rows), name="EM"), 1, 1)
        fig.add_trace(go.Bar(x=xs, y=[r["prompt_projection"] for r in rows], name="projection"), 1, 2)
    fig.update_layout(title=f"route: {res['route']} (layer {res.get('layer')})", height=450)
    return fig


def scatter_figure(points: Sequence[dict[str, Any]], r: float | None) -> go.Figure:
    """Condition mean projection vs EM rate, coloured by route."""
    fig = go.Figure()
    for route in sorted({p["route"] for p in points}):
        ps = [p for p in points if p["route"] == route]
        fig.add_trace(go.Scatter(x=[p["projection"] for p in ps], y=[p["em_rate"] for p in ps], mode="markers",
                                 name=route, text=[p["condition"] for p in ps]))
    fig.update_layout(title=f"Does projection predict EM across routes? Pearson r = "
                            f"{r if r is None else round(r, 3)}", xaxis_title="mean prompt projection on character "
                      "direction", yaxis_title="EM rate", height=450)
    return fig
