"""Plotly figures of one analysed sweep: inputs are the run table and `analyze`'s results.

Every point's hover shows its run id and the swept config values, so a point on a plot can
be looked up in the MLflow UI.

Selection on validation, report on test: the perplexity axes are the best validation
perplexity the analysis chooses on (labelled "(selection)"); test perplexity is in the hover.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from duosparse import schema
from duosparse.analysis import pareto
from duosparse.analysis.fits import fit_keys
from duosparse.analysis.runs import (
    ARCH,
    BEST_VAL_PPL,
    RUN_ID,
    RUN_IDS,
    aggregate_seeds,
    usable_rows,
    varying_config,
)
from plotly.subplots import make_subplots

ARCH_COLORS = {"lstm": "#1f77b4", "gru": "#ff7f0e", "egru": "#2ca02c"}
_OTHER_COLORS = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
PARETO_NAMES = {
    schema.OPS_EFFECTIVE: "pareto_effective_macs",
    schema.OPS_WEIGHT_SPARSE: "pareto_weight_sparse_macs",
    schema.OPS_TOTAL_EFFECTIVE: "pareto_total_macs",
    schema.spinnaker2("energy_per_token_j"): "pareto_spinnaker2_energy",
}
LAYOUT = dict(template="plotly_white", width=900, height=560, hovermode="closest")
# Which split a perplexity is, wherever one is shown: the selection figure and the report.
VAL_LABEL = "validation perplexity (selection)"
LABELS = {BEST_VAL_PPL: "val ppl (selection)", schema.TEST_PPL: "test ppl"}


def color(arch: str, archs: list[str]) -> str:
    if arch in ARCH_COLORS:
        return ARCH_COLORS[arch]
    others = [a for a in archs if a not in ARCH_COLORS]
    return _OTHER_COLORS[others.index(arch) % len(_OTHER_COLORS)] if arch in others else "#333"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return "-" if value is None or value is pd.NA else str(value)


def hover(rows: pd.DataFrame, axes: list[str], extra: list[str] = ()) -> list[str]:
    """'run <id>' + the swept config values + the plotted figures, one string per row."""
    lines = []
    for _, row in rows.iterrows():
        ids = row.get(RUN_IDS)
        seeds = (
            f" ({len(str(ids).split(','))} seeds)" if isinstance(ids, str) and "," in ids else ""
        )
        parts = [f"run {row[RUN_ID]}{seeds}"]
        parts += [f"{c} = {_fmt(row[c])}" for c in axes if c in row]
        parts += [f"{LABELS.get(c, c)} = {_fmt(row[c])}" for c in extra if c in row]
        lines.append("<br>".join(parts))
    return lines


def _archs(table: pd.DataFrame) -> list[str]:
    return sorted(str(a) for a in table[ARCH].dropna().unique()) if ARCH in table else []


def _axes(table: pd.DataFrame) -> list[str]:
    return [c for c in varying_config(usable_rows(table)) if c != "train.seed"]


# --- Pareto fronts ------------------------------------------------------------------------------


def pareto_figure(
    configs: pd.DataFrame, cost: str, results: dict[str, Any] | None = None
) -> go.Figure:
    """Validation perplexity (the selection figure) against one cost axis: every
    configuration, the front of each architecture as a staircase, hypervolume in the legend;
    the hover adds each point's test perplexity."""
    rows = pareto.usable(configs, cost)
    axes, archs = _axes(configs), _archs(rows)
    hv = ((results or {}).get("hypervolume", {}).get(cost) or {}).get("groups", {})
    fig = go.Figure()
    for arch in archs:
        group = rows[rows[ARCH] == arch].sort_values(cost)
        front = pareto.pareto_front(group, cost)
        c = color(arch, archs)
        extra = [cost, pareto.OBJECTIVE, pareto.REPORTED]
        fig.add_trace(
            go.Scatter(
                x=group[cost],
                y=group[pareto.OBJECTIVE],
                mode="markers",
                name=f"{arch} runs",
                legendgroup=arch,
                marker=dict(color=c, size=8, opacity=0.35),
                text=hover(group, axes, extra),
                hovertemplate="%{text}<extra></extra>",
            )
        )
        label = f"{arch} front" + (
            f" (HV {hv[arch]['hypervolume_normalized']:.3f})" if arch in hv else ""
        )
        fig.add_trace(
            go.Scatter(
                x=front[cost],
                y=front[pareto.OBJECTIVE],
                mode="lines+markers",
                name=label,
                legendgroup=arch,
                line=dict(color=c, shape="hv", width=2),
                marker=dict(color=c, size=11, line=dict(color="black", width=1)),
                text=hover(front, axes, extra),
                hovertemplate="%{text}<extra></extra>",
            )
        )
    cost_label = pareto.COST_AXES.get(cost, cost)
    fig.update_layout(title=f"{VAL_LABEL.capitalize()} vs {cost_label}", **LAYOUT)
    fig.update_xaxes(type="log", title=cost_label)
    fig.update_yaxes(title=VAL_LABEL)
    return fig


# --- trade-off fits -----------------------------------------------------------------------------


def tradeoff_figure(table: pd.DataFrame, results: dict[str, Any]) -> go.Figure:
    """Validation perplexity against compute reduction: runs, the curves fitted to it and
    their confidence bands; the hover adds each run's test perplexity."""
    rows = usable_rows(table)
    x, y = schema.OPS_COMPUTE_REDUCTION, BEST_VAL_PPL
    axes, archs = _axes(table), _archs(rows)
    keys = fit_keys(rows)
    fig = go.Figure()
    for fit in results.get("fits", []):
        arch = str(fit.get(ARCH, ""))
        c = color(arch, archs)
        mask = np.ones(len(rows), dtype=bool)
        for k in keys:
            mask &= (rows[k] == fit.get(k)).to_numpy(dtype=bool)
        group = rows[mask]
        name = ", ".join(f"{_fmt(fit.get(k))}" for k in keys) or "all"
        fig.add_trace(
            go.Scatter(
                x=group[x],
                y=group[y],
                mode="markers",
                name=f"{name} runs",
                legendgroup=name,
                marker=dict(color=c, size=8),
                text=hover(group, axes, [x, y, schema.TEST_PPL]),
                hovertemplate="%{text}<extra></extra>",
            )
        )
        curve = fit.get("curve")
        if not curve:
            continue
        p = fit["params"]
        fig.add_trace(
            go.Scatter(
                x=curve["reduction"] + curve["reduction"][::-1],
                y=curve["ppl_high"] + curve["ppl_low"][::-1],
                fill="toself",
                fillcolor=c,
                opacity=0.15,
                line=dict(width=0),
                hoverinfo="skip",
                legendgroup=name,
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=curve["reduction"],
                y=curve["ppl"],
                mode="lines",
                legendgroup=name,
                name=f"{name}: {p['ppl0']:.3g}(1 + {p['a']:.2g} R^{p['b']:.2g}), "
                f"R2 {fit['r2']:.2f}",
                line=dict(color=c, width=2),
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title="Validation perplexity vs compute reduction, fit ppl0 (1 + a R^b) with "
        f"{results.get('confidence', 0.95):.0%} band",
        **LAYOUT,
    )
    fig.update_xaxes(type="log", title="compute reduction R = dense / effective MACs")
    fig.update_yaxes(title=VAL_LABEL)
    return fig


# --- heatmaps -----------------------------------------------------------------------------------


def heatmap_figure(
    configs: pd.DataFrame, metric: str, title: str, companion: str | None = None
) -> go.Figure:
    """`metric` over prune ratio x threshold, one panel per architecture (and size); the
    hover adds `companion` (the test perplexity beside the validation one)."""
    rows = usable_rows(configs)
    px_, py_ = "model.threshold", "prune.target_sparsity"
    keys = fit_keys(rows)
    groups = list(rows.groupby(keys, sort=True)) if keys else [((), rows)]
    cols = min(len(groups), 3) or 1
    nrows = max(math.ceil(len(groups) / cols), 1)
    names = [", ".join(_fmt(v) for v in (k if isinstance(k, tuple) else (k,))) for k, _ in groups]
    fig = make_subplots(
        rows=nrows,
        cols=cols,
        subplot_titles=names or [""],
        horizontal_spacing=0.08,
        vertical_spacing=0.15,
    )
    values = rows[metric].to_numpy(dtype=float) if metric in rows else np.array([])
    finite = values[np.isfinite(values)]
    zmin, zmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    template = f"run %{{customdata[0]}}<br>{px_} = %{{x}}<br>{py_} = %{{y}}<br>"
    template += f"{LABELS.get(metric, metric)} = %{{z:.4g}}"
    if companion:
        template += f"<br>{LABELS.get(companion, companion)} = %{{customdata[1]}}"
    template += "<extra></extra>"
    for i, (_, group) in enumerate(groups):
        grid = group.pivot_table(index=py_, columns=px_, values=metric, aggfunc="mean")
        ids = group.pivot_table(index=py_, columns=px_, values=RUN_ID, aggfunc="first")
        text = [[_fmt(v) for v in r] for r in grid.to_numpy()]
        custom = _heatmap_custom(group, grid, ids, companion)
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[f"{v:g}" for v in grid.columns],
                y=[f"{v:g}" for v in grid.index],
                text=text,
                texttemplate="%{text}",
                customdata=custom,
                zmin=zmin,
                zmax=zmax,
                coloraxis="coloraxis",
                hovertemplate=template,
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_xaxes(title=px_, type="category")
    fig.update_yaxes(title=py_, type="category")
    fig.update_layout(
        title=title,
        coloraxis=dict(colorscale="Viridis", colorbar=dict(title=LABELS.get(metric, metric))),
        **{**LAYOUT, "height": 360 * nrows + 120},
    )
    return fig


def _heatmap_custom(
    group: pd.DataFrame, grid: pd.DataFrame, ids: pd.DataFrame, companion: str | None
) -> np.ndarray:
    """Per cell [run id, companion value as text], for the heatmap's hover."""
    run_ids = ids.reindex_like(grid).to_numpy().astype(str)
    if companion is None or companion not in group:
        values = np.full(grid.shape, "-", dtype=object)
    else:
        pivot = group.pivot_table(
            index=grid.index.name, columns=grid.columns.name, values=companion, aggfunc="mean"
        )
        values = np.vectorize(_fmt, otypes=[object])(pivot.reindex_like(grid).to_numpy())
    return np.stack([run_ids.astype(object), values], axis=-1)


# --- multiplicativity ---------------------------------------------------------------------------


def activity_weight_figure(table: pd.DataFrame, results: dict[str, Any]) -> go.Figure:
    """Activity sparsity against weight sparsity, with the fitted common-slope lines."""
    rows = usable_rows(table)
    x, y = schema.SPARSITY_WEIGHT, schema.SPARSITY_ACTIVITY
    axes, archs = _axes(table), _archs(rows)
    fits = {f[ARCH]: f for f in results.get("multiplicativity", {}).get("activity_vs_weight", [])}
    fig = go.Figure()
    for arch in archs:
        group, c = rows[rows[ARCH] == arch], color(arch, archs)
        fit = fits.get(arch, {})
        label = arch
        if "ci" in fit:
            label += f": slope {fit['slope']:.3g} [{fit['ci'][0]:.3g}, {fit['ci'][1]:.3g}]"
        fig.add_trace(
            go.Scatter(
                x=group[x],
                y=group[y],
                mode="markers",
                name=label,
                legendgroup=arch,
                marker=dict(color=c, size=8),
                text=hover(group, axes, [x, y]),
                hovertemplate="%{text}<extra></extra>",
            )
        )
        lo, hi = fit.get("weight_sparsity_range", [0.0, 0.0])
        for name, intercept in (fit.get("intercepts") or {}).items():
            fig.add_trace(
                go.Scatter(
                    x=[lo, hi],
                    y=[intercept + fit["slope"] * lo, intercept + fit["slope"] * hi],
                    mode="lines",
                    line=dict(color=c, dash="dash"),
                    legendgroup=arch,
                    showlegend=False,
                    hovertemplate=f"{arch} ({name}): slope {fit['slope']:.3g}<extra></extra>",
                )
            )
    fig.update_layout(
        title="Activity vs weight sparsity (a flat line: the sparsities multiply)", **LAYOUT
    )
    fig.update_xaxes(title="weight sparsity")
    fig.update_yaxes(title="activity sparsity")
    return fig


def macs_figure(table: pd.DataFrame) -> go.Figure:
    """Exact effective MACs against the multiplicative estimate dense (1 - s_w)(1 - s_a)."""
    rows = usable_rows(table)
    x, y = schema.OPS_MULTIPLICATIVE, schema.OPS_EFFECTIVE
    axes, archs = _axes(table), _archs(rows)
    fig = go.Figure()
    for arch in archs:
        group = rows[rows[ARCH] == arch]
        fig.add_trace(
            go.Scatter(
                x=group[x],
                y=group[y],
                mode="markers",
                name=arch,
                marker=dict(color=color(arch, archs), size=8),
                text=hover(group, axes, [x, y]),
                hovertemplate="%{text}<extra></extra>",
            )
        )
    both = rows[[x, y]].to_numpy(dtype=float) if len(rows) else np.ones((1, 2))
    both = both[np.isfinite(both) & (both > 0)] if both.size else np.ones(1)
    lo, hi = (float(both.min()), float(both.max())) if both.size else (1.0, 10.0)
    fig.add_trace(
        go.Scatter(
            x=[lo, hi],
            y=[lo, hi],
            mode="lines",
            name="exact = estimate",
            line=dict(color="gray", dash="dot"),
            hoverinfo="skip",
        )
    )
    fig.update_layout(title="Exact effective MACs vs the multiplicative estimate", **LAYOUT)
    fig.update_xaxes(type="log", title="multiplicative estimate dense (1 - s_w)(1 - s_a) / token")
    fig.update_yaxes(type="log", title="exact effective MACs / token")
    return fig


def layer_activity_figure(configs: pd.DataFrame) -> go.Figure:
    """Activity sparsity of each recurrent layer, one line per configuration."""
    rows = usable_rows(configs)
    layers = sorted(
        (c for c in rows if c.startswith(schema.layer_activity(0)[:-1]) and ":" not in c),
        key=lambda c: int(c.rsplit("_", 1)[1]),
    )
    axes, archs = _axes(configs), _archs(rows)
    fig = go.Figure()
    shown: set[str] = set()
    for (_, row), text in zip(rows.iterrows(), hover(rows, axes)):
        arch = str(row[ARCH])
        values = [row[c] for c in layers]
        fig.add_trace(
            go.Scatter(
                x=list(range(len(layers))),
                y=values,
                mode="lines+markers",
                name=arch,
                legendgroup=arch,
                showlegend=arch not in shown,
                line=dict(color=color(arch, archs), width=1),
                text=[text] * len(layers),
                hovertemplate="%{text}<br>layer %{x}: %{y:.3f}<extra></extra>",
            )
        )
        shown.add(arch)
    fig.update_layout(title="Per-layer activity sparsity (test split)", **LAYOUT)
    fig.update_xaxes(title="recurrent layer", dtick=1)
    fig.update_yaxes(title="activity sparsity", range=[0, 1])
    return fig


# --- all of them ----------------------------------------------------------------------------------


def build_figures(
    table: pd.DataFrame, results: dict[str, Any], configs: pd.DataFrame | None = None
) -> dict[str, go.Figure]:
    """name -> figure, in report order: Pareto fronts, trade-off, heatmaps, multiplicativity."""
    configs = aggregate_seeds(table) if configs is None else configs
    figs = {
        PARETO_NAMES.get(c, c): pareto_figure(configs, c, results)
        for c in pareto.cost_axes(configs)
    }
    figs["tradeoff_fit"] = tradeoff_figure(table, results)
    figs["heatmap_ppl"] = heatmap_figure(
        configs,
        BEST_VAL_PPL,
        f"{VAL_LABEL.capitalize()} over prune ratio x threshold (test perplexity in the hover)",
        companion=schema.TEST_PPL,
    )
    figs["heatmap_reduction"] = heatmap_figure(
        configs,
        schema.OPS_COMPUTE_REDUCTION,
        "Compute reduction (dense / effective MACs) over prune ratio x threshold",
    )
    figs["activity_vs_weight"] = activity_weight_figure(table, results)
    figs["effective_vs_estimate"] = macs_figure(table)
    figs["layer_activity"] = layer_activity_figure(configs)
    if results.get("search", {}).get("by_trial"):
        figs["search_progress"] = search_progress_figure(results["search"])
    return figs


# --- searches ---------------------------------------------------------------------------------


def search_progress_figure(progress: dict[str, Any], title: str = "") -> go.Figure:
    """Normalised hypervolume of the running front against the trials spent, one line per sweep
    (`progress` is results['search'] or results['comparison']['sweeps'])."""
    fig = go.Figure()
    sweeps = progress.get("sweeps") or {"search": progress}
    for i, (name, entry) in enumerate(sweeps.items()):
        rows = entry.get("by_trial", [])
        fig.add_trace(
            go.Scatter(
                x=[r["trial"] for r in rows],
                y=[r["hypervolume_normalized"] for r in rows],
                mode="lines+markers",
                name=name,
                line={"shape": "hv", "color": _OTHER_COLORS[i % len(_OTHER_COLORS)]},
                hovertemplate="trial %{x}<br>hypervolume %{y:.3f}<extra>" + name + "</extra>",
            )
        )
    fig.update_layout(
        **LAYOUT,
        title=title or "Front found against trials spent (validation perplexity x effective MACs)",
        xaxis_title="trials spent (in start order)",
        yaxis_title="hypervolume (normalised)",
    )
    return fig


def compare_fronts_figure(tables: dict[str, pd.DataFrame], comparison: dict[str, Any]) -> go.Figure:
    """Every usable run of each sweep and each sweep's front, on the same axes."""
    cost, objective = comparison["cost"], comparison["objective"]
    fig = go.Figure()
    for i, (name, table) in enumerate(tables.items()):
        color = _OTHER_COLORS[i % len(_OTHER_COLORS)]
        rows = pareto.usable(table, cost, objective)
        fig.add_trace(
            go.Scatter(
                x=rows[cost],
                y=rows[objective],
                mode="markers",
                name=f"{name} runs",
                marker={"color": color, "opacity": 0.45, "symbol": "circle" if i == 0 else "x"},
            )
        )
        front = comparison["sweeps"].get(name, {}).get("front", [])
        hv = comparison["sweeps"].get(name, {}).get("hypervolume_normalized", math.nan)
        fig.add_trace(
            go.Scatter(
                x=[p[cost] for p in front],
                y=[p[objective] for p in front],
                mode="lines+markers",
                line={"shape": "hv", "color": color},
                name=f"{name} front (hypervolume {hv:.3f}, {len(table)} trials)",
            )
        )
    fig.update_layout(
        **LAYOUT,
        title="Fronts of the compared sweeps (one reference point)",
        xaxis={"type": "log", "title": pareto.COST_AXES.get(cost, cost)},
        yaxis_title=VAL_LABEL,
    )
    return fig
