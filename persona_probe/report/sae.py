"""Figures and HTML for SAE features: ranked-feature bars, a direction's decomposition, top-activating
contexts with per-token highlights, and the pipeline report's SAE section.

Plain data in (rows as dicts, duck-typed examples / decompositions), plotly figures and HTML strings out;
every piece of prompt or model text is escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from persona_probe.core.paths import atomic_write_json, atomic_write_text
from persona_probe.report.figures import PLOTLY_JS, fig_div, html_page, plotlyjs_src


class ExampleLike(Protocol):
    """One context (e.g. `sae.features.Example`): tokens with this feature's activation per token."""

    record_id: str
    tokens: list[str]
    acts: list[float]
    max_act: float


class DecompositionLike(Protocol):
    """A direction against the decoder rows (e.g. `sae.features.Decomposition`)."""

    shares: dict[int, float]

    def top(self, n: int = 20) -> list[dict[str, Any]]: ...


def feature_bar_figure(rows: Sequence[dict[str, Any]], value: str = "mean_diff", title: str = "top features",
                       labels: tuple[str, str] = ("a", "b")) -> go.Figure:
    """Bar chart of ranked feature rows (from FeatureDiff.ranked): `value` per feature, hover with both sides."""
    la, lb = html.escape(labels[0]), html.escape(labels[1])
    xs = [f"#{r['feature']}" for r in rows]
    hover = [f"feature {r['feature']}<br>mean {la} {r['mean_a']:.3f} / {lb} {r['mean_b']:.3f}"
             f"<br>freq {la} {r['freq_a']:.3f} / {lb} {r['freq_b']:.3f}" for r in rows]
    fig = go.Figure(go.Bar(x=xs, y=[r[value] for r in rows], hovertext=hover, hoverinfo="text"))
    fig.update_layout(title=title, xaxis_title="SAE feature", yaxis_title=value, height=420,
                      xaxis={"type": "category"})
    return fig


def decomposition_figure(dec: DecompositionLike, top: int = 20,
                         title: str = "direction vs SAE decoder") -> go.Figure:
    """Cosines of the top features (by |cos|) and the reconstruction share vs k."""
    rows = dec.top(top)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"cosine, top {top} features by |cos|",
                                                        "share of ||v||² reconstructed by top-k rows"))
    fig.add_trace(go.Bar(x=[f"#{r['feature']}" for r in rows], y=[r["cosine"] for r in rows], name="cosine"), 1, 1)
    ks = sorted(dec.shares)
    fig.add_trace(go.Scatter(x=ks, y=[dec.shares[k] for k in ks], mode="lines+markers", name="share"), 1, 2)
    fig.update_xaxes(type="category", row=1, col=1)
    fig.update_xaxes(type="log", title_text="k", row=1, col=2)
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    fig.update_layout(title=title, height=420)
    return fig


def _highlight(ex: ExampleLike, scale: float) -> str:
    """Tokens as spans whose orange background grows with the activation (hover: the value)."""
    spans = []
    for t, a in zip(ex.tokens, ex.acts):
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, a / scale))
        txt = html.escape(t).replace("\n", "↵<br>")
        spans.append(f"<span title='{a:.3f}' style='background:rgba(255,110,0,{alpha:.3f})'>{txt}</span>")
    return "".join(spans)


def top_examples_html(examples: Mapping[int, Sequence[ExampleLike]], title: str = "SAE feature top examples",
                      notes: Mapping[int, str] | None = None, figure: go.Figure | None = None, *,
                      self_contained: bool = True, plotlyjs: str = PLOTLY_JS) -> str:
    """Page: per feature, its top contexts with background colour ∝ activation (max = the feature's strongest
    activation among the shown examples; hover a token for its value). Self-contained, or loading plotly.js
    from `plotlyjs` (see `html_page`)."""
    sections: list[tuple[str, str]] = []
    if figure is not None:
        sections.append(("overview", fig_div(figure)))
    for f, exs in examples.items():
        scale = max((e.max_act for e in exs), default=0.0)
        body = [f"<p>{html.escape(notes[f])}</p>"] if notes and f in notes else []
        if not exs:
            body.append("<p>never fires on these prompts</p>")
        body += [f"<div style='margin:6px 0;padding:4px;border-left:3px solid #f60;font-family:monospace;"
                 f"font-size:13px'><b>{e.max_act:.2f}</b> <i>{html.escape(e.record_id)}</i><br>"
                 f"{_highlight(e, scale)}</div>" for e in exs]
        sections.append((f"feature {int(f)}", "\n".join(body)))
    return html_page(title, sections, self_contained=self_contained, plotlyjs=plotlyjs)


def _example_dict(e: Any) -> dict[str, Any]:
    return asdict(e) if is_dataclass(e) else dict(vars(e))


def write_top_examples(examples: Mapping[int, Sequence[ExampleLike]], out: str | Path, **kw: Any) -> Path:
    """top_examples.html (loading the folder's plotly.min.js unless `self_contained=True`) + top_examples.json
    under folder `out`; `kw` goes to `top_examples_html`."""
    o = Path(out)
    atomic_write_json(o / "top_examples.json",
                      {str(f): [_example_dict(e) for e in exs] for f, exs in examples.items()})
    page = o / "top_examples.html"
    if not kw.get("self_contained", False):
        kw.update(self_contained=False, plotlyjs=plotlyjs_src(page))
    return atomic_write_text(page, top_examples_html(examples, **kw))


def sae_section_html(source: str, layer: Any, d_sae: int, shares: Mapping[str, float],
                     top_rows: Sequence[dict[str, Any]], examples_page: str | Path) -> str:
    """The run report's SAE section: top-k reconstruction shares of the direction, the features more active
    under the character prompts (rows from FeatureDiff.ranked), and where the top-contexts page is."""
    dec_fig = go.Figure(go.Bar(x=[f"top-{k}" for k in shares], y=list(shares.values())))
    dec_fig.update_layout(title="share of the direction reconstructed by its top-k decoder rows",
                          yaxis_title="share (least squares, R²)", height=320)
    bars = feature_bar_figure(top_rows, "mean_diff", "features more active under the character prompts",
                              ("character", "neutral"))
    return (f"<p>SAE {html.escape(str(source))} at layer {html.escape(str(layer))} (d_sae {int(d_sae)}). "
            f"Top-k reconstruction shares: {html.escape(json.dumps(dict(shares)))}. "
            f"Top-activating contexts: <code>{html.escape(str(examples_page))}</code>.</p>"
            + fig_div(dec_fig) + fig_div(bars))


__all__ = ["decomposition_figure", "feature_bar_figure", "sae_section_html", "top_examples_html",
           "write_top_examples"]
