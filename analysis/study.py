"""`analyze(table)`: every analysis of one sweep, as one JSON-ready dict.

Used by `duosparse analyze` and `duosparse export pareto`, and by the HTML report. The input
is a run table (`runs.runs_table` from MLflow, or `runs.read_table` from a file), so the same
analysis runs with or without a tracking server.

Selection on validation, report on test: fronts, hypervolumes, fits, baselines and budgets
use the best validation perplexity (`runs.BEST_VAL_PPL`); every chosen configuration carries
its test perplexity beside it (`SELECTION` in the results says so).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from duosparse import schema
from duosparse.terminal import jsonable

from . import fits, pareto
from .runs import (
    ARCH,
    BEST_VAL_PPL,
    EARLY_STOPPED,
    FAILURE,
    OK,
    RUN_ID,
    RUN_IDS,
    RUN_NAME,
    SEARCH,
    STATUS,
    aggregate_seeds,
    ok_mask,
    usable_rows,
    varying_config,
)

# Recorded in the results, so a reader of results.json knows which figure chose and which
# is only reported.
SELECTION = {
    "selected_on": BEST_VAL_PPL,
    "reported": schema.TEST_PPL,
    "rule": "fronts, hypervolumes, fits, baselines and budgets use the best validation "
    "perplexity (epochs at the final sparsity); test perplexity is reported beside it",
}


def analyze(
    table: pd.DataFrame,
    budgets: list[fits.Budget] | tuple[fits.Budget, ...] = fits.DEFAULT_BUDGETS,
    reference_arch: str | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Seed aggregation, Pareto fronts and hypervolumes, trade-off fits, multiplicativity and
    the iso-perplexity table of one run table. Raises ValueError without a usable run."""
    ok = usable_rows(table)
    if not len(ok):
        raise ValueError(
            f"none of the {len(table)} runs is usable (FINISHED, not stopped early, with a test "
            "perplexity below the divergence cap and every metric of a finished run, compute "
            "counts included), so there is nothing to analyse; check `duosparse sweep status` "
            "for failures."
        )
    _require_selection(ok)
    configs = aggregate_seeds(table, confidence=confidence)
    axes = [c for c in varying_config(ok) if c != "train.seed"]
    results: dict[str, Any] = {
        "sweep": table.attrs.get("sweep"),
        "counts": _counts(table),
        "axes": axes,
        "architectures": sorted(str(a) for a in ok[ARCH].dropna().unique()) if ARCH in ok else [],
        "confidence": confidence,
        "selection": SELECTION,
        "not_ok": _not_ok(table, axes),
    }
    results.update(pareto_summary(configs, axes))
    results["fits"] = fits.fit_groups(table, n_boot=n_boot, confidence=confidence, seed=seed)
    results["multiplicativity"] = {
        "activity_vs_weight": fits.activity_vs_weight(table, confidence),
        "macs_vs_estimate": fits.macs_vs_estimate(table, confidence),
    }
    results["baselines"] = _records(fits.baselines(configs, reference_arch))
    results["reference_arch"] = reference_arch
    results["iso_perplexity"] = fits.iso_perplexity(configs, budgets, reference_arch)
    results["layer_activity"] = layer_activity(configs)
    if SEARCH in table and table[SEARCH].notna().any():
        results["search"] = search_progress(table)
    return jsonable(results)


def search_progress(table: pd.DataFrame) -> dict[str, Any]:
    """A search's front against the trials it spent: the hypervolume (validation perplexity x
    log effective MACs, this table's reference point) after each trial, in start order."""
    trials = table[table[SEARCH].notna()]
    by_trial = pareto.hypervolume_by_trial(trials)
    return {
        "searcher": sorted(str(s) for s in trials[SEARCH].dropna().unique()),
        "cost": pareto.SEARCH_COST,
        "objective": pareto.OBJECTIVE,
        "reference": list(pareto.reference_point(usable_rows(trials), pareto.SEARCH_COST))
        if by_trial
        else None,
        "by_trial": by_trial,
    }


def compare_sweeps(tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Two or more sweeps over the same space (a grid and a search) on one reference point."""
    return jsonable(pareto.compare_sweeps(tables))


def pareto_summary(configs: pd.DataFrame, axes: list[str] | None = None) -> dict[str, Any]:
    """The front rows and the hypervolumes of every cost axis the table has."""
    axes = axes if axes is not None else [c for c in varying_config(configs) if c != "train.seed"]
    out: dict[str, Any] = {"pareto": {}, "hypervolume": {}}
    for cost in pareto.cost_axes(configs):
        front = pareto.pareto_front(configs, cost)
        columns = [ARCH, cost, pareto.OBJECTIVE, pareto.REPORTED, *axes, RUN_ID, RUN_IDS]
        out["pareto"][cost] = _records(front, columns)
        out["hypervolume"][cost] = pareto.compare(configs, cost)
    return jsonable(out)


def _require_selection(ok: pd.DataFrame) -> None:
    """Refuse, rather than return empty fronts, when no usable run has the selection figure."""
    values = ok[BEST_VAL_PPL].to_numpy(dtype=float) if BEST_VAL_PPL in ok else np.array([])
    if not np.isfinite(values).any():
        raise ValueError(
            f"none of the {len(ok)} usable runs has a best validation perplexity "
            f"('{BEST_VAL_PPL}', read from each run's {schema.VAL_PPL} history), which every "
            "analysis selects on; read the runs from their tracking store (`duosparse analyze "
            "SWEEP`) rather than from a table built without it."
        )


def _counts(table: pd.DataFrame) -> dict[str, int]:
    counts = {
        "runs": len(table),
        "ok": int(table[OK].fillna(False).sum()) if OK in table else len(table),
    }
    if STATUS in table:
        counts.update({str(k): int(v) for k, v in table[STATUS].value_counts().items()})
    if EARLY_STOPPED in table:
        counts["early_stopped"] = int(table[EARLY_STOPPED].fillna(False).sum())
    return counts


def _not_ok(table: pd.DataFrame, axes: list[str]) -> list[dict[str, Any]]:
    if OK not in table:
        return []
    bad = table[~ok_mask(table)]
    return _records(bad, [RUN_ID, RUN_NAME, STATUS, EARLY_STOPPED, FAILURE, *axes])


def layer_activity(configs: pd.DataFrame) -> dict[str, list[float]]:
    """Mean activity sparsity of each recurrent layer, per architecture."""
    layers = sorted(
        (c for c in configs if c.startswith(schema.layer_activity(0)[:-1]) and ":" not in c),
        key=lambda c: int(c.rsplit("_", 1)[1]),
    )
    if not layers or ARCH not in configs:
        return {}
    means = configs.groupby(ARCH)[layers].mean()
    return {str(arch): [float(v) for v in row] for arch, row in means.iterrows()}


def _records(frame: pd.DataFrame, columns: list[str] | None = None) -> list[dict[str, Any]]:
    cols = list(dict.fromkeys(c for c in (columns or frame.columns) if c in frame))
    return [
        {c: jsonable(v) for c, v in zip(cols, row)} for row in frame[cols].itertuples(index=False)
    ]
