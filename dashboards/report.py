"""One self-contained HTML sweep report: every figure and table of `analyze`'s results.

plotly.js is inlined once in the page head (no network needed to open it, e.g. from the MLflow
UI's artifact view); the results themselves are embedded as JSON too, so the numbers behind
every plot travel with the report.

Selection on validation, report on test: every table names the split of each perplexity;
the choices (fronts, baselines, budgets, fits) are on validation, test is shown beside it.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from duosparse import schema
from duosparse.analysis import pareto
from duosparse.analysis.fits import PARAMS
from duosparse.analysis.runs import (
    ARCH,
    BEST_VAL_PPL,
    OK,
    RUN_ID,
    STATUS,
    aggregate_seeds,
    varying_config,
)
from plotly.offline import get_plotlyjs

from .figures import PARETO_NAMES, build_figures

OWN_BASELINE = "each architecture unpruned, lowest threshold"
VAL_PPL = "val ppl (selection)"
TEST_PPL = "test ppl"
SELECTION_NOTE = (
    "Selection on validation, report on test: every front, baseline, budget and fit is "
    "decided on the best validation perplexity of each run (epochs at the final sparsity, "
    "the weights the run tested); test perplexity is shown beside it and chooses nothing, "
    "so it is an unbiased estimate of the chosen configurations."
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; max-width: 900px; }
.scroll { overflow-x: auto; max-height: 500px; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value is pd.NA:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "-"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p class='note'>(none)</p>"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _figure(fig: go.Figure, name: str) -> str:
    return pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs=False,
        div_id=f"fig-{name}",
        config={"displaylogo": False, "toImageButtonOptions": {"filename": name}},
    )


def _section(title: str, note: str, *parts: str) -> str:
    return f"<h2>{html.escape(title)}</h2><p class='note'>{note}</p>" + "".join(parts)


def _ci(value: float | None, ci: list[float] | None) -> str:
    if ci is None:
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _hypervolume_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for cost, entry in results.get("hypervolume", {}).items():
        for arch, hv in entry.get("groups", {}).items():
            row = rows.setdefault(arch, {ARCH: arch})
            row[f"{PARETO_NAMES.get(cost, cost)} (normalised)"] = hv["hypervolume_normalized"]
            row[f"{PARETO_NAMES.get(cost, cost)} front size"] = hv["front_size"]
    return list(rows.values())


def _fit_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for fit in results.get("fits", []):
        row = {k: v for k, v in fit.items() if k in (ARCH, *_size_keys(fit))}
        row["runs"] = fit.get("n")
        if "skipped" in fit:
            row["note"] = fit["skipped"]
        else:
            for p in PARAMS:
                row[p] = _ci(fit["params"][p], fit["ci"][p])
            row.update(
                {
                    "R2 (log val ppl)": fit["r2"],
                    "RMSE (log val ppl)": fit["rmse"],
                    "AIC": fit["aic"],
                    "AIC power law": fit["aic_powerlaw"],
                    "test / val ppl": fit.get("test_ratio"),
                    "RMSE (log test ppl)": fit.get("test_rmse"),
                }
            )
        out.append(row)
    return out


def _size_keys(fit: dict[str, Any]) -> list[str]:
    return [k for k in fit if k.startswith(("model.", "data.")) and k != ARCH]


def _mult_rows(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    m = results.get("multiplicativity", {})
    slopes = [
        {
            ARCH: e[ARCH],
            "runs": e["n"],
            "slope": _ci(e.get("slope"), e.get("ci")),
            "p": e.get("p_value"),
            "change over range": e.get("change_over_range"),
            "verdict": e.get("verdict") or e.get("skipped"),
        }
        for e in m.get("activity_vs_weight", [])
    ]
    ratios = [
        {
            ARCH: e[ARCH],
            "runs": e["n"],
            "exact / estimate": _ci(e["ratio"], e.get("ratio_ci")),
            "min": e["ratio_min"],
            "max": e["ratio_max"],
            f"within +-{e['tolerance']:.0%}": e["within_tolerance"],
        }
        for e in m.get("macs_vs_estimate", [])
    ]
    return slopes, ratios


def _iso_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for e in results.get("iso_perplexity", []):
        row = {
            ARCH: e[ARCH],
            "budget": e["budget"],
            "compute reduction": e.get("reduction"),
            VAL_PPL: e.get("val_ppl"),
            TEST_PPL: e.get("test_ppl"),
            "val ppl limit": e.get("val_ppl_limit"),
            f"baseline {VAL_PPL}": e.get("baseline_val_ppl"),
            f"baseline {TEST_PPL}": e.get("baseline_test_ppl"),
            "effective MACs": e.get("effective_macs"),
            "run": e.get("run_id") or e.get("note"),
        }
        row.update(e.get("config") or {})
        out.append(row)
    return out


def _baseline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The dense baselines, with the split of each perplexity in its header."""
    names = {BEST_VAL_PPL: VAL_PPL, schema.TEST_PPL: TEST_PPL}
    return [{names.get(k, k): v for k, v in row.items()} for row in results.get("baselines", [])]


def _run_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    axes = [c for c in varying_config(table) if c in table]
    metrics = [
        BEST_VAL_PPL,
        schema.TEST_PPL,
        schema.SPARSITY_WEIGHT,
        schema.SPARSITY_ACTIVITY,
        schema.OPS_EFFECTIVE,
        schema.OPS_COMPUTE_REDUCTION,
        schema.spinnaker2("energy_per_token_j"),
    ]
    cols = [RUN_ID, STATUS, OK, *axes, *(m for m in metrics if m in table)]
    return [
        {c: (None if pd.isna(v) else v) for c, v in zip(cols, row)}
        for row in table[cols].itertuples(index=False)
    ]


def render_report(
    table: pd.DataFrame,
    results: dict[str, Any],
    figures: dict[str, go.Figure] | None = None,
    source: str = "",
) -> str:
    """The report's HTML (one string, nothing loaded from the network)."""
    configs = aggregate_seeds(table)
    figures = figures if figures is not None else build_figures(table, results, configs)
    fig = {name: _figure(f, name) for name, f in figures.items()}
    sweep = results.get("sweep") or "sweep"
    counts = ", ".join(f"{k}: {v}" for k, v in results.get("counts", {}).items())
    slopes, ratios = _mult_rows(results)
    pareto_figs = [
        fig[PARETO_NAMES.get(c, c)] for c in pareto.COST_AXES if PARETO_NAMES.get(c, c) in fig
    ]
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>Sweep {html.escape(sweep)}</h1>",
        f"<p class='note'>{html.escape(counts)}. Architectures: "
        f"{html.escape(', '.join(results.get('architectures', [])))}. Swept: "
        f"{html.escape(', '.join(results.get('axes', [])))}. Generated {when}"
        f"{' from ' + html.escape(source) if source else ''}. Means over seeds with "
        f"{results.get('confidence', 0.95):.0%} intervals; see docs/analysis.md.</p>",
        f"<p class='note'><b>{html.escape(SELECTION_NOTE)}</b></p>",
        _section(
            "Pareto fronts",
            "Validation perplexity (selection) against cost per token, one staircase per "
            "architecture (lower left is better); each point's test perplexity is in its "
            "hover and in results.json. Hypervolume: the area each front dominates "
            "in (log10 cost, validation perplexity) up to a shared reference point, divided "
            "by the box from the ideal point to the reference (higher is better).",
            _table(_hypervolume_rows(results)),
            *pareto_figs,
        ),
        _section(
            "Iso-perplexity",
            "The largest compute reduction (dense / effective MACs, "
            "recurrent layers) of any configuration whose validation perplexity is within "
            "each budget; relative budgets are over the validation perplexity of the dense "
            "baseline of the same size "
            f"({html.escape(results.get('reference_arch') or OWN_BASELINE)}). The test "
            "perplexity of the chosen configuration and of its baseline is reported beside.",
            _table(_iso_rows(results)),
            "<h3>Dense baselines</h3>",
            _table(_baseline_rows(results)),
        ),
        _section(
            "Trade-off fits",
            "ppl(R) = ppl0 (1 + a R^b) per architecture (and size), fitted "
            "on log validation perplexity; parameters with bootstrap intervals; AIC against "
            "the two-parameter power law log ppl = c + k log R (lower is better). Test "
            "perplexity is not fitted: 'test / val ppl' is the runs' geometric-mean split gap "
            "and 'RMSE (log test ppl)' the curve's error on their test perplexity.",
            _table(_fit_rows(results)),
            fig.get("tradeoff_fit", ""),
        ),
        _section(
            "Prune ratio x threshold",
            "Seed-mean validation perplexity (selection; test perplexity in the hover) and "
            "compute reduction of each configuration.",
            fig.get("heatmap_ppl", ""),
            fig.get("heatmap_reduction", ""),
        ),
        _section(
            "Do the sparsities multiply?",
            "Slope of activity sparsity on weight sparsity "
            "(common slope, one intercept per threshold and size): an interval holding 0 is a "
            "flat line, so effective MACs ~ dense (1 - s_w)(1 - s_a). Then the exact "
            "event-driven count against that estimate.",
            _table(slopes),
            fig.get("activity_vs_weight", ""),
            _table(ratios),
            fig.get("effective_vs_estimate", ""),
        ),
        _section(
            "Per-layer activity",
            "Activity sparsity of each recurrent layer on the test split.",
            fig.get("layer_activity", ""),
        ),
        _section(
            "Runs not analysed",
            "FAILED, KILLED, unfinished and early-stopped (ASHA) runs.",
            _table(results.get("not_ok", [])),
        ),
        _section(
            "Runs",
            "Every run of the sweep (the full table: runs.parquet / runs.csv).",
            _table(_run_rows(table)),
        ),
        "<script type='application/json' id='duosparse-results'>"
        + json.dumps(results).replace("</", "<\\/")
        + "</script>",
    ]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>duosparse sweep {html.escape(sweep)}</title><style>{STYLE}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )


def write_report(
    path: str | Path,
    table: pd.DataFrame,
    results: dict[str, Any],
    figures: dict[str, go.Figure] | None = None,
    source: str = "",
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(table, results, figures, source), encoding="utf-8")
    return path
