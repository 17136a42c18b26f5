"""Search sweeps (`search:` in a spec): validation before anything starts, the searcher's
determinism, objectives from what runs log, the per-trial hypervolume; real searches on Ray
Tune with the synthetic corpus (slow): end to end, dedup of a FINISHED config, kill and
--resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from duosparse import schema
from duosparse.analysis import pareto
from duosparse.analysis.runs import BEST_VAL_PPL, OK, START_TIME, STATUS
from duosparse.sweep import SpecError, parse_spec, search_bases

DUOSPARSE = str(Path(sys.executable).with_name("duosparse"))
BASE = {
    "data": {"corpus": "synthetic"},
    "model": {
        "arch": "egru",
        "embedding_size": 16,
        "hidden_size": 16,
        "num_layers": 1,
        "tie_weights": False,
    },
    "prune": {"schedule": "oneshot", "start_epoch": 1},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 8,
        "max_steps_per_epoch": 10,
        "max_eval_batches": 4,
    },
}
SEARCH = {
    "space": {
        "prune.target_sparsity": {"uniform": [0.0, 0.9]},
        "model.threshold": {"uniform": [0.01, 0.1]},
    },
    "objectives": {"val/ppl": "min", "ops/effective_macs_per_token": "min"},
    "num_samples": 4,
    "seed": 0,
}


def tree(name: str = "s", search: dict | None = None, **top) -> dict:
    return {
        "name": name,
        "base": json.loads(json.dumps(BASE)),
        "search": json.loads(json.dumps(search or SEARCH)),
        "resources": {"cpu": 1},
        "max_concurrent": 2,
        **top,
    }


def with_search(**changes) -> dict:
    return tree(search={**SEARCH, **changes})


# --- validation: refused before anything starts, naming the key ------------------------------


BAD = {
    "objective not logged": (
        with_search(objectives={"val/perplexity": "min"}),
        ["val/perplexity", "not a metric the training logs"],
    ),
    "objective logged only by simulate": (
        with_search(objectives={"hw/spinnaker2/energy_per_token_j": "min"}),
        ["hw/spinnaker2/energy_per_token_j", "duosparse simulate"],
    ),
    "constraint on an unknown metric": (
        with_search(constraint="ops/macs <= 20000"),
        ["ops/macs", "constraint"],
    ),
    "bound outside the key's range": (
        with_search(space={"prune.target_sparsity": {"uniform": [0.5, 1.2]}}),
        ["prune.target_sparsity", "1.2"],
    ),
    "num_samples 0": (with_search(num_samples=0), ["num_samples"]),
    "a key in grid and search": (
        tree(grid={"prune.target_sparsity": [0.5, 0.9]}),
        ["prune.target_sparsity", "grid"],
    ),
    "not a RunConfig key": (
        with_search(space={"prune.level": {"uniform": [0.1, 0.5]}}),
        ["prune.level"],
    ),
    "loguniform from 0": (
        with_search(space={"train.lr": {"loguniform": [0.0, 0.01]}}),
        ["train.lr", "positive"],
    ),
    "loguniform_complement up to 1": (
        with_search(space={"prune.target_sparsity": {"loguniform_complement": [0.5, 1.0]}}),
        ["prune.target_sparsity", "below 1"],
    ),
    "two forms in one dimension": (
        with_search(space={"train.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}),
        ["train.lr", "exactly one"],
    ),
    "a bad constraint": (with_search(constraint="val/ppl < 200"), ["val/ppl < 200"]),
    "an unknown algorithm": (with_search(algorithm="cmaes"), ["algorithm", "cmaes"]),
    "an unknown start-up design": (with_search(startup_design="lhs"), ["startup_design", "lhs"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_search_is_refused_naming_the_key(case):
    spec, words = BAD[case]
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    message = str(e.value)
    assert all(w in message for w in words), message
    assert "\n" not in message.strip()


@pytest.mark.slow
def test_bad_search_exits_2_and_creates_nothing(tmp_path):
    spec, _ = BAD["a key in grid and search"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    result = subprocess.run(
        [DUOSPARSE, "sweep", "run", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "prune.target_sparsity" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no store, no runs/


def test_a_valid_search_parses_and_has_no_trials_up_front():
    spec = parse_spec(tree())
    assert spec.searches and spec.search.keys == ["prune.target_sparsity", "model.threshold"]
    (base,) = search_bases(spec, None).values()
    assert base["model"]["arch"] == "egru" and base["train"]["seed"] == 0
    spec = parse_spec(with_search(constraint="ops/effective_macs_per_token <= 20000"))
    assert spec.search.parsed_constraint() == ("ops/effective_macs_per_token", "<=", 20000.0)


def test_grid_axes_beside_a_search_become_categoricals():
    from duosparse import sweep_search

    spec = parse_spec(tree(grid={"train.lr": [0.001, 0.003]}))
    bases = search_bases(spec, None)
    space = sweep_search.space_for(spec, None, bases, [])
    assert space.grid == {"train.lr": [0.001, 0.003]}


# --- the searcher ----------------------------------------------------------------------------


def _searcher(max_concurrent: int, **changes):
    """The searcher `sweep run` builds for SEARCH with `changes`, outside Tune."""
    from duosparse import sweep_search

    spec = parse_spec(with_search(**changes))
    space = sweep_search.space_for(spec, None, search_bases(spec, None), [])
    return sweep_search.make_searcher(spec.search, space, max_concurrent=max_concurrent)


def _suggestions(seed: int, n: int = 5, algorithm: str = "tpe") -> list[dict]:
    searcher = _searcher(n, seed=seed, algorithm=algorithm)
    out = []
    for i in range(n):  # one at a time: past the start-up trials the model proposes
        out.append(searcher.suggest(f"t{i}"))
        result = {"objective_0": 100.0 + i, "objective_1": 1000.0 - 50 * i}
        searcher.on_trial_complete(f"t{i}", result)
    return out


@pytest.mark.slow  # imports Ray Tune and Optuna
@pytest.mark.parametrize("algorithm", ["tpe", "nsga2", "gp"])
def test_the_searcher_is_deterministic_for_a_seed(algorithm):
    a, b = _suggestions(0, algorithm=algorithm), _suggestions(0, algorithm=algorithm)
    c = _suggestions(1, algorithm=algorithm)
    assert a == b
    assert a != c
    assert all(0.0 <= p["prune.target_sparsity"] <= 0.9 for p in a)
    assert all(0.01 <= p["model.threshold"] <= 0.1 for p in a)


@pytest.mark.slow  # imports Ray Tune and Optuna
@pytest.mark.parametrize(
    "algorithm, sampler", [("tpe", "TPESampler"), ("nsga2", "NSGAIISampler"), ("gp", "GPSampler")]
)
def test_each_algorithm_is_its_optuna_sampler_and_reads_the_constraint(algorithm, sampler):
    from duosparse import sweep_search

    searcher = _searcher(1, algorithm=algorithm, constraint="ops/effective_macs_per_token <= 800")
    assert type(searcher.searcher._sampler).__name__ == sampler
    for i in range(5):  # past the 2 start-up trials, the model proposes under the constraint
        point = searcher.suggest(f"t{i}")
        macs = 1000.0 * (1.0 - point["prune.target_sparsity"])
        result = {
            "objective_0": 100.0 + 50.0 * point["prune.target_sparsity"],
            "objective_1": macs,
            sweep_search.CONSTRAINT_RESULT: macs - 800.0,
        }
        searcher.on_trial_complete(f"t{i}", result)
    trials = searcher.searcher._ot_study.get_trials()
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:  # what the samplers read: <= 0 is feasible
        macs = t.values[1]
        assert t.constraints == {"constraint": pytest.approx(macs - 800.0)}


STUDY_BOX = {  # the Pareto-search study's box: the weights kept log-uniform, a uniform threshold
    "prune.target_sparsity": {"loguniform_complement": [0.5, 0.95]},
    "model.threshold": {"uniform": [0.01, 0.1]},
}


def _quantiles(point: dict) -> tuple[float, float]:
    """Where a point of STUDY_BOX lies in each dimension's distribution, from 0 to 1."""
    kept = 1.0 - point["prune.target_sparsity"]
    return (
        math.log(kept / 0.05) / math.log(0.5 / 0.05),  # 1 - level, log-uniform in [0.05, 0.5]
        (point["model.threshold"] - 0.01) / 0.09,
    )


@pytest.mark.slow  # imports Ray Tune and Optuna
@pytest.mark.parametrize("algorithm", ["tpe", "nsga2", "gp"])
def test_a_sobol_start_proposes_the_scrambled_sobol_points_then_the_sampler_takes_over(algorithm):
    from scipy.stats import qmc

    for seed in (0, 3):
        searcher = _searcher(
            2, space=STUDY_BOX, algorithm=algorithm, startup_design="sobol", seed=seed
        )
        start = [searcher.suggest("t0"), searcher.suggest("t1")]
        # the seed's first two scrambled Sobol points, mapped through each distribution's
        # quantile function (the Optuna name of a complement is `1 - KEY`: the run gets KEY)
        expected = qmc.Sobol(d=2, scramble=True, rng=seed).random(2)
        assert np.allclose([_quantiles(p) for p in start], expected, atol=1e-12)
        again = _searcher(
            2, space=STUDY_BOX, algorithm=algorithm, startup_design="sobol", seed=seed
        )
        assert [again.suggest("t0"), again.suggest("t1")] == start
        for i in range(2):
            searcher.on_trial_complete(f"t{i}", {"objective_0": 100.0 + i, "objective_1": 50.0})
        after = searcher.suggest("t2")  # the sampler's own point, inside the box
        assert after not in start and 0.5 <= after["prune.target_sparsity"] <= 0.95
        trials = searcher.searcher._ot_study.get_trials()
        assert len(trials) == 3 and [t.state.name for t in trials[:2]] == ["COMPLETE"] * 2


@pytest.mark.slow  # imports Ray Tune and Optuna
def test_two_sobol_start_points_split_every_dimension_where_random_ones_need_not():
    # two scrambled Sobol points lie in opposite halves of each dimension, for every seed;
    # two independent draws share a half of a given dimension half the time
    split = {"sobol": 0, "random": 0}
    for design in split:
        for seed in range(20):
            searcher = _searcher(2, space=STUDY_BOX, startup_design=design, seed=seed)
            a, b = (_quantiles(searcher.suggest(f"t{i}")) for i in range(2))
            split[design] += all((x < 0.5) != (y < 0.5) for x, y in zip(a, b))
    assert split["sobol"] == 20
    assert split["random"] < 15  # 20 seeds, each split in both dimensions with p = 1/4


@pytest.mark.slow  # imports Ray Tune and Optuna
def test_a_sobol_start_covers_integer_choice_and_grid_dimensions():
    from duosparse import sweep_search

    space = {
        "model.hidden_size": {"int": [8, 32]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "model.threshold": {"choice": [0.01, 0.05, 0.1]},
    }
    spec = parse_spec(
        tree(
            search={
                **SEARCH,
                "space": space,
                "startup_design": "sobol",
                "startup_trials": 8,
                "num_samples": 10,
            },
            grid={"model.num_layers": [1, 2]},
        )
    )
    search_space = sweep_search.space_for(spec, None, search_bases(spec, None), [])
    searcher = sweep_search.make_searcher(spec.search, search_space, max_concurrent=8)
    points = [searcher.suggest(f"t{i}") for i in range(8)]
    assert points == search_space.startup_points(8, 0)  # enqueued, and taken as given
    assert {p["model.num_layers"] for p in points} == {1, 2}  # the grid axis, 4 points each
    assert sum(p["model.num_layers"] == 1 for p in points) == 4
    assert all(
        isinstance(p["model.hidden_size"], int) and 8 <= p["model.hidden_size"] <= 32
        for p in points
    )
    assert all(1e-4 <= p["train.lr"] <= 1e-2 for p in points)
    # 8 Sobol points put 4 in each half of the log learning rate
    assert sum(p["train.lr"] < 1e-3 for p in points) == 4
    assert {p["model.threshold"] for p in points} == {0.01, 0.05, 0.1}


@pytest.mark.slow  # imports Ray Tune and Optuna
def test_a_restored_sobol_searcher_proposes_the_rest_of_its_start_once(tmp_path):
    # Tune saves the searcher beside the experiment and a resumed sweep builds a fresh one (which
    # enqueues the start again) before restoring it: the saved study wins, so a start-up point
    # already proposed is not proposed twice, and one not yet proposed is not forgotten
    first = _searcher(1, space=STUDY_BOX, startup_design="sobol")
    t0 = first.suggest("t0")
    first.save(str(tmp_path / "searcher.pkl"))
    resumed = _searcher(1, space=STUDY_BOX, startup_design="sobol")
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_complete("t0", {"objective_0": 100.0, "objective_1": 50.0})
    t1 = resumed.suggest("t1")
    resumed.on_trial_complete("t1", {"objective_0": 120.0, "objective_1": 40.0})
    t2 = resumed.suggest("t2")
    fresh = _searcher(2, space=STUDY_BOX, startup_design="sobol")
    assert [t0, t1] == [fresh.suggest("t0"), fresh.suggest("t1")]
    assert t2 not in (t0, t1)
    assert len(resumed.searcher._ot_study.get_trials()) == 3


def _proposals_as_tune_drives(
    batched: bool, newest_first: bool, n: int = 6, startup_design: str = "sobol"
) -> list[dict]:
    """Drive the searcher as Tune does with 2 slots: ask for points until it gives none, then
    let one running trial finish (the newest or the oldest: which one wins the race), repeat.
    A trial's objectives depend only on its point, never on when it ran."""
    searcher = _searcher(2, num_samples=n, batched=batched, startup_design=startup_design)
    proposed, running, done = [], [], 0
    while done < n:
        while len(proposed) < n:
            trial_id = f"t{len(proposed)}"
            point = searcher.suggest(trial_id)
            if point is None:
                break
            proposed.append(point)
            running.append((trial_id, point))
        trial_id, point = running.pop(-1 if newest_first else 0)
        result = {  # perplexity rises with the threshold and the pruning, MACs fall
            "objective_0": 400.0
            + 300.0 * point["model.threshold"]
            + 50.0 * point["prune.target_sparsity"],
            "objective_1": 10_000.0 * (1.0 - point["prune.target_sparsity"]),
        }
        searcher.on_trial_complete(trial_id, result)
        done += 1
    return proposed


@pytest.mark.slow  # imports Ray Tune and Optuna
def test_a_batched_search_proposes_the_same_points_whichever_trial_finishes_first():
    for design in ("sobol", "random"):
        batched = [_proposals_as_tune_drives(True, f, startup_design=design) for f in (False, True)]
        assert len(batched[0]) == 6 and batched[0] == batched[1]
    # unbatched, the race decides what the searcher has seen when it proposes (shown from a
    # random start: from this Sobol start the two orders happen to propose the same points)
    racing = [
        _proposals_as_tune_drives(False, newest_first=f, startup_design="random")
        for f in (False, True)
    ]
    assert len(racing[0]) == 6 and racing[0] != racing[1]
    assert racing[0][:3] == racing[1][:3]  # the start is the seed's either way


def test_a_sampled_point_becomes_a_runconfig_with_integers_rounded():
    from duosparse import sweep_search

    spec = parse_spec(with_search(space={"model.hidden_size": {"uniform": [8, 32]}}))
    bases = search_bases(spec, None)
    context = sweep_search.search_context(spec, None, bases, {})
    assert context["int_keys"] == ["model.hidden_size"]
    config = sweep_search.trial_config(context, {"model.hidden_size": 12.6})
    assert config.model.hidden_size == 13
    # the same point is the same run_key: what dedup and resume rely on
    assert config.run_key == sweep_search.trial_config(context, {"model.hidden_size": 13}).run_key


def test_a_loguniform_complement_draws_the_weights_kept_log_uniformly():
    import optuna
    from duosparse import sweep_search

    space = {"prune.target_sparsity": {"loguniform_complement": [0.5, 0.95]}}
    spec = parse_spec(with_search(space=space))
    context = sweep_search.search_context(spec, None, search_bases(spec, None), {})
    search_space = sweep_search.space_for(spec, None, search_bases(spec, None), [])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    levels = []
    for _ in range(400):
        trial = study.ask()
        returned = search_space(trial)
        # Optuna models 1 - level; the trial's config carries the level itself
        (name,) = trial.params
        assert name == sweep_search.COMPLEMENT + "prune.target_sparsity"
        level = returned["prune.target_sparsity"]
        assert level == pytest.approx(1 - trial.params[name]) and 0.5 <= level <= 0.95
        sampled = sweep_search.sampled_keys({**trial.params, **returned, "search": context})
        assert sampled == {"prune.target_sparsity": level}
        assert sweep_search.trial_config(context, sampled).prune.target_sparsity == level
        levels.append(level)
    # log-uniform weights kept in [0.05, 0.5]: P(level > 0.9) = log(0.1/0.05) / log(0.5/0.05)
    # = 0.301 (a uniform level would give 0.05 / 0.45 = 0.111); 400 draws: sd 0.023
    above = np.mean(np.array(levels) > 0.9)
    assert abs(above - math.log(2) / math.log(10)) < 0.07


class _Metric:
    def __init__(self, step, value):
        self.step, self.value = step, value


class _Run:
    def __init__(self, status, metrics):
        self.info = type("I", (), {"status": status, "run_id": "r"})()
        self.data = type("D", (), {"metrics": metrics})()


class _Client:
    def __init__(self, run, history):
        self.run, self.history = run, history

    def get_run(self, run_id):
        return self.run

    def get_metric_history(self, run_id, key):
        return self.history


def test_objectives_are_read_from_what_the_run_logged():
    from duosparse import sweep_search
    from duosparse.config import RunConfig

    config = RunConfig.model_validate(
        {
            "prune": {"schedule": "oneshot", "start_epoch": 2, "target_sparsity": 0.5},
            "train": {"epochs": 3},
        }
    )
    history = [_Metric(1, 90.0), _Metric(2, 120.0), _Metric(3, 110.0)]
    run = _Run("FINISHED", {schema.VAL_PPL: 110.0, schema.OPS_EFFECTIVE: 5000.0})
    context = {
        "objectives": [schema.VAL_PPL, schema.OPS_EFFECTIVE],
        "constraint": [schema.OPS_EFFECTIVE, "<=", 4000.0],
    }
    result = sweep_search.search_result(_Client(run, history), "r", config, context)
    # the best validation perplexity at the final sparsity (epochs >= 2), not epoch 1's
    assert result == {"objective_0": 110.0, "objective_1": 5000.0, "constraint_value": 1000.0}
    failed = sweep_search.search_result(_Client(run, history), None, config, context)
    assert all(math.isnan(v) for v in failed.values())


# --- hypervolume per trial, and two sweeps on one reference -------------------------------------


def _table(points: list[tuple[float, float]], start: int = 0) -> pd.DataFrame:
    n = len(points)
    return pd.DataFrame(
        {
            schema.OPS_EFFECTIVE: [c for c, _ in points],
            BEST_VAL_PPL: [p for _, p in points],
            schema.TEST_PPL: [p + 1 for _, p in points],
            START_TIME: pd.to_datetime(np.arange(start, start + n), unit="s", utc=True),
            OK: [True] * n,
            STATUS: ["FINISHED"] * n,
        }
    )


def test_hypervolume_by_trial_never_falls_and_ends_at_the_whole_front():
    table = _table([(1000, 150), (100, 200), (500, 160), (2000, 140), (800, 300)])
    rows = pareto.hypervolume_by_trial(table)
    hv = [r["hypervolume"] for r in rows]
    assert len(rows) == 5 and all(b >= a for a, b in zip(hv, hv[1:]))
    reference = pareto.reference_point(table, schema.OPS_EFFECTIVE)
    pts = np.c_[np.log10(table[schema.OPS_EFFECTIVE]), table[BEST_VAL_PPL]]
    assert hv[-1] == pytest.approx(pareto.hypervolume_2d(pts, reference))
    assert rows[-1]["front_size"] == 4  # (800, 300) is dominated


def test_compare_sweeps_shares_one_reference_and_gives_ratios():
    grid = _table([(1000, 150), (100, 200), (500, 160), (2000, 140)])
    search = _table([(1000, 150), (100, 200)], start=10)
    out = pareto.compare_sweeps({"grid": grid, "search": search})
    assert out["sweeps"]["grid"]["ratio_to_first"] == 1.0
    assert 0 < out["sweeps"]["search"]["ratio_to_first"] < 1
    assert out["sweeps"]["search"]["by_trial"][-1]["hypervolume"] == pytest.approx(
        out["sweeps"]["search"]["hypervolume"]
    )
    assert len(out["sweeps"]["grid"]["front"]) == 4


# --- real searches on Ray Tune (slow) ----------------------------------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def duosparse(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DUOSPARSE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def write(folder: Path, spec: dict) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def runs_of(folder: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    kind = schema.TAG_KIND
    return (
        client,
        [r for r in runs if r.data.tags.get(kind) == "trial"],
        [r for r in runs if r.data.tags.get(kind) == "sweep"],
    )


# the prune level as a loguniform_complement, the threshold uniform: both forms through Tune
E2E_SEARCH = {
    **SEARCH,
    "space": {**SEARCH["space"], "prune.target_sparsity": {"loguniform_complement": [0.0, 0.9]}},
    "constraint": "ops/effective_macs_per_token <= 1000000",
}


@pytest.mark.slow
def test_a_search_runs_end_to_end_and_analyze_shows_hypervolume_per_trial(tmp_path):
    from duosparse import sweep_search

    spec = write(
        tmp_path,
        tree("e2e", search=E2E_SEARCH),
    )
    result = duosparse("sweep", "run", str(spec), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    out = json.loads(result.stdout)
    assert out["counts"] == {"FINISHED": 4}
    client, trials, launches = runs_of(tmp_path, "e2e")
    (launch,) = launches
    assert len(trials) == 4 and len({r.data.tags[schema.TAG_RUN_KEY] for r in trials}) == 4
    for run in trials:
        assert run.data.tags[schema.TAG_PARENT_RUN_ID] == launch.info.run_id
        assert run.data.tags[schema.TAG_SEARCH] == "tpe, seed 0"
        assert schema.VAL_PPL in run.data.metrics and schema.OPS_EFFECTIVE in run.data.metrics
        sparsity = float(run.data.params["prune.target_sparsity"])
        assert 0.0 <= sparsity <= 0.9
        assert not any(k.startswith(sweep_search.COMPLEMENT) for k in run.data.params)
    assert schema.search_done_tag(None) in launch.data.tags
    # a second launch has nothing to do; status is unchanged in form
    again = duosparse("sweep", "run", str(spec), "--json", cwd=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["counts"] == {"FINISHED": 4}
    assert len(runs_of(tmp_path, "e2e")[1]) == 4
    analysis = duosparse(
        "analyze", str(spec), "--json", "--bootstrap", "50", "--out", "an", cwd=tmp_path
    )
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    results = json.loads(analysis.stdout)["results"]
    by_trial = results["search"]["by_trial"]
    assert [r["trial"] for r in by_trial] == [1, 2, 3, 4]
    assert by_trial[-1]["hypervolume_normalized"] > 0
    assert "search_progress" in (tmp_path / "an" / "report.html").read_text()


@pytest.mark.slow
def test_a_search_reuses_a_finished_config_without_training_it(tmp_path):
    # a grid runs one config; a search in the same experiment whose only point is that config
    grid = write(
        tmp_path,
        {
            "name": "dedup_grid",
            "base": BASE,
            "grid": {"prune.target_sparsity": [0.5]},
            "tracking": {"experiment": "shared"},
            "resources": {"cpu": 1},
        },
    )
    assert duosparse("sweep", "run", str(grid), cwd=tmp_path).returncode == 0
    _, before, _ = runs_of(tmp_path, "shared")
    search = {**SEARCH, "space": {"prune.target_sparsity": {"choice": [0.5]}}, "num_samples": 2}
    spec = write(tmp_path, tree("dedup_search", search=search, tracking={"experiment": "shared"}))
    result = duosparse("sweep", "run", str(spec), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, after, launches = runs_of(tmp_path, "shared")
    assert [r.info.run_id for r in after] == [r.info.run_id for r in before]  # nothing trained
    (run,) = after
    assert run.data.tags[schema.TAG_SWEEP] == "dedup_grid"
    history = client.get_metric_history(run.info.run_id, schema.VAL_LOSS)
    assert sorted(m.step for m in history) == [1, 2]  # trained once
    search_launch = [r for r in launches if r.data.tags[schema.TAG_SWEEP] == "dedup_search"]
    assert schema.search_done_tag(None) in search_launch[0].data.tags


EPOCHS_KILLED = 12


@pytest.mark.slow
# batched, 2 at a time: the kill lands in the second batch, whose state (the trials proposed,
# any already finished) Tune saves with the searcher's
@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_a_killed_search_resumes_with_every_sample_once(tmp_path, batched):
    search = {**SEARCH, "num_samples": 5, "batched": batched}
    base = json.loads(json.dumps(BASE))
    # long enough trials that the kill lands mid-trial even on a loaded machine (with 4 short
    # epochs the poll could miss every trial's middle and the search end before the kill)
    base["train"].update(epochs=EPOCHS_KILLED, max_steps_per_epoch=25)
    concurrent = 2 if batched else 1
    spec = write(
        tmp_path, {**tree("killed", search=search), "base": base, "max_concurrent": concurrent}
    )
    driver = subprocess.Popen(
        [DUOSPARSE, "sweep", "run", str(spec)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    while True:  # two trials FINISHED and the third two epochs in
        assert time.monotonic() < deadline and driver.poll() is None, "never got midway"
        try:
            client, trials, _ = runs_of(tmp_path, "killed")
        except Exception:  # the store is not there yet
            trials = []
        done = [r for r in trials if r.info.status == "FINISHED"]
        running = [r for r in trials if r.info.status == "RUNNING"]
        if len(done) >= 2 and running:
            history = client.get_metric_history(running[0].info.run_id, schema.VAL_LOSS)
            if len(history) >= 2:
                break
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    status = json.loads(duosparse("sweep", "status", str(spec), "--json", cwd=tmp_path).stdout)
    assert any("samples to go" in t["reason"] for t in status["trials"]), status
    result = duosparse("sweep", "run", str(spec), "--resume", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client, trials, launches = runs_of(tmp_path, "killed")
    keys = [r.data.tags[schema.TAG_RUN_KEY] for r in trials]
    assert len(keys) == 5 and len(set(keys)) == 5, keys  # none repeated, none forgotten
    assert all(r.info.status == "FINISHED" for r in trials)
    for run in trials:  # each trained once: every epoch logged, at most one repeated
        steps = [m.step for m in client.get_metric_history(run.info.run_id, schema.VAL_LOSS)]
        assert set(steps) == set(range(1, EPOCHS_KILLED + 1)), steps
        assert len(steps) <= EPOCHS_KILLED + 1, steps
    for run in done:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, schema.VAL_LOSS)]
        assert steps == list(range(1, EPOCHS_KILLED + 1))  # finished before the kill: untouched
    last = max(launches, key=lambda r: r.info.start_time)
    assert last.info.status == "FINISHED" and schema.search_done_tag(None) in last.data.tags
    # --resume restored the interrupted Tuner and its searcher (a fresh one would have removed
    # the folder and drawn anew): both launches' states, one trial folder per sample
    state = tmp_path / "runs" / "tune" / "killed"
    assert len(list(state.glob("experiment_state-*.json"))) >= 2
    assert len(list(state.glob("searcher-state-*.pkl"))) >= 2
    assert len([p for p in state.glob("run_trial_*") if p.is_dir()]) == 5


def test_a_search_stage_warm_starts_from_each_run_of_a_grid_stage():
    from duosparse import sweep_search

    spec = parse_spec(
        {
            "name": "staged",
            "base": BASE,
            "stages": [
                {"name": "dense", "grid": {"model.threshold": [0.02, 0.05]}},
                {
                    "name": "prune",
                    "from": "dense",
                    "search": {
                        **SEARCH,
                        "space": {"prune.target_sparsity": {"uniform": [0.5, 0.9]}},
                    },
                },
            ],
        }
    )
    bases = search_bases(spec, "prune")
    assert len(bases) == 2 and all(b["init"]["from_run_key"] == k for k, b in bases.items())
    context = sweep_search.search_context(spec, "prune", bases, {})
    space = sweep_search.space_for(spec, "prune", bases, context["int_keys"])
    assert space.parents == list(bases)
    parent = list(bases)[1]
    config = sweep_search.trial_config(
        context, {"init.from_run_key": parent, "prune.target_sparsity": 0.7}
    )
    assert config.init.from_run_key == parent and config.model.threshold == 0.05


def test_a_warm_started_search_stage_may_not_change_the_model_shape():
    with pytest.raises(SpecError, match="model.hidden_size"):
        parse_spec(
            {
                "name": "staged",
                "base": BASE,
                "stages": [
                    {"name": "dense", "grid": {"model.threshold": [0.02]}},
                    {
                        "name": "prune",
                        "from": "dense",
                        "search": {**SEARCH, "space": {"model.hidden_size": {"int": [8, 16]}}},
                    },
                ],
            }
        )


@pytest.mark.slow
def test_a_search_stage_warm_starts_from_the_dense_stage(tmp_path):
    spec = write(
        tmp_path,
        {
            "name": "staged",
            "base": BASE,
            "stages": [
                {"name": "dense", "grid": {"model.threshold": [0.05]}},
                {
                    "name": "prune",
                    "from": "dense",
                    "base": {"train": {"epochs": 1}},
                    "search": {
                        **SEARCH,
                        "space": {"prune.target_sparsity": {"uniform": [0.5, 0.9]}},
                        "num_samples": 2,
                    },
                },
            ],
            "resources": {"cpu": 1},
        },
    )
    result = duosparse("sweep", "run", str(spec), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["counts"] == {"FINISHED": 3}
    _, trials, _ = runs_of(tmp_path, "staged")
    (dense,) = [r for r in trials if r.data.tags.get(schema.TAG_STAGE) == "dense"]
    pruned = [r for r in trials if r.data.tags.get(schema.TAG_STAGE) == "prune"]
    assert len(pruned) == 2
    for run in pruned:
        assert run.data.tags[schema.TAG_SEARCH] == "tpe, seed 0"
        assert run.data.params["init.from_run_key"] == dense.data.tags[schema.TAG_RUN_KEY]
