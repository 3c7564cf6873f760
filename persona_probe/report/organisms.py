"""Tables, figures and the HTML page of the model-organisms experiment.

Everything here takes the experiment's plain result (dicts and lists: `rows`, `persona`, `cos_per_layer`,
`manifest`, `budget_note`) and loss curves (`{label: [{"step", "loss", ...}, ...]}`), so this layer needs
nothing from organisms/ or experiments/.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from persona_probe.core.artifacts import write_manifest
from persona_probe.core.paths import atomic_write_json
from persona_probe.report.figures import fig_div, write_figure, write_page

EM_KEYS = ("em_in_domain", "em_ood", "em_in_domain_triggered", "em_ood_triggered")


def loss_figure(curves: dict[str, Sequence[dict[str, float]]], title: str = "training loss") -> go.Figure:
    """One line per training run: loss per optimizer step."""
    fig = go.Figure()
    for name, c in curves.items():
        fig.add_trace(go.Scatter(x=[r["step"] for r in c], y=[r["loss"] for r in c], mode="lines", name=name))
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="loss (assistant tokens, nats/token)",
                      height=420)
    return fig


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    """The key numbers of one table row (rounded), for CLI lines."""
    def r(x: Any) -> Any:
        return round(x, 4) if isinstance(x, float) else [r(v) for v in x] if isinstance(x, list) else x

    out: dict[str, Any] = {"domain": row["domain"], "variant": row["variant"]}
    for k in EM_KEYS:
        if k in row:
            out[k] = r(row[k]["em_rate"])
            out[k + "_ci95"] = r(row[k]["em_ci95"])
    for k in ("em_in_domain_p_vs_base", "em_ood_p_vs_base", "final_loss", "cos_persona", "cos_random_control",
              "layer"):
        if k in row:
            out[k] = r(row[k])
    cap = row.get("capability", {})
    if "delta" in cap:
        out.update(ppl_delta=r(cap["delta"]["ppl_delta"]), mc_delta=r(cap["delta"]["mc_accuracy_delta"]))
    elif cap:
        out.update(ppl=r(cap["ppl"]), mc_accuracy=r(cap["mc_accuracy"]))
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-3 and x != 0 else f"{x:.3f}"
    return str(x)


def _em_cell(e: dict[str, Any] | None) -> str:
    if not e:
        return "–"
    return f"{_fmt(e['em_rate'])} [{_fmt(e['em_ci95'][0])}, {_fmt(e['em_ci95'][1])}] (n={e['n_counted']})"


def _delta_cell(d: dict[str, Any], key: str) -> str:
    return f"{_fmt(d[key])} [{_fmt(d[key + '_ci95'][0])}, {_fmt(d[key + '_ci95'][1])}]"


def table_html(rows: Sequence[dict[str, Any]]) -> str:
    """The experiment table as an HTML <table> (every text escaped; a triggered organism's second line is
    joined with <br>)."""
    head = ["domain", "variant", "final loss", "EM in-domain [95% CI]", "p vs base", "EM out-of-domain [95% CI]",
            "p vs base", "mean aligned (in / out)", "PPL Δ [95% CI]", "MC acc Δ [95% CI]", "cos(model diff, persona)",
            "random control cos"]
    body = []
    for r in rows:
        cap = r.get("capability", {})
        d = cap.get("delta", {})
        al = "/".join(_fmt((r.get(k) or {}).get("mean_aligned")) for k in ("em_in_domain", "em_ood"))
        ppl = _delta_cell(d, "ppl_delta") if d else (f"PPL {_fmt(cap.get('ppl'))}" if cap else "–")
        mc = _delta_cell(d, "mc_accuracy_delta") if d else (f"acc {_fmt(cap.get('mc_accuracy'))}" if cap else "–")
        cells: list[list[str]] = [[str(c)] for c in (
            r["domain"], r["variant"], _fmt(r.get("final_loss")), _em_cell(r.get("em_in_domain")),
            _fmt(r.get("em_in_domain_p_vs_base")), _em_cell(r.get("em_ood")), _fmt(r.get("em_ood_p_vs_base")),
            al, ppl, mc, _fmt(r.get("cos_persona")), _fmt(r.get("cos_random_control")))]
        if "em_in_domain_triggered" in r:
            cells[3].append(f"with trigger: {_em_cell(r['em_in_domain_triggered'])}")
            cells[5].append(f"with trigger: {_em_cell(r['em_ood_triggered'])}")
        body.append("<tr>" + "".join(f"<td>{'<br>'.join(html.escape(x) for x in c)}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body)
            + "</table>")


def experiment_figures(result: dict[str, Any], curves: dict[str, Any]) -> dict[str, go.Figure]:
    """EM rates (in/out of domain), cosine with the persona direction, capability deltas, loss curves."""
    rows = result["rows"]
    names = [f"{r['domain']}/{r['variant']}" for r in rows]
    em = go.Figure()
    for key, label in (("em_in_domain", "in-domain (held-out questions)"), ("em_ood", "out-of-domain (core)")):
        ys = [(r.get(key) or {}).get("em_rate") for r in rows]
        lo = [(y - r[key]["em_ci95"][0]) if y is not None else 0 for r, y in zip(rows, ys)]
        hi = [(r[key]["em_ci95"][1] - y) if y is not None else 0 for r, y in zip(rows, ys)]
        em.add_trace(go.Bar(x=names, y=ys, name=label, error_y={"type": "data", "symmetric": False, "array": hi,
                                                                "arrayminus": lo}))
    em.update_layout(title="EM rate per organism (Wilson 95% CI)", barmode="group", yaxis_title="EM rate", height=450)
    ft_rows = [r for r in rows if r["variant"] != "base"]
    ft_names = [f"{r['domain']}/{r['variant']}" for r in ft_rows]
    cos = make_subplots(rows=1, cols=2, subplot_titles=(f"at persona best layer {result['persona']['best_layer']}",
                                                        "per layer"))
    cos.add_trace(go.Bar(x=ft_names, y=[r["cos_persona"] for r in ft_rows], name="cos(model diff, persona)"), 1, 1)
    cos.add_trace(go.Bar(x=ft_names, y=[r["cos_random_control"] for r in ft_rows], name="random control"), 1, 1)
    for label, per in result["cos_per_layer"].items():
        cos.add_trace(go.Scatter(x=list(per), y=list(per.values()), mode="lines+markers", name=label), 1, 2)
    cos.update_layout(title=f"Model-diff direction vs persona direction ({result['persona']['trait']})", height=450)
    cap = make_subplots(rows=1, cols=2, subplot_titles=("perplexity Δ (neutral text)", "MC accuracy Δ"))
    for col, (k, kci) in enumerate((("ppl_delta", "ppl_delta_ci95"),
                                    ("mc_accuracy_delta", "mc_accuracy_delta_ci95")), 1):
        ds = [r["capability"]["delta"] for r in ft_rows]
        cap.add_trace(go.Bar(x=ft_names, y=[d[k] for d in ds],
                             showlegend=False, error_y={"type": "data", "symmetric": False,
                                                        "array": [d[kci][1] - d[k] for d in ds],
                                                        "arrayminus": [d[k] - d[kci][0] for d in ds]}), 1, col)
    cap.update_layout(title="Capability: fine-tuned minus base (paired bootstrap 95% CI)", height=420)
    return {"em_rates": em, "cosine": cos, "capability": cap, "loss": loss_figure(curves)}


def write_experiment(result: dict[str, Any], out: Path, curves: dict[str, Any]) -> None:
    """Figure HTMLs, table.json, loss_curves.json, table.html (table + figures + notes) and manifest.json."""
    figs = experiment_figures(result, curves)
    for name, fig in figs.items():
        write_figure(fig, out / f"{name}.html")
    atomic_write_json(out / "table.json", {"rows": result["rows"], "compact": [compact_row(r) for r in result["rows"]],
                                           "persona": result["persona"], "cos_per_layer": result["cos_per_layer"]})
    atomic_write_json(out / "loss_curves.json", curves)
    notes = f"{json.dumps(result['manifest'], indent=1, default=str)}\n\n{result['budget_note']}"
    sections = [("Table", table_html(result["rows"]))] + [(n, fig_div(f)) for n, f in figs.items()]
    sections.append(("Notes", f"<pre>{html.escape(notes, quote=False)}</pre>"))
    write_page(out / "table.html", "Model organisms: character vs incorrect vs aligned", sections)
    write_manifest(out, result["manifest"])
