"""One self-contained HTML sweep report: every figure and table of `analyze`'s results.

plotly.js is inlined once in the page head (no network needed to open it, e.g. from the MLflow
UI's artifact view); the results themselves are embedded as JSON too, so the numbers behind
every plot travel with the report.

Selection on validation, report on test: every table names the split of each perplexity;
the choices (fronts, baselines, budgets, fits) are on validation, test is shown beside it.

The page's markup is the Jinja2 template templates/report.html.j2; this module prepares what
it shows (table cells as text, figures as HTML divs) and renders it with autoescaping on.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
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
from markupsafe import Markup
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


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value is pd.NA:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "-"
    return str(value)


class Cells(NamedTuple):
    """A table as the template shows it: column names and rows of formatted text."""

    columns: list[str]
    rows: list[list[str]]


def _cells(rows: list[dict[str, Any]], columns: list[str] | None = None) -> Cells:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    return Cells(columns, [[_fmt(r.get(c)) for c in columns] for r in rows])


def _figure(fig: go.Figure, name: str) -> Markup:
    # plotly's own markup (a div and its script), inserted into the page as it is
    return Markup(
        pio.to_html(
            fig,
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig-{name}",
            config={"displaylogo": False, "toImageButtonOptions": {"filename": name}},
        )
    )


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
        schema.SPARSITY_SILENT_UNITS,
        schema.OPS_EFFECTIVE,
        schema.OPS_COMPUTE_REDUCTION,
        schema.spinnaker2("energy_per_token_j"),
    ]
    cols = [RUN_ID, STATUS, OK, *axes, *(m for m in metrics if m in table)]
    return [
        {c: (None if pd.isna(v) else v) for c, v in zip(cols, row)}
        for row in table[cols].itertuples(index=False)
    ]


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("duosparse.dashboards", "templates"),
        autoescape=True,  # every value is text unless it arrives as Markup
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails instead of showing nothing
    )
    return env.get_template("report.html.j2")


def _summary(results: dict[str, Any], source: str) -> dict[str, str]:
    """The page's title line and the sentence under it."""
    return {
        "sweep": results.get("sweep") or "sweep",
        "counts": ", ".join(f"{k}: {v}" for k, v in results.get("counts", {}).items()),
        "architectures": ", ".join(results.get("architectures", [])),
        "axes": ", ".join(results.get("axes", [])),
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": source,
        "confidence": f"{results.get('confidence', 0.95):.0%}",
        "selection_note": SELECTION_NOTE,
        "reference_arch": results.get("reference_arch") or OWN_BASELINE,
    }


def _tables(table: pd.DataFrame, results: dict[str, Any]) -> dict[str, Cells]:
    slopes, ratios = _mult_rows(results)
    return {
        "hypervolume": _cells(_hypervolume_rows(results)),
        "iso_perplexity": _cells(_iso_rows(results)),
        "baselines": _cells(_baseline_rows(results)),
        "fits": _cells(_fit_rows(results)),
        "slopes": _cells(slopes),
        "ratios": _cells(ratios),
        "not_ok": _cells(results.get("not_ok", [])),
        "runs": _cells(_run_rows(table)),
    }


def _results_json(results: dict[str, Any]) -> Markup:
    # Inside <script> only "</" could end the element early; JSON reads "<\/" as "</".
    return Markup(json.dumps(results).replace("</", "<\\/"))


def render_report(
    table: pd.DataFrame,
    results: dict[str, Any],
    figures: dict[str, go.Figure] | None = None,
    source: str = "",
) -> str:
    """The report's HTML (one string, nothing loaded from the network)."""
    if figures is None:
        figures = build_figures(table, results, aggregate_seeds(table))
    divs = {name: _figure(f, name) for name, f in figures.items()}
    pareto_names = [PARETO_NAMES.get(c, c) for c in pareto.COST_AXES]
    return _template().render(
        **_summary(results, source),
        tables=_tables(table, results),
        figures=divs,
        pareto_figures=[divs[name] for name in pareto_names if name in divs],
        plotly_js=Markup(get_plotlyjs()),
        results_json=_results_json(results),
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
