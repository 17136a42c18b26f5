"""Sweep specs (`sweeps/*.yaml`): a study declared as data, expanded into RunConfigs.

    name: ptb_quick
    base: {model: {arch: egru}, train: {epochs: 2}}     # a RunConfig tree
    grid:                                               # dotted RunConfig keys -> values
      model.arch: [lstm, gru, egru]
      prune.target_sparsity: [0.0, 0.5, 0.9]
    conditional:                     # more axes where `when` matches (in order: a later
                                     # `when` may test an axis an earlier entry added)
      - when: {model.arch: egru}
        grid: {model.threshold: [0.02, 0.1]}
    seeds: [0, 1]
    recipe: ../configs/recipes/evnn_ptb.yaml            # optional: a RunConfig under `base`

Every expanded trial is a validated RunConfig with its run_key; equal trials collapse.

A spec may instead declare `stages` (then the grid and conditionals live in the stages):

    stages:
      - name: dense                     # base x grid x conditionals x seeds, as above
        grid: {model.arch: [lstm, gru, egru]}
      - name: prune
        from: dense                     # one trial per run of `dense` (x this stage's grid),
        when: {model.arch: egru}        # optionally only those matching `when`,
        base: {train: {epochs: 1}}      # each with that run's config under this base and
        grid: {prune.target_sparsity: [0.9, 0.95]}   # init.from_run_key set to its run_key

A later stage warm-starts every trial from the earlier stage's run of the same model, so it
may not change what fixes the weights' shapes (config.WARM_START_KEYS) or the seed.

Instead of enumerating a grid, a spec (or a stage) may *search* a box with Optuna through
Ray Tune (sweep_search.py runs it):

    search:
      space:                                  # dotted RunConfig keys -> one dimension each
        prune.target_sparsity: {uniform: [0.5, 0.98]}     # or {loguniform_complement: ...}:
                                              # 1 - level (the weights kept) log-uniform
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.hidden_size: {choice: [64, 128]}          # or {int: [64, 256]}
      conditional:                            # more dimensions where `when` matches
        - when: {model.arch: egru}
          space: {model.threshold: {uniform: [0.01, 0.1]}}
      objectives: {val/ppl: min, ops/effective_macs_per_token: min}   # one: single-objective
      constraint: ops/effective_macs_per_token <= 20000                 # optional
      algorithm: tpe                          # multi-objective TPE, nsga2, or gp (Gaussian-
                                              # process Bayesian optimisation, log EHVI)
      num_samples: 8
      seed: 0                                 # the searcher's seed
      startup_trials: 3                       # optional: TPE's or GP's start-up points /
                                              # NSGA-II's population (default num_samples // 3,
                                              # 2-10)
      startup_design: sobol                   # optional: those start-up points as a
                                              # scrambled Sobol sequence (space-filling, as
                                              # Ax starts its Bayesian optimisation: the
                                              # default), or `random` (Optuna's own start)
      batched: true                           # optional: propose max_concurrent points at a
                                              # time, each batch once the last has finished

Grid axes beside a search (`grid`, `conditional`) become categorical dimensions of the
search; a key may not be in both. Objectives and the constraint name metrics the training
logs (schema.SEARCH_METRICS); `val/ppl` is the best validation perplexity at the final
sparsity, the figure the analysis selects on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import schema
from .config import (
    WARM_START_KEYS,
    ConfigError,
    RunConfig,
    build_config,
    describe_validation_error,
    flatten,
    read_yaml,
    set_dotted,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Conditional(_Strict):
    when: dict[str, Any] = Field(min_length=1)
    grid: dict[str, list[Any]] = Field(min_length=1)


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)  # fractions share a GPU between trials


class Tracking(_Strict):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI or ./mlruns.db
    experiment: str | None = None  # default: the sweep's name


class EarlyStopping(_Strict):
    """ASHA on val/loss; off unless the spec has this section."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class Dimension(_Strict):
    """One dimension of a search space: exactly one of the five forms."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    # 1 - value is log-uniform: for a prune level, the fraction of weights kept (which the
    # MACs follow) is, so each halving of the weights kept is drawn as often
    loguniform_complement: tuple[float, float] | None = None
    int_: tuple[int, int] | None = Field(None, alias="int")
    choice: list[Any] | None = Field(None, min_length=1)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_form(self) -> Dimension:
        forms = ("uniform", "loguniform", "loguniform_complement", "int_", "choice")
        given = [k for k in forms if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "a dimension is exactly one of {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
                "{loguniform_complement: [lo, hi]}, {int: [lo, hi]} or {choice: [a, b, ...]}"
            )
        low, high = self.bounds or (0, 1)
        if self.bounds and not low < high:
            raise ValueError(f"the bounds [{low}, {high}] are not increasing")
        if self.loguniform and low <= 0:
            raise ValueError(f"loguniform bounds must be positive, got [{low}, {high}]")
        if self.loguniform_complement and high >= 1:
            raise ValueError(
                f"loguniform_complement draws 1 - value log-uniformly, so its bounds must be "
                f"below 1, got [{low}, {high}]"
            )
        return self

    @property
    def bounds(self) -> tuple[float, float] | None:
        return self.uniform or self.loguniform or self.loguniform_complement or self.int_

    @property
    def values(self) -> list[Any]:
        """The values whose RunConfig must validate: the bounds, or every choice."""
        return list(self.choice) if self.choice is not None else list(self.bounds or ())


class SearchConditional(_Strict):
    when: dict[str, Any] = Field(min_length=1)
    space: dict[str, Dimension] = Field(min_length=1)


CONSTRAINT = re.compile(r"^\s*(?P<metric>\S+)\s*(?P<op><=|>=)\s*(?P<bound>\S+)\s*$")


class Search(_Strict):
    """A multi- (or single-) objective search with Optuna's TPE, NSGA-II or GP sampler through
    Ray Tune."""

    space: dict[str, Dimension] = Field(min_length=1)
    conditional: list[SearchConditional] = Field(default_factory=list)
    objectives: dict[str, Literal["min", "max"]] = Field(min_length=1)
    constraint: str | None = None  # "METRIC <= BOUND" or "METRIC >= BOUND"
    algorithm: Literal["tpe", "nsga2", "gp"] = "tpe"
    num_samples: int = Field(ge=1)
    seed: int = 0
    # TPE's or GP's start-up trials / NSGA-II's population; default: a third of num_samples,
    # 2 to 10 (Optuna's defaults, 10 and 50, would leave a small search random throughout)
    startup_trials: int | None = Field(None, ge=2)
    # How the start-up points are drawn: as the first points of a scrambled Sobol sequence over
    # the box (seeded by `seed`), which spreads even two points over every dimension's range,
    # or independently at random (Optuna's own start-up), which may put them all in one corner
    # that a search of a few trials never leaves. Sobol is the default since the Pareto-search
    # study measured it against random over six seeds (docs/results/pareto_search.md).
    startup_design: Literal["random", "sobol"] = "sobol"
    # Propose max_concurrent points at once and the next batch only when all have finished
    # (Ray Tune's ConcurrencyLimiter(batch=True)): what the searcher has seen at each proposal
    # is then fixed by its seed, so a search is reproducible run to run. Unbatched, a point is
    # proposed whenever a trial finishes, and which finishes first (a race) changes the next
    # points; batched, the free slot waits for the batch's slowest trial.
    batched: bool = False

    @property
    def startup(self) -> int:
        return self.startup_trials or min(10, max(2, self.num_samples // 3))

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys([*self.space, *(k for c in self.conditional for k in c.space)]))

    def parsed_constraint(self) -> tuple[str, str, float] | None:
        if self.constraint is None:
            return None
        match = CONSTRAINT.match(self.constraint)
        if not match:
            raise SpecError(
                f"search.constraint '{self.constraint}' is not of the form 'METRIC <= BOUND' "
                "or 'METRIC >= BOUND', e.g. 'ops/effective_macs_per_token <= 20000'."
            )
        try:
            bound = float(match["bound"])
        except ValueError:
            bound = math.nan
        if not math.isfinite(bound):
            raise SpecError(
                f"search.constraint '{self.constraint}': the bound '{match['bound']}' is not a finite number."
            )
        return match["metric"], match["op"], bound


class Stage(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    from_stage: str | None = Field(None, alias="from")  # an earlier stage to warm-start from
    when: dict[str, Any] = Field(default_factory=dict)  # which of its runs (with `from` only)
    base: dict[str, Any] = Field(default_factory=dict)  # over the spec's base (or the run's config)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    conditional: list[Conditional] = Field(default_factory=list)
    search: Search | None = None


class SweepSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    recipe: str | None = None  # a RunConfig YAML (configs/recipes/) under `base`: base wins
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    conditional: list[Conditional] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    resources: Resources = Resources()
    max_concurrent: int = Field(2, ge=1)
    retries: int = Field(1, ge=0)
    tracking: Tracking = Tracking()
    storage_path: str | None = None  # Ray Tune state; default ./runs/tune (shared on a cluster)
    early_stopping: EarlyStopping | None = None
    stages: list[Stage] = Field(default_factory=list)
    search: Search | None = None

    @field_validator("grid")
    @classmethod
    def _non_empty_axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"axis '{key}' has no values; give at least one or remove it")
        return grid

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def spec_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def stage_names(self) -> list[str | None]:
        """The stages in order; a spec without stages is one unnamed stage."""
        return [s.name for s in self.stages] or [None]

    def stage_search(self, stage: str | None) -> Search | None:
        """The search of a stage (or of a spec without stages); None for a grid stage."""
        if stage is None:
            return self.search
        return next(s.search for s in self.stages if s.name == stage)

    @property
    def searches(self) -> bool:
        return self.search is not None or any(s.search for s in self.stages)


class SpecError(ValueError):
    """An invalid sweep spec; the message names the field and the fix."""


_CONFIG_KEYS = set(flatten(RunConfig().model_dump(mode="json")))


def _check_key(key: str, where: str) -> None:
    if key not in _CONFIG_KEYS:
        close = sorted(
            k
            for k in _CONFIG_KEYS
            if k.split(".")[-1] == key.split(".")[-1] or k.startswith(key.split(".")[0] + ".")
        )
        hint = f" (keys in that section: {', '.join(close)})" if close else ""
        raise SpecError(f"{where}: '{key}' is not a RunConfig key{hint}.")
    if key == "train.seed" and not where.endswith(".when"):
        # `seeds` sets every trial's seed; an axis over it would be overridden without a word
        raise SpecError(
            f"{where}: 'train.seed' is set by the spec's 'seeds' list; write seeds: [0, 1] instead of a grid axis."
        )


def deep_merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `under`, section by section (a recipe under a spec's base)."""
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _with_recipe(tree: dict[str, Any], source: str, folder: Path) -> dict[str, Any]:
    """The spec with its recipe merged under `base`; the path is relative to the spec's folder
    or, failing that, to the current directory."""
    recipe = tree.get("recipe")
    if recipe is None:
        return tree
    if not isinstance(recipe, str):
        raise SpecError(
            f"{source}: 'recipe' must be the path of a RunConfig YAML, e.g. ../configs/recipes/evnn_ptb.yaml."
        )
    path = folder / recipe if (folder / recipe).is_file() else Path(recipe)
    loaded = read_yaml(
        path,
        f"{source}: recipe",
        "a RunConfig YAML such as configs/recipes/evnn_ptb.yaml",
        SpecError,
    )
    if not isinstance(loaded, dict):
        raise SpecError(
            f"{source}: recipe '{recipe}' must hold a mapping of sections (data, model, prune, train)."
        )
    try:
        build_config(loaded, f"{source}: recipe '{recipe}'")
    except ConfigError as e:
        raise SpecError(str(e)) from None
    base = tree.get("base") or {}
    if not isinstance(base, dict):
        return tree  # parse_spec names the bad field
    return {**tree, "base": deep_merge(loaded, base)}


def parse_spec(tree: Any, source: str = "spec", folder: Path | None = None) -> SweepSpec:
    if not isinstance(tree, dict):
        raise SpecError(f"{source}: a sweep spec is a mapping with at least 'name' and 'grid'.")
    tree = _with_recipe(tree, source, folder or Path.cwd())
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as e:
        described = describe_validation_error(e, SweepSpec, noun="spec field")
        raise SpecError(f"Invalid sweep spec {source}: {described}.") from None
    for key in spec.grid:
        _check_key(key, f"{source}: grid")
    for i, cond in enumerate(spec.conditional):
        for key in cond.when:
            _check_key(key, f"{source}: conditional[{i}].when")
        for key, values in cond.grid.items():
            _check_key(key, f"{source}: conditional[{i}].grid")
            if not values:
                raise SpecError(f"{source}: conditional[{i}].grid axis '{key}' has no values.")
    try:
        build_config(spec.base, f"{source}: base")
    except ConfigError as e:
        raise SpecError(str(e)) from None
    _check_stages(spec, source)
    if spec.search is not None:
        _check_search(
            spec.search, spec.base, spec.grid, spec.conditional, spec, f"{source}: search"
        )
    for i, stage in enumerate(spec.stages):
        if stage.search is not None:
            base = deep_merge(spec.base, stage.base)
            where = f"{source}: stages[{i}] ('{stage.name}').search"
            _check_search(stage.search, base, stage.grid, stage.conditional, spec, where)
    return spec


def _check_search(
    search: Search,
    base: dict[str, Any],
    grid: dict[str, list[Any]],
    conditional: list[Conditional],
    spec: SweepSpec,
    where: str,
) -> None:
    """Keys, bounds (a RunConfig at each bound and choice must validate), objectives and the
    constraint (metrics the training logs), and no key both in a grid and in the space."""
    grid_keys = set(grid) | {k for c in conditional for k in c.grid}
    sections = [("space", {}, search.space)] + [
        (f"conditional[{i}].space", c.when, c.space) for i, c in enumerate(search.conditional)
    ]
    for i, c in enumerate(search.conditional):
        for key in c.when:
            _check_key(key, f"{where}.conditional[{i}].when")
    for name, when, space in sections:
        for key, dim in space.items():
            _check_key(key, f"{where}.{name}")
            if key in grid_keys:
                raise SpecError(
                    f"{where}.{name}: '{key}' is also a grid axis; a key is either enumerated "
                    "(grid) or searched (search.space): remove it from one of them."
                )
            if key in ("init.from_run_key", "train.seed"):
                raise SpecError(
                    f"{where}.{name}: '{key}' cannot be searched: the seed comes from 'seeds' "
                    "and the warm start from the stage's 'from'."
                )
            for value in dim.values:
                tree = json.loads(json.dumps(base))
                for k, v in {**when, key: value}.items():
                    set_dotted(tree, k, v)
                try:
                    build_config(tree, f"{where}.{name} '{key}' at {value!r}")
                except ConfigError as e:
                    raise SpecError(
                        f"{e} The search bound or choice {value!r} of '{key}' is outside what "
                        "the key accepts; narrow the dimension."
                    ) from None
    constraint = search.parsed_constraint()
    named = [(f"objective '{m}'", m) for m in search.objectives]
    if constraint:
        named.append((f"constraint '{search.constraint}'", constraint[0]))
    for label, metric in named:
        _check_metric(metric, f"{where}: {label}")
    if len(spec.seeds) > 1 and not spec.stages:  # (stages: checked in _check_stages)
        raise SpecError(
            f"{where}: a search samples configurations for one seed, but 'seeds' lists "
            f"{spec.seeds}; keep one seed (the trials' train.seed) and set search.seed for the searcher."
        )
    if spec.early_stopping is not None:
        raise SpecError(
            f"{where}: early_stopping (ASHA) cannot stop a search's trials: a stopped trial has "
            "no objectives to report; remove 'early_stopping'."
        )


def _check_metric(metric: str, where: str) -> None:
    if metric.startswith(schema.HW_SPINNAKER2_PREFIX):
        raise SpecError(
            f"{where}: '{metric}' is logged by `duosparse simulate spinnaker2` after training, "
            "not by the training itself, so a search cannot read it while it runs; search on "
            f"'{schema.OPS_EFFECTIVE}' (the activity-aware MAC count the energy model scales) instead."
        )
    if metric not in schema.SEARCH_METRICS:
        raise SpecError(
            f"{where}: '{metric}' is not a metric the training logs; choose one of "
            f"{', '.join(schema.SEARCH_METRICS)}."
        )


def _check_stages(spec: SweepSpec, source: str) -> None:
    """Stage names, order and keys; what a later stage may change about the model."""
    if not spec.stages:
        return
    if spec.grid or spec.conditional:
        raise SpecError(
            f"{source}: a spec with 'stages' declares its axes in the stages; move the top-level "
            "'grid' and 'conditional' into the first stage."
        )
    seen: list[str] = []
    for i, stage in enumerate(spec.stages):
        where = f"{source}: stages[{i}] ('{stage.name}')"
        if stage.name in seen:
            raise SpecError(f"{where}: another stage has this name; give each stage its own name.")
        if i == 0 and stage.from_stage is not None:
            raise SpecError(
                f"{where}: the first stage cannot start 'from' another; remove 'from: {stage.from_stage}'."
            )
        if stage.from_stage is not None and stage.from_stage not in seen:
            earlier = ", ".join(seen) or "none"
            raise SpecError(
                f"{where}: 'from: {stage.from_stage}' names no earlier stage (earlier stages: "
                f"{earlier}); a stage warm-starts from a stage declared before it."
            )
        if stage.when and stage.from_stage is None:
            raise SpecError(
                f"{where}: 'when' selects runs of the stage named in 'from'; add 'from' or remove 'when'."
            )
        if stage.search is not None and len(spec.seeds) > 1 and stage.from_stage is None:
            raise SpecError(
                f"{where}: a search samples configurations for one seed, but 'seeds' lists "
                f"{spec.seeds}; keep one seed and set search.seed for the searcher."
            )
        for key in stage.grid:
            _check_key(key, f"{where}.grid")
        for j, cond in enumerate(stage.conditional):
            for key in cond.when:
                _check_key(key, f"{where}.conditional[{j}].when")
            for key in cond.grid:
                _check_key(key, f"{where}.conditional[{j}].grid")
        for key in stage.when:
            _check_key(key, f"{where}.when")
        if stage.from_stage is not None:
            changed = (
                set(stage.grid)
                | {k for c in stage.conditional for k in c.grid}
                | set(flatten(stage.base))
                | set(stage.search.keys if stage.search else [])
            )
            if any(s.name == stage.from_stage and s.search for s in spec.stages):
                raise SpecError(
                    f"{where}: 'from: {stage.from_stage}' names a search stage, whose runs are "
                    "not known before it runs; warm-start from a grid stage."
                )
            fixed = sorted(changed & {*WARM_START_KEYS, "train.seed", "init.from_run_key"})
            if fixed:
                raise SpecError(
                    f"{where}: {', '.join(fixed)} cannot change in a stage that warm-starts from "
                    f"'{stage.from_stage}' (its trials continue that stage's models and seeds); vary "
                    f"{'it' if len(fixed) == 1 else 'them'} in the first stage."
                )
        elif i > 0 and stage.base:
            try:
                build_config(deep_merge(spec.base, stage.base), f"{where}: base")
            except ConfigError as e:
                raise SpecError(str(e)) from None
        seen.append(stage.name)


def load_spec(path: str | Path) -> SweepSpec:
    tree = read_yaml(Path(path), "Sweep spec", "a sweep spec such as sweeps/smoke.yaml", SpecError)
    return parse_spec(tree, str(path), Path(path).parent)


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(spec: SweepSpec) -> list[RunConfig]:
    """All trials of the spec, in a stable order, each validated; duplicates collapse."""
    trials: dict[str, RunConfig] = {}
    for _, configs in expand_stages(spec):
        for config in configs:
            trials.setdefault(config.run_key, config)
    return list(trials.values())


def expand_stages(spec: SweepSpec) -> list[tuple[str | None, list[RunConfig]]]:
    """The trials of each stage in order (one unnamed stage for a spec without stages); a
    search stage's trials are not known before it runs: none here (search_bases has its
    bases)."""
    if spec.search is not None:
        return [(None, [])]
    if not spec.stages:
        return [
            (None, _grow(spec.name, "", [(spec.base, spec.seeds)], spec.grid, spec.conditional))
        ]
    out: list[tuple[str | None, list[RunConfig]]] = []
    done: dict[str, list[RunConfig]] = {}
    for stage in spec.stages:
        where = f"stage '{stage.name}': "
        if stage.search is not None:
            done[stage.name] = []
            out.append((stage.name, []))
            continue
        if stage.from_stage is None:
            bases = [(deep_merge(spec.base, stage.base), spec.seeds)]
        else:
            parents = [
                c
                for c in done[stage.from_stage]
                if all(c.flat().get(k) == v for k, v in stage.when.items())
            ]
            if not parents:
                raise SpecError(
                    f"Sweep '{spec.name}', {where}'when' {stage.when} matches no run of stage "
                    f"'{stage.from_stage}', so this stage would have nothing to start from; fix its values."
                )
            bases = []
            for parent in parents:
                tree = deep_merge(parent.model_dump(mode="json"), stage.base)
                tree["init"] = {**tree.get("init", {}), "from_run_key": parent.run_key}
                bases.append((tree, None))  # the parent's seed
        done[stage.name] = _grow(spec.name, where, bases, stage.grid, stage.conditional)
        out.append((stage.name, done[stage.name]))
    return out


def search_bases(spec: SweepSpec, stage: str | None) -> dict[str, dict[str, Any]]:
    """The base trees a search stage's points start from, by warm-start parent run_key ("" when
    the stage does not warm-start): each parent run's config under the stage's base."""
    if stage is None:
        tree = json.loads(json.dumps(spec.base))
        set_dotted(tree, "train.seed", spec.seeds[0])
        return {"": build_config(tree, "search base").model_dump(mode="json")}
    found = next(s for s in spec.stages if s.name == stage)
    if found.from_stage is None:
        tree = deep_merge(spec.base, found.base)
        set_dotted(tree, "train.seed", spec.seeds[0])
        return {"": build_config(tree, f"stage '{stage}': base").model_dump(mode="json")}
    parents = dict(expand_stages(spec))[found.from_stage]
    bases = {}
    for parent in parents:
        if all(parent.flat().get(k) == v for k, v in found.when.items()):
            tree = deep_merge(parent.model_dump(mode="json"), found.base)
            tree["init"] = {**tree.get("init", {}), "from_run_key": parent.run_key}
            bases[parent.run_key] = build_config(tree, f"stage '{stage}': base").model_dump(
                mode="json"
            )
    if not bases:
        raise SpecError(
            f"Sweep '{spec.name}', stage '{stage}': 'when' {found.when} matches no run of stage "
            f"'{found.from_stage}', so the search would have nothing to start from; fix its values."
        )
    return bases


def _grow(
    name: str,
    where: str,
    bases: list[tuple[dict[str, Any], list[int] | None]],
    grid: dict[str, list[Any]],
    conditional: list[Conditional],
) -> list[RunConfig]:
    """Each base tree x the grid x the conditionals (in order: a `when` sees earlier axes) x
    its seeds (None: keep the tree's seed); validated, equal trials collapsed."""
    trials: dict[str, RunConfig] = {}
    matched = [False] * len(conditional)
    for base, seeds in bases:
        try:
            base_flat = flatten(build_config(base, f"{where}base").model_dump(mode="json"))
        except ConfigError as e:
            raise SpecError(f"In sweep '{name}': {e}") from None
        for point in _product(grid) or [{}]:
            values = {**base_flat, **point}
            extensions = [{}]
            for i, cond in enumerate(conditional):
                grown = []
                for e in extensions:
                    if all({**values, **e}.get(k) == v for k, v in cond.when.items()):
                        matched[i] = True
                        grown += [{**e, **p} for p in _product(cond.grid)]
                    else:
                        grown.append(e)
                extensions = grown
            for extension in extensions:
                for seed in seeds if seeds is not None else [base_flat["train.seed"]]:
                    tree = json.loads(json.dumps(base))
                    for key, value in {**point, **extension, "train.seed": seed}.items():
                        set_dotted(tree, key, value)
                    label = ", ".join(f"{k}={v}" for k, v in {**point, **extension}.items())
                    try:
                        config = build_config(tree, f"{where}trial ({label}, seed {seed})")
                    except ConfigError as e:
                        raise SpecError(
                            f"In sweep '{name}': {e} Fix the axis values or the base."
                        ) from None
                    trials.setdefault(config.run_key, config)
    for i, hit in enumerate(matched):
        if not hit:
            raise SpecError(
                f"Sweep '{name}': {where}conditional[{i}].when {conditional[i].when} matches no "
                "trial of the grid, so its axes would never run; fix the condition's values."
            )
    return list(trials.values())


def describe(config: RunConfig, spec: SweepSpec) -> dict[str, Any]:
    """The values of the swept keys for one trial (for tables and run names)."""
    keys = list(spec.grid) + [k for c in spec.conditional for k in c.grid]
    keys += spec.search.keys if spec.search else []
    for stage in spec.stages:
        keys += list(stage.grid) + [k for c in stage.conditional for k in c.grid]
        keys += stage.search.keys if stage.search else []
    keys.append("train.seed")
    flat = config.flat()
    return {k: flat.get(k) for k in dict.fromkeys(keys)}
