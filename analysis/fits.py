"""Trade-off fits, the multiplicativity analysis and the iso-perplexity table.

Trade-off model (docs/analysis.md says why this form):

    ppl(R) = ppl0 * (1 + a * R**b)        R = compute reduction = dense MACs / effective MACs

fitted by least squares on log perplexity (noise in perplexity is multiplicative), with
ppl0 > 0, a >= 0 and b in [B_MIN, B_MAX]. For a fixed b the model is linear in (ppl0, ppl0*a),
so the fit starts from the best b of a grid (non-negative linear least squares at each),
then refines all three with scipy's curve_fit. Confidence intervals come from a parametric
bootstrap on the fixed design (each resample keeps the runs' R and draws normal log-residuals
with the fitted variance), which works with the 4-16 runs an architecture has in a sweep where
a case bootstrap would often draw a single R; percentile intervals are widened about the
bootstrap median by t(n - 3) / z for the small sample (simulated coverage of a 95 % interval:
about 93-94 % with 6-12 runs, see docs/analysis.md).

Selection on validation, report on test: every perplexity here that chooses or is fitted is
the best validation perplexity (`runs.BEST_VAL_PPL`): the dense baselines, the budgets and
the winners of the iso-perplexity table, and the trade-off curves. Test perplexity is only
reported beside it (the chosen configurations' test figures; for a fit, how its curve
predicts the test figures), so it stays an unbiased estimate of what was chosen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from duosparse import schema
from scipy import optimize, stats

from .runs import ARCH, BEST_VAL_PPL, RUN_ID, RUN_IDS, SIZE_KEYS, usable_rows

B_MIN, B_MAX = 0.05, 8.0
_B_GRID = np.geomspace(B_MIN, B_MAX, 48)
PARAMS = ("ppl0", "a", "b")
MIN_POINTS = 4  # three parameters and at least one residual degree of freedom


# --- the trade-off model ----------------------------------------------------------------------


def tradeoff(r: Any, ppl0: float, a: float, b: float) -> np.ndarray:
    """ppl0 * (1 + a * R**b)."""
    return ppl0 * (1.0 + a * np.power(np.asarray(r, dtype=float), b))


def _log_model(r: np.ndarray, log_ppl0: float, a: float, b: float) -> np.ndarray:
    return log_ppl0 + np.log1p(a * np.power(r, b))


def _log_jac(r: np.ndarray, log_ppl0: float, a: float, b: float) -> np.ndarray:
    """d log ppl / d (log ppl0, a, b), analytic (faster and steadier than differences)."""
    rb = np.power(r, b)
    share = 1.0 / (1.0 + a * rb)
    return np.c_[np.ones_like(r), rb * share, a * rb * np.log(r) * share]


def _grid_start(r: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(log ppl0, a, b) from the best b of a grid, each solved by weighted NNLS."""
    best, start = math.inf, np.array([math.log(y.min()), 0.0, 1.0])
    for b in _B_GRID:
        design = np.c_[np.ones_like(r), r**b] / y[:, None]  # relative residuals ~ log space
        (c0, c1), _ = optimize.nnls(design, np.ones_like(y))
        if c0 <= 0:
            continue
        sse = float(np.sum((np.log(c0 + c1 * r**b) - np.log(y)) ** 2))
        if sse < best:
            best, start = sse, np.array([math.log(c0), c1 / c0, b])
    return start


def _fit_log(r: np.ndarray, log_y: np.ndarray, start: np.ndarray) -> np.ndarray:
    lower, upper = [-np.inf, 0.0, B_MIN], [np.inf, np.inf, B_MAX]
    start = np.clip(start, [-1e9, 0.0, B_MIN], [1e9, 1e9, B_MAX])
    params, _ = optimize.curve_fit(
        _log_model,
        r,
        log_y,
        p0=start,
        bounds=(lower, upper),
        method="trf",
        jac=_log_jac,
        maxfev=5000,
    )
    return params


def _fit(r: np.ndarray, log_y: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Refine from `start` (bootstrap) or from the grid; a failed refinement keeps the start."""
    begin = _grid_start(r, np.exp(log_y)) if start is None else start
    try:
        return _fit_log(r, log_y, begin)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        if start is not None:
            return _fit(r, log_y)  # retry from the grid
        return begin


@dataclass
class TradeoffFit:
    """One fitted curve with its bootstrap intervals and goodness of fit."""

    params: dict[str, float]
    ci: dict[str, list[float]]
    n: int
    r2: float  # on log perplexity
    rmse: float  # on log perplexity: ~ relative error of the fitted perplexity
    aic: float
    aicc: float
    aic_powerlaw: float  # log ppl = c + k log R, the two-parameter alternative
    confidence: float
    n_boot: int
    curve: dict[str, list[float]] = field(default_factory=dict)  # R grid, fit, band

    def predict(self, r: Any) -> np.ndarray:
        return tradeoff(r, **self.params)

    def reduction_at(self, ppl: float) -> float:
        """The compute reduction at which the fitted curve reaches `ppl` (inf if never)."""
        p = self.params
        excess = ppl / p["ppl0"] - 1
        if excess <= 0:
            return 0.0
        if p["a"] <= 0:
            return math.inf
        return float((excess / p["a"]) ** (1 / p["b"]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _interval(draws: np.ndarray, confidence: float, widen: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of each column, widened about the median by `widen`."""
    tail = (1 - confidence) / 2 * 100
    low, mid, high = np.percentile(draws, [tail, 50, 100 - tail], axis=0)
    return mid - (mid - low) * widen, mid + (high - mid) * widen


def _aic(sse: float, n: int, k: int) -> tuple[float, float]:
    """Gaussian AIC and AICc of a least-squares fit with k parameters (+1 for the variance)."""
    k += 1
    aic = n * math.log(max(sse, 1e-300) / n) + 2 * k
    aicc = aic + 2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.nan
    return aic, aicc


def fit_tradeoff(
    reduction: Any, ppl: Any, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> TradeoffFit:
    """Fit ppl = ppl0 (1 + a R^b) with parametric-bootstrap confidence intervals."""
    r = np.asarray(reduction, dtype=float)
    y = np.asarray(ppl, dtype=float)
    keep = np.isfinite(r) & np.isfinite(y) & (r > 0) & (y > 0)
    r, y = r[keep], y[keep]
    if len(r) < MIN_POINTS or len(np.unique(r)) < 3:
        raise ValueError(
            f"a trade-off fit needs at least {MIN_POINTS} runs with 3 distinct compute "
            f"reductions (got {len(r)} runs, {len(np.unique(r))} distinct)"
        )
    log_y = np.log(y)
    best = _fit(r, log_y)
    fitted = _log_model(r, *best)
    resid = log_y - fitted
    n, k = len(r), len(PARAMS)
    sse = float(resid @ resid)
    sst = float(np.sum((log_y - log_y.mean()) ** 2))

    # Parametric bootstrap: normal log-residuals with the unbiased variance, same design.
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(sse / (n - k))
    draws = np.empty((n_boot, k))
    for i in range(n_boot):
        draws[i] = _fit(r, fitted + rng.normal(0.0, sigma, size=n), best)
    draws[:, 0] = np.exp(draws[:, 0])
    widen = stats.t.ppf(0.5 + confidence / 2, n - k) / stats.norm.ppf(0.5 + confidence / 2)
    low, high = _interval(draws, confidence, widen)
    low, high = np.maximum(low, [0.0, 0.0, B_MIN]), np.minimum(high, [np.inf, np.inf, B_MAX])

    params = dict(zip(PARAMS, [math.exp(best[0]), float(best[1]), float(best[2])]))
    grid = np.geomspace(r.min(), r.max(), 60)
    band_low, band_high = _interval(
        np.array([tradeoff(grid, *d) for d in draws]), confidence, widen
    )
    band_low = np.maximum(band_low, 0.0)
    slope, intercept = np.polyfit(np.log(r), log_y, 1)
    sse_pl = float(np.sum((log_y - (intercept + slope * np.log(r))) ** 2))
    aic, aicc = _aic(sse, n, k)
    return TradeoffFit(
        params=params,
        ci={p: [float(lo), float(hi)] for p, lo, hi in zip(PARAMS, low, high)},
        n=n,
        r2=1 - sse / sst if sst > 0 else math.nan,
        rmse=math.sqrt(sse / n),
        aic=aic,
        aicc=aicc,
        aic_powerlaw=_aic(sse_pl, n, 2)[0],
        confidence=confidence,
        n_boot=n_boot,
        curve={
            "reduction": grid.tolist(),
            "ppl": tradeoff(grid, **params).tolist(),
            "ppl_low": band_low.tolist(),
            "ppl_high": band_high.tolist(),
        },
    )


def fit_keys(table: pd.DataFrame) -> list[str]:
    """Per architecture, and per model size where the table has several (ppl0 depends on it)."""
    keys = [ARCH] if ARCH in table else []
    return keys + [c for c in SIZE_KEYS if c in table and table[c].nunique() > 1]


def fit_groups(
    table: pd.DataFrame,
    x: str = schema.OPS_COMPUTE_REDUCTION,
    y: str = BEST_VAL_PPL,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    reported: str = schema.TEST_PPL,
) -> list[dict[str, Any]]:
    """A trade-off fit of `y` per architecture (and size); groups too small say why they are
    skipped. The curve is fitted on validation perplexity, like every choice of the analysis;
    `reported` (test perplexity) is not fitted, only compared with the curve (`check_on_test`)."""
    rows = _ok(table, x, y)
    keys = fit_keys(rows)
    out = []
    for key, group in rows.groupby(keys, sort=True) if keys else [((), rows)]:
        key = key if isinstance(key, tuple) else (key,)
        entry: dict[str, Any] = {**_label(keys, key), "x": x, "y": y, "n": len(group)}
        try:
            fit = fit_tradeoff(group[x], group[y], n_boot, confidence, seed)
        except ValueError as e:
            entry["skipped"] = str(e)
        else:
            entry.update(fit.to_dict())
            entry.update(check_on_test(fit, group, x, y, reported))
        out.append(entry)
    return out


def check_on_test(
    fit: TradeoffFit, rows: pd.DataFrame, x: str, y: str, reported: str = schema.TEST_PPL
) -> dict[str, Any]:
    """How the validation-fitted curve carries over to the test split, on the same runs:
    `test_ratio`, the geometric mean of test / validation perplexity (the split gap), and
    `test_rmse`, the RMSE of the curve on log test perplexity (compare with `rmse`)."""
    entry: dict[str, Any] = {"reported": reported, "test_n": 0}
    if reported not in rows:
        return entry
    values = rows[[x, y, reported]].to_numpy(dtype=float)
    values = values[np.isfinite(values).all(axis=1) & (values > 0).all(axis=1)]
    if not len(values):
        return entry
    r, val, test = values.T
    log_test = np.log(test)
    resid = log_test - np.log(fit.predict(r))
    return {
        **entry,
        "test_n": len(values),
        "test_ratio": float(np.exp(np.mean(log_test - np.log(val)))),
        "test_rmse": float(np.sqrt(np.mean(resid**2))),
    }


# --- multiplicativity -----------------------------------------------------------------------


def _ok(table: pd.DataFrame, *columns: str) -> pd.DataFrame:
    rows = usable_rows(table)
    for c in columns:
        if c not in rows:
            return rows.iloc[0:0]
        rows = rows[np.isfinite(rows[c].to_numpy(dtype=float))]
    return rows


def _label(keys: list[str], values: tuple) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in zip(keys, values)}


def activity_vs_weight(
    table: pd.DataFrame,
    confidence: float = 0.95,
    x: str = schema.SPARSITY_WEIGHT,
    y: str = schema.SPARSITY_ACTIVITY,
) -> list[dict[str, Any]]:
    """Slope of activity sparsity on weight sparsity per architecture, with its CI.

    One ordinary least-squares line per architecture with a common slope and one intercept
    per (threshold, size) group, so that the threshold's and the size's own effect on
    activity is not mistaken for pruning's. A slope whose interval holds 0 means activity
    does not depend on weight sparsity: the two compose multiplicatively.
    """
    rows = _ok(table, x, y)
    controls = [c for c in ("model.threshold", *SIZE_KEYS) if c in rows]
    out = []
    for arch, group in rows.groupby(ARCH, sort=True) if ARCH in rows else [("all", rows)]:
        entry = _common_slope(
            group, x, y, [c for c in controls if group[c].nunique() > 1], confidence
        )
        out.append({ARCH: str(arch), "x": x, "y": y, **entry})
    return out


def _common_slope(
    rows: pd.DataFrame, x: str, y: str, controls: list[str], confidence: float
) -> dict[str, Any]:
    sw, sa = rows[x].to_numpy(dtype=float), rows[y].to_numpy(dtype=float)
    labels = (
        rows[controls].astype(str).agg(", ".join, axis=1)
        if controls
        else pd.Series("all", index=rows.index)
    )
    names = sorted(labels.unique())
    dummies = np.stack([(labels == g).to_numpy(dtype=float) for g in names], axis=1)
    within = sw - pd.Series(sw, index=rows.index).groupby(labels).transform("mean").to_numpy()
    entry: dict[str, Any] = {
        "n": len(rows),
        "groups": len(names),
        "mean_activity_sparsity": float(sa.mean()),
        "weight_sparsity_range": [float(sw.min()), float(sw.max())],
    }
    if np.ptp(within) < 1e-9:
        return {
            **entry,
            "skipped": "weight sparsity does not vary within a (threshold, size) group",
        }
    design = np.c_[sw, dummies]
    coef, *_ = np.linalg.lstsq(design, sa, rcond=None)
    resid = sa - design @ coef
    dof = len(sa) - np.linalg.matrix_rank(design)
    slope = float(coef[0])
    if dof < 1:
        return {
            **entry,
            "slope": slope,
            "skipped": "no residual degrees of freedom for an interval",
        }
    sigma2 = float(resid @ resid) / dof
    se = math.sqrt(sigma2 * np.linalg.pinv(design.T @ design)[0, 0])
    half = stats.t.ppf(0.5 + confidence / 2, dof) * se
    p = float(2 * stats.t.sf(abs(slope) / se, dof)) if se > 0 else (1.0 if slope == 0 else 0.0)
    low, high = slope - half, slope + half
    independent = bool(low <= 0 <= high)
    return {
        **entry,
        "slope": slope,
        "ci": [low, high],
        "p_value": p,
        "dof": int(dof),
        "confidence": confidence,
        "intercepts": dict(zip(names, map(float, coef[1:]))),
        "controls": controls,
        "independent": independent,
        "change_over_range": slope * float(np.ptp(sw)),
        "verdict": "flat: the sparsities compose multiplicatively"
        if independent
        else f"activity sparsity {'rises' if slope > 0 else 'falls'} with weight sparsity",
    }


def macs_vs_estimate(
    table: pd.DataFrame,
    confidence: float = 0.95,
    tolerance: float = 0.05,
) -> list[dict[str, Any]]:
    """Exact effective MACs against dense (1 - s_w)(1 - s_a), per architecture.

    The ratio exact / estimate is summarised by its geometric mean with a Student-t interval
    on the log ratio; > 1 means events land on the better-connected inputs (or on inputs the
    estimate counts as sparse but are not, such as a dense embedding feeding layer 0).
    """
    exact, estimate = schema.OPS_EFFECTIVE, schema.OPS_MULTIPLICATIVE
    rows = _ok(table, exact, estimate)
    rows = rows[(rows[exact] > 0) & (rows[estimate] > 0)]
    out = []
    for arch, group in rows.groupby(ARCH, sort=True) if ARCH in rows else [("all", rows)]:
        log_ratio = np.log(
            group[exact].to_numpy(dtype=float) / group[estimate].to_numpy(dtype=float)
        )
        entry: dict[str, Any] = {ARCH: str(arch), "n": len(group)}
        mean = float(log_ratio.mean())
        entry.update(
            ratio=math.exp(mean),
            ratio_min=float(np.exp(log_ratio.min())),
            ratio_max=float(np.exp(log_ratio.max())),
        )
        if len(group) > 1:
            half = (
                stats.t.ppf(0.5 + confidence / 2, len(group) - 1)
                * log_ratio.std(ddof=1)
                / math.sqrt(len(group))
            )
            entry["ratio_ci"] = [math.exp(mean - half), math.exp(mean + half)]
        lo, hi = entry.get("ratio_ci", [entry["ratio"]] * 2)
        entry["within_tolerance"] = bool(1 - tolerance <= lo and hi <= 1 + tolerance)
        entry["tolerance"] = tolerance
        out.append(entry)
    return out


# --- iso-perplexity -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A perplexity budget: absolute (ppl <= value) or relative to the dense baseline."""

    kind: str  # "absolute" | "relative"
    value: float

    @property
    def label(self) -> str:
        return f"ppl <= {self.value:g}" if self.kind == "absolute" else f"+{self.value * 100:g}%"


DEFAULT_BUDGETS = (
    Budget("relative", 0.01),
    Budget("relative", 0.05),
    Budget("relative", 0.10),
    Budget("relative", 0.25),
)


def parse_budget(text: str) -> Budget:
    """'60' -> ppl <= 60; '5%' or '+5%' -> within 5 % of the dense baseline of the same size."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            value = float(raw.rstrip("%").lstrip("+")) / 100
            if value < 0:
                raise ValueError
            return Budget("relative", value)
        value = float(raw)
        if value <= 0:
            raise ValueError
        return Budget("absolute", value)
    except ValueError:
        raise ValueError(
            f"perplexity budget '{text}' is neither a perplexity (e.g. 60) nor a percentage "
            "over the dense baseline (e.g. 5%)"
        ) from None


def _sizes(table: pd.DataFrame) -> list[str]:
    return [c for c in SIZE_KEYS if c in table]


def baselines(
    configs: pd.DataFrame,
    reference_arch: str | None = None,
    y: str = BEST_VAL_PPL,
    reported: str = schema.TEST_PPL,
) -> pd.DataFrame:
    """The dense baseline of each (architecture, size): its unpruned configuration with the
    lowest threshold (the closest to dense activity the sweep has), ties going to the lowest
    validation perplexity `y`, or with `reference_arch` the unpruned `reference_arch` model of
    the same size for every architecture. `reported` (test perplexity) rides along."""
    rows = _ok(configs, y)
    pruned = "prune.target_sparsity" if "prune.target_sparsity" in rows else schema.SPARSITY_WEIGHT
    dense = rows[rows[pruned].fillna(0) <= 1e-9]
    sizes = _sizes(rows)
    keys = sizes if reference_arch else [ARCH, *sizes]
    if reference_arch:
        dense = dense[dense[ARCH] == reference_arch]
    order = [c for c in ("model.threshold", y) if c in dense]
    columns = keys + [y, reported, RUN_ID]
    columns += ["model.threshold"] if "model.threshold" in dense else []
    columns = list(dict.fromkeys(columns))  # y may be `reported` (a caller's choice)
    if not len(dense):
        return pd.DataFrame(columns=columns)
    if reported not in dense:
        dense = dense.assign(**{reported: math.nan})
    best = dense.sort_values(order).groupby(keys, sort=True, dropna=False).head(1)
    return best[columns].reset_index(drop=True)


def iso_perplexity(
    configs: pd.DataFrame,
    budgets: tuple[Budget, ...] | list[Budget] = DEFAULT_BUDGETS,
    reference_arch: str | None = None,
    y: str = BEST_VAL_PPL,
    reduction: str = schema.OPS_COMPUTE_REDUCTION,
    reported: str = schema.TEST_PPL,
) -> list[dict[str, Any]]:
    """Per architecture and budget, the largest compute reduction of any configuration whose
    (seed-mean) validation perplexity `y` is within the budget, and the run that achieves it.

    Budgets, baselines and ties are decided on `y` alone; each entry reports the chosen
    configuration's and its baseline's validation (`val_ppl`) and test (`test_ppl`) figures.
    """
    rows = _ok(configs, y, reduction)
    base = baselines(configs, reference_arch, y, reported)
    sizes = _sizes(rows)
    join = sizes if reference_arch else [ARCH, *sizes]
    if len(base):
        figures = base[join].assign(baseline_val_ppl=base[y], baseline_test_ppl=base[reported])
        rows = rows.merge(figures, on=join, how="left")
    else:
        rows = rows.assign(baseline_val_ppl=math.nan, baseline_test_ppl=math.nan)
    out = []
    for arch, group in rows.groupby(ARCH, sort=True):
        for budget in budgets:
            out.append(_iso_entry(str(arch), group, budget, y, reduction, reported, sizes))
    return out


def _iso_entry(
    arch: str,
    group: pd.DataFrame,
    budget: Budget,
    y: str,
    reduction: str,
    reported: str,
    sizes: list[str],
) -> dict[str, Any]:
    """One budget's winner within one architecture, chosen on `y` (validation) only."""
    if budget.kind == "absolute":
        limit = pd.Series(budget.value, index=group.index)
    else:
        limit = group["baseline_val_ppl"] * (1 + budget.value)
    within = group[group[y] <= limit + 1e-12]
    entry: dict[str, Any] = {
        ARCH: arch,
        "budget": budget.label,
        "kind": budget.kind,
        "value": budget.value,
        "selected_on": y,
        "reported": reported,
    }
    if not len(within):
        entry.update(reduction=None, note="no configuration within the budget")
        return entry
    best = within.sort_values([reduction, y], ascending=[False, True]).iloc[0]
    entry.update(
        reduction=float(best[reduction]),
        val_ppl=float(best[y]),
        test_ppl=_float(best.get(reported)),
        val_ppl_limit=_float(limit[best.name]),
        baseline_val_ppl=_float(best["baseline_val_ppl"]),
        baseline_test_ppl=_float(best["baseline_test_ppl"]),
        effective_macs=_float(best.get(schema.OPS_EFFECTIVE)),
        total_reduction=_float(best.get(schema.OPS_TOTAL_COMPUTE_REDUCTION)),
        run_id=best[RUN_ID],
        run_ids=best.get(RUN_IDS),
        config={
            c: _plain(best[c])
            for c in (*sizes, "prune.target_sparsity", "model.threshold")
            if c in best
        },
    )
    return entry


def _float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    if value is pd.NA or value is None:
        return None
    return value.item() if hasattr(value, "item") else value
