"""The analysis layer and the dashboards: Pareto fronts, fits, multiplicativity, the run table
(from a real smoke sweep and from a synthetic MLflow store), the HTML report and static export
through kaleido and the system Chromium (.ci/run installs Debian's)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import require
from duosparse import schema, tracking
from duosparse.analysis import fits, pareto, runs, study
from duosparse.cli import app as duosparse_app
from duosparse.config import KEYS_OUT_OF_IDENTITY_AT_DEFAULT, RunConfig, set_dotted
from duosparse.dashboards import export, figures
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DUOSPARSE = str(Path(sys.executable).with_name("duosparse"))


def cli(*args: str):
    """`duosparse analyze|export ...` in-process."""
    return CliRunner().invoke(duosparse_app, list(args))


# --- synthetic sweeps -----------------------------------------------------------------------------

PPL0 = {"lstm": 100.0, "gru": 105.0, "egru": 110.0}
A, B = 0.01, 1.5


def synthetic_runs(seed: int = 0, slope: float = 0.0, seeds=(0, 1)) -> list[tuple[RunConfig, dict]]:
    """Configs and final metrics of a planted study: ppl = ppl0 (1 + A R^B), EGRU activity
    = 0.5 + 2 threshold + slope * weight sparsity, exact MACs 2 % above the estimate."""
    rng = np.random.default_rng(seed)
    out = []
    grid = [("lstm", 0.0), ("gru", 0.0), ("egru", 0.05), ("egru", 0.1)]
    for (arch, threshold), sparsity, s in itertools.product(grid, (0.0, 0.5, 0.8, 0.9), seeds):
        config = RunConfig.model_validate(
            {
                "data": {"corpus": "synthetic"},
                "model": {
                    "arch": arch,
                    "threshold": threshold,
                    "embedding_size": 64,
                    "hidden_size": 64,
                },
                "prune": {
                    "target_sparsity": sparsity,
                    "schedule": "oneshot" if sparsity else "none",
                },
                "train": {"seed": s},
            }
        )
        gates = 4 if arch == "lstm" else 3
        dense = 2 * gates * 64 * 128.0
        s_a = (
            0.0 if arch != "egru" else 0.5 + 2 * threshold + slope * sparsity + rng.normal(0, 0.01)
        )
        estimate = dense * (1 - sparsity) * (1 - s_a)
        effective = estimate * 1.02
        reduction = dense / effective
        ppl = PPL0[arch] * (1 + A * reduction**B) * math.exp(rng.normal(0, 0.01))
        metrics = {
            schema.TRAIN_LOSS: math.log(ppl) + 0.1,
            schema.VAL_LOSS: math.log(ppl),
            schema.VAL_PPL: ppl,
            schema.TEST_LOSS: math.log(ppl),
            schema.TEST_PPL: ppl,
            schema.SPARSITY_WEIGHT: sparsity,
            schema.SPARSITY_ACTIVITY: s_a,
            schema.layer_activity(0): s_a * 0.9,
            schema.layer_activity(1): s_a * 1.1,
            schema.OPS_DENSE: dense,
            schema.OPS_WEIGHT_SPARSE: dense * (1 - sparsity),
            schema.OPS_EFFECTIVE: effective,
            schema.OPS_MULTIPLICATIVE: estimate,
            schema.OPS_TOTAL_EFFECTIVE: effective + 6400.0,
            schema.OPS_COMPUTE_REDUCTION: reduction,
            schema.PERF_TOKENS_PER_S: 1e4,
            schema.PERF_EPOCH_S: 1.0,
        }
        out.append((config, metrics))
    return out


def table_of(items: list[tuple[RunConfig, dict]]) -> pd.DataFrame:
    """A run table straight from synthetic runs (no MLflow), as runs_table would type it; each
    run logged one epoch, so its best validation perplexity is its val/ppl."""
    rows = [
        {
            runs.RUN_ID: f"run{i:03d}",
            runs.RUN_KEY: c.run_key,
            runs.STATUS: "FINISHED",
            runs.EARLY_STOPPED: False,
            runs.OK: True,
            **c.flat(),
            runs.BEST_VAL_PPL: m[schema.VAL_PPL],
            **m,
        }
        for i, (c, m) in enumerate(items)
    ]
    return runs.apply_types(pd.DataFrame(rows))


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    """A SQLite MLflow store shaped like a sweep: two launches (parent runs), 32 finished
    trials, one FAILED and one stopped early by ASHA."""
    folder = tmp_path_factory.mktemp("synthetic")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    client = tracking.open_store(uri)
    exp = client.create_experiment("synth", artifact_location=(folder / "mlartifacts").as_uri())
    parents = []
    for i in range(2):
        parents.append(
            client.create_run(
                exp,
                start_time=int(time.time() * 1000) + i,
                tags={schema.TAG_KIND: "sweep", schema.TAG_SWEEP: "synth"},
                run_name="synth launch",
            ).info.run_id
        )
    items = synthetic_runs()
    for config, metrics in items:
        run_id = tracking.start_run(
            client,
            exp,
            config,
            kind="trial",
            parent_run_id=parents[0],
            tags={schema.TAG_SWEEP: "synth"},
        )
        tracking.MlflowReporter(client, run_id).log_metrics(metrics, step=2)
        tracking.finish_run(client, run_id)
    bad = RunConfig.model_validate(
        {"model": {"arch": "gru", "hidden_size": 32}, "train": {"lr": 5.0}}
    )
    failed = tracking.start_run(client, exp, bad, kind="trial", tags={schema.TAG_SWEEP: "synth"})
    tracking.finish_run(client, failed, "FAILED", "train/loss became nan at epoch 1")
    stopped_cfg = RunConfig.model_validate({"model": {"arch": "gru", "hidden_size": 48}})
    stopped = tracking.start_run(
        client, exp, stopped_cfg, kind="trial", tags={schema.TAG_SWEEP: "synth"}
    )
    tracking.MlflowReporter(client, stopped).log_metrics({schema.VAL_LOSS: 5.0}, step=1)
    client.set_tag(stopped, schema.TAG_EARLY_STOPPED, "true")
    tracking.finish_run(client, stopped)
    return {
        "uri": uri,
        "client": client,
        "parents": parents,
        "failed": failed,
        "stopped": stopped,
        "items": items,
        "folder": folder,
    }


# --- Pareto fronts --------------------------------------------------------------------------------


def brute_force_front(points: np.ndarray) -> np.ndarray:
    keep = []
    for i, p in enumerate(points):
        dominated = any(np.all(q <= p) and np.any(q < p) for j, q in enumerate(points) if j != i)
        keep.append(bool(np.all(np.isfinite(p))) and not dominated)
    return np.array(keep)


@pytest.mark.parametrize("dims", [2, 3])
def test_pareto_front_equals_brute_force_non_dominated_filter(dims):
    rng = np.random.default_rng(dims)
    for trial in range(60):
        n = int(rng.integers(1, 40))
        points = rng.normal(size=(n, dims))
        if trial % 3 == 0:  # ties and duplicates on a coarse grid
            points = rng.integers(0, 4, size=(n, dims)).astype(float)
        if trial % 5 == 0:
            points[rng.integers(0, n)] = np.nan  # a run without a figure is never on the front
        assert np.array_equal(pareto.non_dominated(points), brute_force_front(points)), points


def test_pareto_front_per_architecture_and_hypervolume():
    table = pd.DataFrame(
        {
            "model.arch": ["a", "a", "a", "b", "b"],
            "ok": [True] * 5,
            "cost": [10.0, 100.0, 50.0, 10.0, 1000.0],
            runs.BEST_VAL_PPL: [90.0, 80.0, 95.0, 85.0, 70.0],
            # test perplexity only rides along: this order would give another front
            schema.TEST_PPL: [99.0, 99.0, 60.0, 85.0, 70.0],
        }
    )
    front = pareto.pareto_front(table, "cost")
    assert front[["model.arch", "cost"]].values.tolist() == [
        ["a", 10.0],
        ["a", 100.0],
        ["b", 10.0],
        ["b", 1000.0],
    ]
    # one point: a rectangle; a dominated point adds nothing; two points: a staircase
    assert pareto.hypervolume_2d(np.array([[1.0, 80.0]]), (3.0, 100.0)) == pytest.approx(40.0)
    assert pareto.hypervolume_2d(
        np.array([[1.0, 80.0], [2.0, 90.0]]), (3.0, 100.0)
    ) == pytest.approx(40.0)
    assert pareto.hypervolume_2d(
        np.array([[1.0, 90.0], [2.0, 80.0]]), (3.0, 100.0)
    ) == pytest.approx(30.0)
    hv = pareto.compare(table, "cost", reference=(3.0, 100.0))["groups"]
    # a: log10 cost 1 (ppl 90) and 2 (ppl 80): 1*10 + 1*20 = 30; b: 1 (85) and 3 (70, at the edge)
    assert hv["a"]["hypervolume"] == pytest.approx(30.0)
    assert hv["b"]["hypervolume"] == pytest.approx(2 * 15.0)


# --- trade-off fit --------------------------------------------------------------------------------


def test_fit_recovers_known_parameters_within_its_confidence_interval():
    truth = {"ppl0": 80.0, "a": 0.02, "b": 1.3}
    rng = np.random.default_rng(7)
    reduction = np.geomspace(1, 20, 12)
    ppl = fits.tradeoff(reduction, **truth) * np.exp(rng.normal(0, 0.01, reduction.size))
    fit = fits.fit_tradeoff(reduction, ppl, n_boot=300, seed=1)
    for name, value in truth.items():
        low, high = fit.ci[name]
        assert low <= value <= high, (name, fit.ci)
        assert low <= fit.params[name] <= high
        assert (high - low) < 0.5 * value + 1.0  # informative, not just wide
    assert fit.r2 > 0.99 and fit.rmse < 0.02
    assert fit.aic < fit.aic_powerlaw  # the knee is real: the power law fits worse
    assert fit.reduction_at(float(fit.predict(10.0))) == pytest.approx(10.0, rel=1e-6)
    band = fit.curve
    assert all(
        lo <= mid <= hi for lo, mid, hi in zip(band["ppl_low"], band["ppl"], band["ppl_high"])
    )


def test_fit_needs_enough_distinct_points():
    with pytest.raises(ValueError, match="at least 4 runs"):
        fits.fit_tradeoff([1, 2, 4], [10, 11, 13])
    fit = fits.fit_tradeoff([1, 2, 5, 10], [100.0, 101.5, 106.0, 118.0], n_boot=100)  # one dof
    assert all(math.isfinite(v) for ci in fit.ci.values() for v in ci)


# --- multiplicativity and iso-perplexity ----------------------------------------------------------


def test_multiplicativity_detects_a_planted_dependence_and_none_where_there_is_none():
    planted = {
        e["model.arch"]: e for e in fits.activity_vs_weight(table_of(synthetic_runs(slope=0.3)))
    }
    egru = planted["egru"]
    assert not egru["independent"] and egru["ci"][0] > 0
    assert egru["ci"][0] <= 0.3 <= egru["ci"][1]
    assert "rises" in egru["verdict"]
    flat = {
        e["model.arch"]: e for e in fits.activity_vs_weight(table_of(synthetic_runs(slope=0.0)))
    }
    assert flat["egru"]["independent"] and flat["egru"]["ci"][0] < 0 < flat["egru"]["ci"][1]
    assert abs(flat["egru"]["slope"]) < 0.05
    assert flat["lstm"]["independent"]  # activity-dense: a flat zero line
    # the threshold's own effect (+2 threshold) goes to the intercepts, not the slope
    assert flat["egru"]["intercepts"]["0.1"] - flat["egru"]["intercepts"]["0.05"] == pytest.approx(
        0.1, abs=0.02
    )

    ratios = {e["model.arch"]: e for e in fits.macs_vs_estimate(table_of(synthetic_runs()))}
    assert ratios["egru"]["ratio"] == pytest.approx(1.02)
    assert ratios["egru"]["within_tolerance"]
    off = table_of(synthetic_runs())
    off[schema.OPS_EFFECTIVE] *= 1.3
    assert not fits.macs_vs_estimate(off)[0]["within_tolerance"]


def test_typed_tables_are_not_fragmented():
    # apply_types casts column by column; without consolidating, the next column added to the
    # (100-odd column) table makes pandas warn "highly fragmented" in every analyze run
    items = synthetic_runs(seeds=(0,))
    for _, metrics in items:  # a deep model logs a column per layer
        metrics.update({f"sparsity/activity/layer_{i}": 0.5 for i in range(80)})
    table = table_of(items)
    assert len(table.columns) > 150  # pandas warns past 100 blocks of numpy dtypes
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        table.assign(extra=1.0)
        fits.iso_perplexity(runs.aggregate_seeds(table), [fits.parse_budget("5%")])


def test_iso_perplexity_picks_the_largest_reduction_within_budget():
    table = table_of(synthetic_runs(seeds=(0,)))
    configs = runs.aggregate_seeds(table)
    budgets = [fits.parse_budget("5%"), fits.parse_budget("120"), fits.parse_budget("1")]
    rows = fits.iso_perplexity(configs, budgets)
    by = {(r["model.arch"], r["budget"]): r for r in rows}
    val = runs.BEST_VAL_PPL
    for arch in ("lstm", "gru", "egru"):
        group = configs[configs["model.arch"] == arch]
        base = group[group["prune.target_sparsity"] == 0].sort_values("model.threshold").iloc[0]
        within = group[group[val] <= base[val] * 1.05]
        best = within.loc[within[schema.OPS_COMPUTE_REDUCTION].idxmax()]
        entry = by[(arch, "+5%")]
        assert entry["reduction"] == pytest.approx(best[schema.OPS_COMPUTE_REDUCTION])
        assert entry["run_id"] == best[runs.RUN_ID]
        assert entry["baseline_val_ppl"] == pytest.approx(base[val])
        assert entry["test_ppl"] == pytest.approx(best[schema.TEST_PPL])
        absolute = group[group[val] <= 120]
        if len(absolute):
            assert by[(arch, "ppl <= 120")]["reduction"] == pytest.approx(
                absolute[schema.OPS_COMPUTE_REDUCTION].max()
            )
        assert by[(arch, "ppl <= 1")]["reduction"] is None  # nothing that good
    with pytest.raises(ValueError, match="budget"):
        fits.parse_budget("sixty")
    # against one reference architecture: the LSTM of the same size
    lstm = fits.iso_perplexity(configs, [fits.parse_budget("10%")], reference_arch="lstm")
    assert {r["baseline_val_ppl"] for r in lstm if r.get("baseline_val_ppl")} == {
        by[("lstm", "+5%")]["baseline_val_ppl"]
    }


# --- selection on validation, report on test ------------------------------------------------------


def split_disagreement() -> pd.DataFrame:
    """One architecture's seed-mean configurations where validation and test disagree: d2 is
    the best dense model on test but not on validation, p2 the best pruned one on test.

    Chosen on validation: baseline d1, front d1-p1-p2, +5% and ppl <= 106 -> p1.
    Chosen on test (the old behaviour): baseline d2, front d2-p2, both budgets -> p2.
    """
    return pd.DataFrame(
        {
            runs.RUN_ID: ["d1", "d2", "p1", "p2"],
            runs.OK: [True] * 4,
            "model.arch": ["egru"] * 4,
            "model.threshold": [0.0] * 4,
            "train.lr": [1e-3, 2e-3, 1e-3, 1e-3],
            "prune.target_sparsity": [0.0, 0.0, 0.5, 0.8],
            runs.BEST_VAL_PPL: [100.0, 105.0, 104.0, 112.0],
            schema.TEST_PPL: [110.0, 99.0, 120.0, 100.0],
            schema.OPS_EFFECTIVE: [1000.0, 1000.0, 500.0, 200.0],
            schema.OPS_COMPUTE_REDUCTION: [1.0, 1.0, 2.0, 5.0],
        }
    )


def test_fronts_and_hypervolume_select_on_validation_and_report_test():
    configs = split_disagreement()
    front = pareto.pareto_front(configs, schema.OPS_EFFECTIVE)
    assert front[runs.RUN_ID].tolist() == ["p2", "p1", "d1"]
    summary = study.pareto_summary(configs, axes=["prune.target_sparsity"])
    points = {p[runs.RUN_ID]: p for p in summary["pareto"][schema.OPS_EFFECTIVE]}
    assert set(points) == {"d1", "p1", "p2"}
    for run_id, point in points.items():  # each front point reports its own test figure
        row = configs.set_index(runs.RUN_ID).loc[run_id]
        assert point[schema.TEST_PPL] == row[schema.TEST_PPL]
        assert point[runs.BEST_VAL_PPL] == row[runs.BEST_VAL_PPL]
    hv = pareto.compare(configs, schema.OPS_EFFECTIVE, reference=(3.5, 120.0))
    assert hv["objective"] == runs.BEST_VAL_PPL
    val_points = np.c_[np.log10(configs[schema.OPS_EFFECTIVE]), configs[runs.BEST_VAL_PPL]]
    expected = pareto.hypervolume_2d(val_points, (3.5, 120.0))
    assert hv["groups"]["egru"]["hypervolume"] == pytest.approx(expected)


def test_dense_baseline_and_iso_perplexity_select_on_validation_and_report_test():
    configs = split_disagreement()
    base = fits.baselines(configs)
    assert base[runs.RUN_ID].tolist() == ["d1"]  # d2 is better on test only
    assert base[schema.TEST_PPL].tolist() == [110.0]  # the chosen run's test figure
    budgets = [fits.parse_budget("5%"), fits.parse_budget("106")]
    by = {e["budget"]: e for e in fits.iso_perplexity(configs, budgets)}
    for label in ("+5%", "ppl <= 106"):
        entry = by[label]
        assert entry["run_id"] == "p1" and entry["reduction"] == 2.0
        assert (entry["val_ppl"], entry["test_ppl"]) == (104.0, 120.0)
        assert entry["selected_on"] == runs.BEST_VAL_PPL
    assert by["+5%"]["val_ppl_limit"] == pytest.approx(105.0)  # 1.05 x the baseline's val
    assert (by["+5%"]["baseline_val_ppl"], by["+5%"]["baseline_test_ppl"]) == (100.0, 110.0)


@pytest.mark.slow
def test_tradeoff_fit_is_on_validation_and_compares_test():
    table = table_of(synthetic_runs(seeds=(0,)))
    rng = np.random.default_rng(3)
    # test perplexity 10 % above validation with its own, larger noise: a fit on it differs
    table[schema.TEST_PPL] = (
        table[runs.BEST_VAL_PPL] * 1.1 * np.exp(rng.normal(0, 0.05, len(table)))
    )
    entries = {e["model.arch"]: e for e in fits.fit_groups(table, n_boot=50)}
    for arch, entry in entries.items():
        group = table[table["model.arch"] == arch]
        r = group[schema.OPS_COMPUTE_REDUCTION]
        on_val = fits.fit_tradeoff(r, group[runs.BEST_VAL_PPL], n_boot=50)
        on_test = fits.fit_tradeoff(r, group[schema.TEST_PPL], n_boot=50)
        assert entry["y"] == runs.BEST_VAL_PPL and entry["params"] == on_val.params
        assert entry["params"]["ppl0"] != pytest.approx(on_test.params["ppl0"], rel=1e-3)
        ratio = np.exp(np.mean(np.log(group[schema.TEST_PPL] / group[runs.BEST_VAL_PPL])))
        assert entry["test_ratio"] == pytest.approx(ratio) and entry["test_n"] == len(group)
        assert entry["test_rmse"] > entry["rmse"]  # the curve is fitted to the other split


@pytest.mark.slow
def test_best_validation_perplexity_is_the_best_epoch_at_final_sparsity(tmp_path):
    """runs_table derives val/best_ppl from the val/ppl history: the lowest value among the
    epochs at the final sparsity, not the last epoch's (MLflow's latest value)."""
    from duosparse.pruning import Pruner

    client = tracking.open_store(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.create_experiment("best", artifact_location=(tmp_path / "art").as_uri())
    pruned = RunConfig.model_validate(
        {
            "prune": {"schedule": "gradual", "target_sparsity": 0.5, "end_epoch": 2},
            "train": {"epochs": 4},
        }
    )
    dense = RunConfig.model_validate({"train": {"epochs": 3}})
    histories = {pruned.run_key: [50.0, 80.0, 70.0, 75.0], dense.run_key: [90.0, 60.0, 65.0]}
    for config in (pruned, dense):
        run_id = tracking.start_run(client, exp, config, kind="train")
        reporter = tracking.MlflowReporter(client, run_id)
        for epoch, ppl in enumerate(histories[config.run_key], start=1):
            reporter.log_metrics({schema.VAL_PPL: ppl}, step=epoch)
        reporter.log_metrics({schema.TEST_PPL: 99.0}, step=config.train.epochs)
        tracking.finish_run(client, run_id)
    table = runs.runs_table("best", client=client).set_index(runs.RUN_KEY)
    # epoch 1 (50) is before pruning finished and does not count; the last epoch is 75
    assert table.loc[pruned.run_key, schema.VAL_PPL] == 75.0
    assert table.loc[pruned.run_key, runs.BEST_VAL_PPL] == 70.0
    assert table.loc[dense.run_key, runs.BEST_VAL_PPL] == 60.0  # unpruned: every epoch

    class NoTensors:  # the first epoch that counts depends on the schedule only
        def prunable(self, include_embedding: bool) -> list:
            return []

    for prune in (
        {},
        {"schedule": "oneshot", "target_sparsity": 0.5, "start_epoch": 3},
        {"schedule": "gradual", "target_sparsity": 0.5, "start_epoch": 2, "end_epoch": 4},
        {"schedule": "iterative", "target_sparsity": 0.9, "end_epoch": 3},
        {"schedule": "gradual", "target_sparsity": 0.0, "end_epoch": 3},
    ):
        config = RunConfig.model_validate({"prune": prune, "train": {"epochs": 5}})
        flat = {k: "null" if v is None else str(v) for k, v in config.flat().items()}
        params = {k: runs.parse_param(k, v) for k, v in flat.items()}  # as MLflow keeps them
        pruner = Pruner(config.prune, NoTensors(), steps_per_epoch=10)
        assert runs.final_sparsity_epoch(params) == pruner.final_epoch, prune


def test_a_table_without_the_selection_figure_is_refused(tmp_path):
    table = table_of(synthetic_runs(seeds=(0,))).drop(columns=runs.BEST_VAL_PPL)
    path = tmp_path / "old.csv"
    table.to_csv(path, index=False)
    with pytest.raises(runs.RunTableError, match="older duosparse"):
        runs.read_table(path)
    with pytest.raises(ValueError, match="best validation perplexity"):
        study.analyze(table, n_boot=50)


# --- run table ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_table_types_failures_and_seed_aggregation(synthetic_store):
    table = runs.runs_table("synth", synthetic_store["uri"])
    assert len(table) == len(synthetic_store["items"]) + 2
    assert table.dtypes["model.arch"] == "string" and table.dtypes["model.hidden_size"] == "Int64"
    assert (
        table.dtypes["prune.target_sparsity"] == "float64"
        and table.dtypes["model.tie_weights"] == "boolean"
    )
    assert table.dtypes["data.dir"] == "string" and table["data.dir"].isna().all()  # 'null' param
    assert table.dtypes[schema.TEST_PPL] == "float64" and table.dtypes[runs.START_TIME].kind == "M"
    failed = table.set_index(runs.RUN_ID).loc[synthetic_store["failed"]]
    assert failed[runs.STATUS] == "FAILED" and "nan" in failed[runs.FAILURE] and not failed[runs.OK]
    stopped = table.set_index(runs.RUN_ID).loc[synthetic_store["stopped"]]
    assert stopped[runs.EARLY_STOPPED] and not stopped[runs.OK]
    assert int(table[runs.OK].sum()) == len(synthetic_store["items"])

    configs = runs.aggregate_seeds(table)
    assert len(configs) == len(synthetic_store["items"]) // 2 and (configs[runs.N_SEEDS] == 2).all()
    row = configs.iloc[0]
    members = table[table[runs.RUN_ID].isin(row[runs.RUN_IDS].split(","))][schema.TEST_PPL]
    mean, low, high, _ = runs.mean_ci(members)
    assert row[schema.TEST_PPL] == pytest.approx(members.mean())
    half = 12.706 * members.std(ddof=1) / math.sqrt(2)  # t(0.975, 1 dof)
    assert (row[f"{schema.TEST_PPL}:ci_low"], row[f"{schema.TEST_PPL}:ci_high"]) == pytest.approx(
        (mean - half, mean + half), rel=1e-4
    )


def test_analysis_from_an_exported_table_equals_the_analysis_from_mlflow(synthetic_store, tmp_path):
    table = runs.runs_table("synth", synthetic_store["uri"])
    online = study.analyze(table, n_boot=60)
    for suffix in ("csv", "parquet"):
        path = runs.write_table(table, tmp_path / f"runs.{suffix}")
        back = runs.read_table(path)
        pd.testing.assert_frame_equal(back, table)
        assert study.analyze(back, n_boot=60) == online
    fit = {f["model.arch"]: f for f in online["fits"]}
    for arch, ppl0 in PPL0.items():
        assert fit[arch]["ci"]["ppl0"][0] <= ppl0 <= fit[arch]["ci"]["ppl0"][1]
    assert online["counts"]["FAILED"] == 1 and online["counts"]["early_stopped"] == 1
    assert {r["run_id"] for r in online["not_ok"]} == {
        synthetic_store["failed"],
        synthetic_store["stopped"],
    }
    hv = online["hypervolume"][schema.OPS_EFFECTIVE]["groups"]
    assert hv["egru"]["hypervolume"] > hv["lstm"]["hypervolume"]  # sparser for the same quality


@pytest.mark.slow
def test_analyze_command_writes_the_report_and_logs_it_to_the_newest_parent(
    synthetic_store, tmp_path
):
    out = tmp_path / "analysis"
    result = cli(
        "analyze",
        "synth",
        "--tracking-uri",
        synthetic_store["uri"],
        "--out",
        str(out),
        "--bootstrap",
        "60",
        "--budget",
        "5%",
        "--budget",
        "130",
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["logged_to_run"] == synthetic_store["parents"][1]  # the newest launch
    client = synthetic_store["client"]
    logged = {a.path for a in client.list_artifacts(synthetic_store["parents"][1], "analysis")}
    assert {"analysis/report.html", "analysis/results.json", "analysis/runs.parquet"} <= logged
    assert not client.list_artifacts(synthetic_store["parents"][0])

    html = (out / "report.html").read_text()
    assert html.count("<script type='text/javascript'>") == 1  # plotly.js inlined once
    assert "<script src=" not in html.replace(" ", "")  # nothing loaded from the network
    front = payload["results"]["pareto"][schema.OPS_EFFECTIVE]
    for point in front:  # every front point: its run id and both splits' figures are in the page
        assert point["run_id"] in html
        assert json.dumps(point[runs.BEST_VAL_PPL]) in html
        assert json.dumps(point[schema.TEST_PPL]) in html
    assert payload["results"]["selection"]["selected_on"] == runs.BEST_VAL_PPL
    assert "validation perplexity (selection)" in html
    embedded = html.split("id='duosparse-results'>")[1].split("</script>")[0]
    assert json.loads(embedded.replace("<\\/", "</")) == payload["results"]
    assert {"ppl <= 130", "+5%"} == {e["budget"] for e in payload["results"]["iso_perplexity"]}

    # offline: the exported table, no tracking store, the same results
    offline = cli(
        "analyze",
        str(out / "runs.parquet"),
        "--out",
        str(tmp_path / "offline"),
        "--bootstrap",
        "60",
        "--budget",
        "5%",
        "--budget",
        "130",
        "--json",
    )
    assert offline.exit_code == 0, offline.output
    again = json.loads(offline.stdout)
    # ... but for the paired pruning cost, which re-evaluates the stored models
    online = {k: v for k, v in payload["results"].items() if k != "pruning_cost"}
    assert again["logged_to_run"] is None and again["results"] == online
    # these synthetic runs have no model.pt: each pair says so (tests/test_paired.py has real ones)
    costs = payload["results"]["pruning_cost"]
    assert costs and all("skipped" in e and "difference" not in e for e in costs)


@pytest.mark.slow
def test_a_run_logged_before_a_key_existed_groups_with_the_same_configuration(tmp_path):
    """A store keeps runs logged before model.unigram_decoder_bias and model.readout existed:
    they have no param for them, ran at their defaults, and are seeds of the same
    configuration as the runs logged after."""
    from mlflow.entities import Param

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = tracking.open_store(uri)
    exp = client.create_experiment("late", artifact_location=(tmp_path / "mlartifacts").as_uri())
    (old, metrics), (new, _) = synthetic_runs(seeds=(0, 1))[:2]
    assert old.model_dump(exclude={"train"}) == new.model_dump(exclude={"train"})
    for config, late_keys_logged in ((old, False), (new, True)):
        tags = tracking.run_tags(config, "trial", {schema.TAG_SWEEP: "late"})
        run_id = client.create_run(exp, tags=tags).info.run_id
        params = [
            Param(k, str(v))
            for k, v in config.flat().items()
            if late_keys_logged or k not in KEYS_OUT_OF_IDENTITY_AT_DEFAULT
        ]
        client.log_batch(run_id, params=params)
        tracking.MlflowReporter(client, run_id).log_metrics(metrics, step=1)
        tracking.finish_run(client, run_id)
    table = runs.runs_table("late", uri)
    assert table["model.readout"].tolist() == ["events", "events"]
    assert table["model.unigram_decoder_bias"].tolist() == [False, False]
    assert "model.readout" not in runs.varying_config(table)
    aggregated = runs.aggregate_seeds(table)
    assert len(aggregated) == 1 and aggregated[runs.N_SEEDS].iloc[0] == 2


@pytest.mark.slow
def test_a_finished_run_without_compute_counts_is_listed_and_left_out(tmp_path):
    """A FINISHED run that lacks the ops/* figures (stopped between its test and its
    accounting, or logged by another tool) is in the table but in no analysis."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = tracking.open_store(uri)
    exp = client.create_experiment("partial", artifact_location=(tmp_path / "mlartifacts").as_uri())
    items = synthetic_runs(seeds=(0,))
    bare_config = RunConfig.model_validate({"model": {"arch": "gru", "hidden_size": 96}})
    for config, metrics in [*items, (bare_config, {schema.VAL_PPL: 90.0, schema.TEST_PPL: 91.0})]:
        run_id = tracking.start_run(
            client, exp, config, kind="trial", tags={schema.TAG_SWEEP: "partial"}
        )
        tracking.MlflowReporter(client, run_id).log_metrics(metrics, step=1)
        tracking.finish_run(client, run_id)
    table = runs.runs_table("partial", uri)
    bare = table[table[runs.RUN_KEY] == bare_config.run_key]
    assert len(bare) == 1 and not bare[runs.OK].iloc[0]
    assert bare[schema.OPS_EFFECTIVE].isna().all() and int(table[runs.OK].sum()) == len(items)
    result = cli(
        "analyze",
        "partial",
        "--tracking-uri",
        uri,
        "--out",
        str(tmp_path / "out"),
        "--bootstrap",
        "50",
        "--no-log",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert bare_config.run_key not in json.dumps(json.loads(result.stdout)["results"])


def test_bad_input_is_one_paragraph_without_traceback(synthetic_store, tmp_path):
    uri = synthetic_store["uri"]
    configs = runs.write_table(
        runs.aggregate_seeds(runs.runs_table("synth", uri)), tmp_path / "c.csv"
    )
    for args, needle in [
        (["analyze", str(configs)], "not a run table"),
        (["analyze", "nosuch", "--tracking-uri", uri], "no experiment or sweep 'nosuch'"),
        (["analyze", "synth", "--budget", "lots"], "--budget"),
        (["analyze", str(tmp_path / "missing.csv")], "does not exist"),
        (["analyze", "synth", "--tracking-uri", uri, "--baseline-arch", "rnn"], "rnn"),
        (["export", "pareto", "synth", "--format", "png,gif"], "gif"),
    ]:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.stderr and "Traceback" not in result.output + result.stderr


# --- figures, report, static export ---------------------------------------------------------------


@pytest.mark.slow
def test_figures_hover_shows_run_ids_and_config():
    table = table_of(synthetic_runs(seeds=(0,)))
    results = study.analyze(table, n_boot=50)
    figs = figures.build_figures(table, results)
    assert {
        "pareto_effective_macs",
        "pareto_weight_sparse_macs",
        "pareto_total_macs",
        "tradeoff_fit",
        "heatmap_ppl",
        "heatmap_reduction",
        "activity_vs_weight",
        "effective_vs_estimate",
        "layer_activity",
    } <= set(figs)
    texts = [t for trace in figs["pareto_effective_macs"].data for t in (trace.text or [])]
    assert any(
        "run run000" in t and "prune.target_sparsity = " in t and "model.threshold" in t
        for t in texts
    )
    # SpiNNaker2 energy joins the Pareto axes once runs were simulated
    table[schema.spinnaker2("energy_per_token_j")] = table[schema.OPS_EFFECTIVE] * 1e-9
    assert "pareto_spinnaker2_energy" in figures.build_figures(
        table, study.analyze(table, n_boot=50)
    )


@pytest.mark.slow
@pytest.mark.system
def test_export_pareto_writes_valid_png_svg_pdf_and_html(synthetic_store, tmp_path):
    try:
        export.find_browser()
    except export.ExportError as e:
        require(False, f"{e} (`make test` installs Debian's chromium for this test)")
    table_path = runs.write_table(
        runs.runs_table("synth", synthetic_store["uri"]), tmp_path / "runs.parquet"
    )
    result = cli(
        "export",
        "pareto",
        str(table_path),
        "--format",
        "html,png,svg,pdf",
        "--out",
        str(tmp_path / "pareto"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    files = [Path(f) for f in json.loads(result.stdout)["files"]]
    assert {f.suffix for f in files} == {".html", ".png", ".svg", ".pdf"} and len(files) == 12
    for f in files:
        data = f.read_bytes()
        assert len(data) > 1000, f
        if f.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in data[-16:]
            width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            assert width >= 900 and height >= 500
        elif f.suffix == ".svg":
            assert ET.fromstring(data).tag.endswith("svg")
        elif f.suffix == ".pdf":
            assert data.startswith(b"%PDF-") and b"%%EOF" in data[-64:]
        else:
            assert b"Plotly.newPlot" in data
    html = (tmp_path / "pareto" / "pareto_effective_macs.html").read_text()
    assert runs.runs_table("synth", synthetic_store["uri"])[runs.RUN_ID].iloc[0] in html


def test_missing_browser_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    with pytest.raises(export.ExportError, match="apt-get install chromium") as err:
        export.find_browser()
    assert "BROWSER_PATH" in str(err.value)
    monkeypatch.delenv("BROWSER_PATH")
    monkeypatch.setenv("PATH", str(tmp_path))
    # what kaleido's own discovery answers on a machine without any browser
    from choreographer.browsers import Chromium

    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **_: None))
    with pytest.raises(export.ExportError, match="apt-get install chromium"):
        export.find_browser()
    result = cli("export", "pareto", "anything", "--format", "html,png")
    assert result.exit_code == 2 and "apt-get install chromium" in result.stderr


@pytest.mark.slow
def test_the_command_line_starts_without_the_analysis_layer():
    # `duosparse --help` and bad-input errors stay fast: pandas' figures, plotly and scipy
    # load only in the commands that use them (the layering itself: tests/test_layout.py)
    code = (
        "import sys, duosparse.cli; "
        "bad = [m for m in sys.modules if m.startswith(('duosparse.analysis', "
        "'duosparse.dashboards', 'plotly', 'scipy'))]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real sweep: Ray Tune trials logged to MLflow, read back ------------------------------------


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smoke_analysis")
    spec = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    spec["name"] = "smoke_analysis"
    (folder / "smoke.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run(
        [DUOSPARSE, "sweep", "run", "smoke.yaml", "--json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, f"sqlite:///{folder / 'mlruns.db'}"


@pytest.mark.slow
def test_run_table_round_trips_from_a_real_mlflow_store(smoke_sweep, tmp_path):
    folder, uri = smoke_sweep
    table = runs.runs_table("smoke_analysis", uri)
    assert len(table) == 4 and table[runs.OK].all() and (table[runs.KIND] == "trial").all()
    assert set(table["model.arch"]) == {"lstm", "egru"}
    assert sorted(table["prune.target_sparsity"]) == [0.0, 0.0, 0.5, 0.5]
    assert (
        table.dtypes["train.max_steps_per_epoch"] == "Int64"
        and (table["train.max_steps_per_epoch"] == 10).all()
    )
    metrics = (*schema.RUN_METRICS, runs.BEST_VAL_PPL)
    for name in (*metrics, schema.layer_activity(0), schema.layer_activity(1)):
        assert table.dtypes[name] == "float64" and table[name].notna().all(), name
    client = MlflowClient(uri)
    for _, row in table.iterrows():
        run = client.get_run(row[runs.RUN_ID])
        assert run.data.metrics[schema.TEST_PPL] == row[schema.TEST_PPL]
        history = [m.value for m in client.get_metric_history(row[runs.RUN_ID], schema.VAL_PPL)]
        assert row[runs.BEST_VAL_PPL] in history and row[runs.BEST_VAL_PPL] <= row[schema.VAL_PPL]
        # the typed columns rebuild the very config the run was trained with
        tree: dict = {}
        for key in runs.config_columns(table):
            set_dotted(
                tree,
                key,
                row[key]
                if isinstance(row[key], tuple)  # list-valued keys (train.betas, step_epochs)
                else None
                if pd.isna(row[key])
                else row[key].item()
                if hasattr(row[key], "item")
                else row[key],
            )
        assert (
            RunConfig.model_validate(tree).run_key
            == row[runs.RUN_KEY]
            == run.data.tags[schema.TAG_RUN_KEY]
        )
    for suffix in ("csv", "parquet"):
        back = runs.read_table(runs.write_table(table, tmp_path / f"runs.{suffix}"))
        pd.testing.assert_frame_equal(back, table)

    # the spec path names the experiment and store; the report lands on the launch's parent run
    result = cli(
        "analyze",
        str(folder / "smoke.yaml"),
        "--out",
        str(tmp_path / "out"),
        "--bootstrap",
        "50",
        "--tracking-uri",
        uri,
    )
    assert result.exit_code == 0, result.output
    parent = runs.newest_parent_run(client, table.attrs["experiment_ids"], "smoke_analysis")
    assert "analysis/report.html" in {a.path for a in client.list_artifacts(parent, "analysis")}
    assert "Report:" in result.stderr and "make ui" in result.stderr
