"""Pareto fronts of perplexity against compute, per architecture, and their hypervolume.

Both objectives are minimised: a run is on the front when no other run of its architecture
is at least as good on both (validation perplexity, cost) and strictly better on one. Costs
are the operation counts per token (effective, weight-sparse, total with the decoder) and,
when the runs were simulated, SpiNNaker2 energy per token.

Selection on validation, report on test: the perplexity that decides the front (OBJECTIVE)
is the best validation perplexity (`runs.BEST_VAL_PPL`); the front points' test perplexity
(REPORTED) is carried beside it and never compared, so it stays an unbiased estimate.

Hypervolume (one number per architecture, larger is better) is the area the front dominates
in the plane (log10 cost, validation perplexity), bounded by a reference point shared by all
architectures: by default the worst log-cost and the worst perplexity among all compared
runs, each pushed 5 % of its range further out so that the extreme front points count.
Log cost, because compute reductions are ratios: halving the MACs is worth the same at any
scale. `hypervolume_normalized` divides by the box from the ideal point (best cost, best
perplexity of any architecture) to the reference: 1 would be a single run with both.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from duosparse import schema

from .runs import ARCH, BEST_VAL_PPL, usable_rows

# cost axis -> label; energy only where the runs were simulated (`duosparse simulate`)
COST_AXES: dict[str, str] = {
    schema.OPS_EFFECTIVE: "effective MACs per token (recurrent layers)",
    schema.OPS_WEIGHT_SPARSE: "weight-sparse MACs per token (recurrent layers)",
    schema.OPS_TOTAL_EFFECTIVE: "total effective MACs per token (with decoder)",
    schema.spinnaker2("energy_per_token_j"): "SpiNNaker2 energy per token (J)",
}
OBJECTIVE = BEST_VAL_PPL  # what fronts and hypervolumes are computed on
REPORTED = schema.TEST_PPL  # what is reported beside it, never used to choose
REFERENCE_MARGIN = 0.05


def non_dominated(costs: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `costs` (n x d, every column minimised).

    Rows with a non-finite value are never on the front; equal rows do not dominate each
    other, so duplicates of a front point are all on it. Two columns: one sort, O(n log n);
    more: pairwise comparison.
    """
    costs = np.asarray(costs, dtype=float)
    if costs.ndim != 2:
        raise ValueError("costs must be a 2-D array (points x objectives)")
    finite = np.isfinite(costs).all(axis=1)
    mask = np.zeros(len(costs), dtype=bool)
    idx = np.flatnonzero(finite)
    if idx.size == 0:
        return mask
    pts = costs[idx]
    if pts.shape[1] == 2:
        mask[idx] = _non_dominated_2d(pts)
        return mask
    le = (pts[:, None, :] <= pts[None, :, :]).all(axis=2)  # le[j, i]: j <= i everywhere
    lt = (pts[:, None, :] < pts[None, :, :]).any(axis=2)
    mask[idx] = ~(le & lt).any(axis=0)
    return mask


def _non_dominated_2d(pts: np.ndarray) -> np.ndarray:
    # Sorted by x: a point is dominated iff some point with a smaller x has y <= its y, or a
    # point with the same x has a smaller y.
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    x, y = pts[order, 0], pts[order, 1]
    keep = np.zeros(len(pts), dtype=bool)
    best_before = math.inf  # min y over all strictly smaller x
    start = 0
    while start < len(x):
        stop = start
        while stop < len(x) and x[stop] == x[start]:
            stop += 1
        group_min = y[start]  # sorted by y within equal x
        keep[start:stop] = (y[start:stop] < best_before) & (y[start:stop] == group_min)
        best_before = min(best_before, group_min)
        start = stop
    out = np.zeros(len(pts), dtype=bool)
    out[order] = keep
    return out


def usable(table: pd.DataFrame, cost: str, objective: str = OBJECTIVE) -> pd.DataFrame:
    """Rows of `table` that can be compared on (cost, objective): ok, finite, positive cost."""
    if cost not in table or objective not in table:
        return table.iloc[0:0]
    rows = usable_rows(table)
    values = rows[[cost, objective]].to_numpy(dtype=float)
    keep = np.isfinite(values).all(axis=1) & (values[:, 0] > 0)
    return rows[keep]


def cost_axes(table: pd.DataFrame, objective: str = OBJECTIVE) -> list[str]:
    """The cost axes this table can be compared on (energy only when simulated)."""
    return [c for c in COST_AXES if len(usable(table, c, objective))]


def pareto_front(
    table: pd.DataFrame, cost: str, objective: str = OBJECTIVE, by: str | None = ARCH
) -> pd.DataFrame:
    """The front rows of each group (architecture), sorted by group then cost."""
    rows = usable(table, cost, objective)
    groups = rows.groupby(by, sort=True) if by else [(None, rows)]
    fronts = [
        g[non_dominated(g[[cost, objective]].to_numpy(dtype=float))] for _, g in groups if len(g)
    ]
    if not fronts:
        return rows.iloc[0:0]
    return pd.concat(fronts).sort_values([by, cost] if by else [cost])


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by `points` (n x 2, both minimised) and bounded by `reference`."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    rx, ry = reference
    pts = pts[np.isfinite(pts).all(axis=1) & (pts[:, 0] < rx) & (pts[:, 1] < ry)]
    if len(pts) == 0:
        return 0.0
    front = pts[_non_dominated_2d(pts)]
    front = front[np.lexsort((front[:, 1], front[:, 0]))]
    front = front[np.r_[True, np.diff(front[:, 0]) > 0]]  # duplicates add no area
    widths = np.diff(np.r_[front[:, 0], rx])
    return float(np.sum(widths * (ry - front[:, 1])))


def reference_point(
    table: pd.DataFrame, cost: str, objective: str = OBJECTIVE, margin: float = REFERENCE_MARGIN
) -> tuple[float, float]:
    """The shared reference in (log10 cost, objective): the worst of each, plus a margin."""
    rows = usable(table, cost, objective)
    x = np.log10(rows[cost].to_numpy(dtype=float))
    y = rows[objective].to_numpy(dtype=float)
    pad_x = margin * (np.ptp(x) or abs(x.max()) or 1.0)
    pad_y = margin * (np.ptp(y) or abs(y.max()) or 1.0)
    return float(x.max() + pad_x), float(y.max() + pad_y)


def compare(
    table: pd.DataFrame,
    cost: str,
    objective: str = OBJECTIVE,
    by: str = ARCH,
    reference: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Hypervolume of each architecture's front on one cost axis, against one reference."""
    rows = usable(table, cost, objective)
    if not len(rows):
        return {"cost": cost, "objective": objective, "reference": None, "groups": {}}
    reference = reference or reference_point(rows, cost, objective)
    ideal = (float(np.log10(rows[cost].min())), float(rows[objective].min()))
    box = (reference[0] - ideal[0]) * (reference[1] - ideal[1])
    groups = {}
    for name, group in rows.groupby(by, sort=True):
        pts = np.c_[
            np.log10(group[cost].to_numpy(dtype=float)), group[objective].to_numpy(dtype=float)
        ]
        hv = hypervolume_2d(pts, reference)
        groups[str(name)] = {
            "hypervolume": hv,
            "hypervolume_normalized": hv / box if box > 0 else math.nan,
            "front_size": int(non_dominated(pts).sum()),
            "runs": len(group),
        }
    return {
        "cost": cost,
        "objective": objective,
        "reference": list(reference),
        "ideal": list(ideal),
        "groups": groups,
    }


# --- searches: the front against the trials spent, and fronts of two sweeps -----------------

SEARCH_COST = schema.OPS_EFFECTIVE  # a search's progress and grid-vs-search comparisons


def _log_points(rows: pd.DataFrame, cost: str, objective: str) -> np.ndarray:
    return np.c_[np.log10(rows[cost].to_numpy(dtype=float)), rows[objective].to_numpy(dtype=float)]


def hypervolume_by_trial(
    table: pd.DataFrame,
    cost: str = SEARCH_COST,
    objective: str = OBJECTIVE,
    reference: tuple[float, float] | None = None,
    ideal: tuple[float, float] | None = None,
) -> list[dict[str, Any]]:
    """The hypervolume of the front of the first n trials, for each n, in trial start order
    (one front over all architectures: a search's front is what it found). A trial that
    failed or is not usable still spent its place. Reference and ideal default to this
    table's (the rule of `reference_point`)."""
    from .runs import RUN_ID, START_TIME

    if not len(table):
        return []
    ordered = table.sort_values(START_TIME) if START_TIME in table else table
    rows = usable(ordered, cost, objective)
    if not len(rows):
        return []
    reference = reference or reference_point(rows, cost, objective)
    if ideal is None:
        ideal = (float(np.log10(rows[cost].min())), float(rows[objective].min()))
    box = (reference[0] - ideal[0]) * (reference[1] - ideal[1])
    good = set(rows.index)
    out, seen = [], []
    for n, (index, row) in enumerate(ordered.iterrows(), start=1):
        if index in good:
            seen.append(index)
        pts = _log_points(ordered.loc[seen], cost, objective) if seen else np.empty((0, 2))
        hv = hypervolume_2d(pts, reference)
        out.append(
            {
                "trial": n,
                "run_id": row.get(RUN_ID),
                "usable": index in good,
                objective: float(row[objective]) if index in good else math.nan,
                cost: float(row[cost]) if index in good else math.nan,
                "hypervolume": hv,
                "hypervolume_normalized": hv / box if box > 0 else math.nan,
                "front_size": int(non_dominated(pts).sum()) if len(pts) else 0,
            }
        )
    return out


def compare_sweeps(
    tables: dict[str, pd.DataFrame], cost: str = SEARCH_COST, objective: str = OBJECTIVE
) -> dict[str, Any]:
    """Fronts of several sweeps (a grid and a search over the same space) on one reference
    point and ideal, both from the union of their usable runs; each sweep's hypervolume, its
    front and its hypervolume after each trial, and each one's ratio to the first sweep's."""
    used = {name: usable(t, cost, objective) for name, t in tables.items()}
    union = (
        pd.concat([u for u in used.values() if len(u)])
        if any(len(u) for u in used.values())
        else None
    )
    if union is None:
        return {"cost": cost, "objective": objective, "reference": None, "sweeps": {}}
    reference = reference_point(union, cost, objective)
    ideal = (float(np.log10(union[cost].min())), float(union[objective].min()))
    box = (reference[0] - ideal[0]) * (reference[1] - ideal[1])
    sweeps: dict[str, Any] = {}
    for name, rows in used.items():
        pts = _log_points(rows, cost, objective) if len(rows) else np.empty((0, 2))
        hv = hypervolume_2d(pts, reference)
        front = rows[non_dominated(pts)].sort_values(cost) if len(rows) else rows
        sweeps[name] = {
            "trials": len(tables[name]),
            "usable": len(rows),
            "hypervolume": hv,
            "hypervolume_normalized": hv / box if box > 0 else math.nan,
            "front": [
                {cost: float(c), objective: float(o), REPORTED: float(r)}
                for c, o, r in zip(
                    front[cost], front[objective], front.get(REPORTED, [math.nan] * len(front))
                )
            ],
            "by_trial": hypervolume_by_trial(tables[name], cost, objective, reference, ideal),
        }
    first = next(iter(sweeps.values()))["hypervolume"]
    for entry in sweeps.values():
        entry["ratio_to_first"] = entry["hypervolume"] / first if first > 0 else math.nan
    return {
        "cost": cost,
        "objective": objective,
        "reference": list(reference),
        "ideal": list(ideal),
        "sweeps": sweeps,
    }
