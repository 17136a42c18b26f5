"""Search stages: Optuna's multi-objective TPE, NSGA-II or Gaussian-process Bayesian
optimisation through Ray Tune's OptunaSearch.

A search stage runs one Tuner whose `search_alg` (wrapped in a ConcurrencyLimiter with the
spec's max_concurrent) proposes `num_samples` points of the box in the spec's `search:`.
Every point becomes a RunConfig (the stage's base with the sampled keys set, integers
rounded), an ordinary trial with its run_key, its MLflow child run under the launch, the same
retries and resume files (sweep_runner.run_trial does the work).

- Objectives are read back from what the run logged (`objectives`): `val/ppl` is the best
  validation perplexity among the epochs at the final sparsity (the figure the analysis
  selects on, analysis/runs.py's `val/best_ppl`), any other metric its last value.
- A point whose run_key already FINISHED in the store is not trained again: its logged
  objectives are reported, so the searcher still learns from it.
- A failed trial reports NaN objectives: Optuna records it FAILED and samples elsewhere.
- The constraint is Optuna's own: when a trial completes, its constraint value (<= 0 is
  feasible; `METRIC <= B` gives METRIC - B) is set on the Optuna trial (`set_constraint`,
  Optuna >= 5, which TPE, NSGA-II and the GP sampler all read; `constraints_func` is
  deprecated there) before Optuna is told its objectives. The objectives stay the true
  figures (no penalty), so the front of all trials is still the analysis' front.
- `--resume` restores the Tuner, and with it the searcher's state (Tune saves it beside the
  experiment state): the trials it already proposed are neither repeated nor forgotten.
"""

from __future__ import annotations

import json
import math
from typing import Any

from . import pruning, schema
from .config import RunConfig, build_config, set_dotted
from .sweep import Dimension, Search, SweepSpec


def objective_name(i: int) -> str:
    """What Tune and the searcher call objective i (metric names hold '/', which Tune splits)."""
    return f"objective_{i}"


CONSTRAINT_RESULT = "constraint_value"
# the searcher's name for 1 - KEY of a loguniform_complement dimension (KEY itself is set on
# the trial's config beside it)
COMPLEMENT = "1 - "


# --- the space, as an Optuna define-by-run function (picklable: the searcher is saved) -----


class SearchSpace:
    """Define-by-run space: the search's dimensions, grid axes as categoricals, conditional
    dimensions where `when` matches the values drawn so far (or the base's), and the warm
    start as a categorical over the parent runs when there are several."""

    def __init__(
        self,
        search: Search,
        base_flat: dict[str, Any],
        int_keys: list[str],
        grid: dict[str, list[Any]] | None = None,
        parents: list[str] | None = None,
    ):
        self.dimensions = dict(search.space)
        self.conditional = [(dict(c.when), dict(c.space)) for c in search.conditional]
        self.base_flat, self.int_keys = base_flat, set(int_keys)
        self.grid = grid or {}
        self.parents = parents or []

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        drawn: dict[str, Any] = {}
        if len(self.parents) > 1:
            drawn["init.from_run_key"] = trial.suggest_categorical(
                "init.from_run_key", self.parents
            )
        for key, values in self.grid.items():
            drawn[key] = trial.suggest_categorical(key, values)
        for key, dim in self.dimensions.items():
            drawn[key] = self._draw(trial, key, dim)
        for when, space in self.conditional:
            if all({**self.base_flat, **drawn}.get(k) == v for k, v in when.items()):
                for key, dim in space.items():
                    drawn[key] = self._draw(trial, key, dim)
        # returned values go on the trial's config beside Optuna's own names: each drawn key
        # with its value (for a complement, Optuna's name is `1 - KEY`, its value 1 - value)
        constants = {"init.from_run_key": self.parents[0]} if len(self.parents) == 1 else {}
        return {**constants, **drawn} or None

    def startup_points(self, n: int, seed: int) -> list[dict[str, Any]]:
        """The first n points of a scrambled Sobol sequence over the unconditional dimensions
        (the parent run, grid axes, the space), under Optuna's names: what the searcher
        evaluates first when `startup_design: sobol`. Conditional dimensions are left to the
        sampler (they exist only where `when` matches)."""
        import warnings

        from scipy.stats import qmc

        dims: list[tuple[str, Dimension]] = []
        if len(self.parents) > 1:
            dims.append(("init.from_run_key", Dimension(choice=list(self.parents))))
        dims += [(key, Dimension(choice=list(values))) for key, values in self.grid.items()]
        dims += list(self.dimensions.items())
        with warnings.catch_warnings():  # n need not be a power of 2 for a start-up design
            warnings.filterwarnings("ignore", message=".*balance properties of Sobol.*")
            unit = qmc.Sobol(d=len(dims), scramble=True, rng=seed).random(n)
        return [
            dict(self._from_unit(key, dim, u) for (key, dim), u in zip(dims, row)) for row in unit
        ]

    def _distribution(self, key: str, dim: Dimension) -> tuple[str, Any]:
        """Optuna's name and distribution for KEY: what the trial suggests and what a start-up
        point is drawn from (a complement is modelled as 1 - value, named `1 - KEY`)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if dim.choice is not None:
            return key, CategoricalDistribution(list(dim.choice))
        low, high = dim.bounds
        if dim.loguniform_complement is not None:
            return COMPLEMENT + key, FloatDistribution(1.0 - high, 1.0 - low, log=True)
        if key in self.int_keys or dim.int_ is not None:
            return key, IntDistribution(int(math.ceil(low)), int(math.floor(high)))
        return key, FloatDistribution(float(low), float(high), log=dim.loguniform is not None)

    def _from_unit(self, key: str, dim: Dimension, u: float) -> tuple[str, Any]:
        """Optuna's name for KEY and the value at quantile u of its distribution."""
        name, dist = self._distribution(key, dim)
        if hasattr(dist, "choices"):
            return name, dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
        low, high = dist.low, dist.high
        if isinstance(low, int):
            return name, low + min(int(u * (high - low + 1)), high - low)
        if dist.log:
            value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        else:
            value = low + u * (high - low)
        return name, min(max(float(value), low), high)

    def _draw(self, trial: Any, key: str, dim: Dimension) -> Any:
        name, dist = self._distribution(key, dim)
        if hasattr(dist, "choices"):
            return trial.suggest_categorical(name, list(dist.choices))
        if isinstance(dist.low, int):
            return trial.suggest_int(name, dist.low, dist.high)
        value = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        return 1.0 - value if name != key else value  # Optuna models 1 - value, the run gets value


def make_searcher(search: Search, space: SearchSpace, max_concurrent: int) -> Any:
    """OptunaSearch with the spec's sampler and seed (and, with `startup_design: sobol`, its
    start-up points enqueued), under a ConcurrencyLimiter (batched when the spec says so: see
    Search.batched)."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    from .sweep_optuna import ConstrainedOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created
    if search.algorithm == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=search.seed, population_size=search.startup)
    elif search.algorithm == "gp":  # log EHVI; running trials enter as a q-batch (no liar needed)
        sampler = optuna.samplers.GPSampler(seed=search.seed, n_startup_trials=search.startup)
    else:  # constant liar: concurrent trials are not all proposed at the same point
        sampler = optuna.samplers.TPESampler(
            seed=search.seed,
            multivariate=True,
            n_startup_trials=search.startup,
            constant_liar=max_concurrent > 1,
        )
    names = [objective_name(i) for i in range(len(search.objectives))]
    modes = list(search.objectives.values())
    single = len(names) == 1
    # a Sobol start is enqueued: the sampler counts those trials as its start-up trials
    start = min(search.startup, search.num_samples)
    points = space.startup_points(start, search.seed) if search.startup_design == "sobol" else None
    searcher = ConstrainedOptunaSearch(
        space=space,
        points_to_evaluate=points,
        metric=names[0] if single else names,
        mode=modes[0] if single else modes,
        sampler=sampler,
        constraint_key=CONSTRAINT_RESULT,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent, batch=search.batched)


# --- from a sampled point to a RunConfig --------------------------------------------------


def int_keys(base: dict[str, Any], keys: list[str]) -> list[str]:
    """The keys whose RunConfig value is an integer (sampled as integers)."""
    flat = build_config(base, "search base").flat()
    return [k for k in keys if isinstance(flat.get(k), int) and not isinstance(flat.get(k), bool)]


def trial_config(context: dict[str, Any], sampled: dict[str, Any]) -> RunConfig:
    """The RunConfig of a sampled point: its base (the parent run's config for a warm start)
    with the sampled keys set."""
    parent = sampled.get("init.from_run_key") or ""
    tree = json.loads(json.dumps(context["bases"][parent]))
    for key, value in sampled.items():
        if key in context["int_keys"]:
            value = int(round(value))
        set_dotted(tree, key, value)
    return build_config(tree, f"search point {sampled}")


def sampled_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The sampled (dotted) keys of a Tune trial config: everything beside our context and
    the searcher's own names for complements."""
    return {k: v for k, v in config.items() if k != "search" and not k.startswith(COMPLEMENT)}


# --- objectives, read from what the run logged ----------------------------------------------


def logged_objectives(client: Any, run: Any, config: RunConfig, metrics: list[str]) -> list[float]:
    """Each metric as the analysis reads it: val/ppl the best validation perplexity at the
    final sparsity, anything else the last logged value; NaN where the run lacks it."""
    out = []
    for metric in metrics:
        if metric == schema.VAL_PPL:
            first = pruning.final_epoch(config.prune)
            history = client.get_metric_history(run.info.run_id, schema.VAL_PPL)
            values = [m.value for m in history if m.step >= first and math.isfinite(m.value)]
            out.append(min(values) if values else math.nan)
        else:
            out.append(float(run.data.metrics.get(metric, math.nan)))
    return out


def search_result(
    client: Any, run_id: str | None, config: RunConfig, context: dict[str, Any]
) -> dict[str, float]:
    """The objectives (and the constraint value) Tune hands the searcher; NaN for a failed run."""
    objectives, constraint = context["objectives"], context.get("constraint")
    metrics = [*objectives, *([constraint[0]] if constraint else [])]
    values = [math.nan] * len(metrics)
    if run_id is not None:
        run = client.get_run(run_id)
        if run.info.status == "FINISHED":
            values = logged_objectives(client, run, config, metrics)
    result = {objective_name(i): values[i] for i in range(len(objectives))}
    if constraint:
        _, op, bound = constraint
        value = values[-1]
        result[CONSTRAINT_RESULT] = (value - bound) if op == "<=" else (bound - value)
    return result


# --- what the driver hands the Tuner -------------------------------------------------------


def search_context(
    spec: SweepSpec, stage: str | None, bases: dict[str, dict[str, Any]], params: dict[str, Any]
) -> dict[str, Any]:
    """The constant part of every search trial's Tune config (the sampled keys come beside it)."""
    search = spec.stage_search(stage)
    return {
        **params,
        "bases": bases,
        "int_keys": int_keys(next(iter(bases.values())), search.keys),
        "objectives": list(search.objectives),
        "constraint": list(search.parsed_constraint() or []) or None,
        "search_keys": search.keys,
        "label": f"{search.algorithm}, seed {search.seed}",
    }


def space_for(
    spec: SweepSpec, stage: str | None, bases: dict[str, dict[str, Any]], ints: list[str]
) -> SearchSpace:
    """The stage's search space; its grid axes (and conditional grid axes) as categoricals."""
    found = next((s for s in spec.stages if s.name == stage), None) if stage else None
    grid = dict(found.grid if found else spec.grid)
    conditional = list(found.conditional if found else spec.conditional)
    search = spec.stage_search(stage)
    base_flat = RunConfig.model_validate(next(iter(bases.values()))).flat()
    parents = [k for k in bases if k]
    space = SearchSpace(search, base_flat, ints, grid, parents)
    space.conditional = [
        (dict(c.when), {k: Dimension(choice=v) for k, v in c.grid.items()}) for c in conditional
    ] + space.conditional
    return space


def placeholders(context: dict[str, Any]) -> dict[str, float]:
    """Every epoch's result carries the objectives' keys (a single-objective OptunaSearch reads
    its metric from each result): NaN until the trial ends."""
    return {objective_name(i): math.nan for i in range(len(context["objectives"]))}


def trial_params(
    context: dict[str, Any], config: RunConfig, sampled: dict[str, Any]
) -> dict[str, Any]:
    """What sweep_runner's trial code reads, for a sampled point (as _trial_params for grids;
    the runner adds the resume file's URI)."""
    keys = list(context["search_keys"])
    flat = config.flat()
    label = "-".join(f"{k.split('.')[-1]}={_short(flat.get(k))}" for k in keys)
    stage = context.get("stage")
    return {
        **{k: context[k] for k in ("tracking_uri", "experiment_id", "parent_run_id", "sweep")},
        "stage": stage,
        "spec_hash": context.get("spec_hash"),
        "run_key": config.run_key,
        "run_name": f"{context['sweep']}:{stage + ':' if stage else ''}{label}",
        "tags": {schema.TAG_SEARCH: context["label"]},
    }


def _short(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value
