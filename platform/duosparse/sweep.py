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
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import ConfigError, RunConfig, build_config, flatten, read_yaml, set_dotted


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


class SpecError(ValueError):
    """An invalid sweep spec; the message names the field and the fix."""


_CONFIG_KEYS = set(flatten(RunConfig().model_dump(mode="json")))


def _check_key(key: str, where: str) -> None:
    if key not in _CONFIG_KEYS:
        close = sorted(k for k in _CONFIG_KEYS if k.split(".")[-1] == key.split(".")[-1] or k.startswith(key.split(".")[0] + "."))
        hint = f" (keys in that section: {', '.join(close)})" if close else ""
        raise SpecError(f"{where}: '{key}' is not a RunConfig key{hint}.")
    if key == "train.seed" and not where.endswith(".when"):
        # `seeds` sets every trial's seed; an axis over it would be overridden without a word
        raise SpecError(f"{where}: 'train.seed' is set by the spec's 'seeds' list; write seeds: [0, 1] instead of a grid axis.")


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
        raise SpecError(f"{source}: 'recipe' must be the path of a RunConfig YAML, e.g. ../configs/recipes/evnn_ptb.yaml.")
    path = folder / recipe if (folder / recipe).is_file() else Path(recipe)
    loaded = read_yaml(path, f"{source}: recipe", "a RunConfig YAML such as configs/recipes/evnn_ptb.yaml", SpecError)
    if not isinstance(loaded, dict):
        raise SpecError(f"{source}: recipe '{recipe}' must hold a mapping of sections (data, model, prune, train).")
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
        parts = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                parts.append(f"'{field}' is not a spec field (valid: {', '.join(SweepSpec.model_fields)})")
            else:
                parts.append(f"'{field}': {err['msg'].removeprefix('Value error, ')}")
        raise SpecError(f"Invalid sweep spec {source}: " + "; ".join(parts) + ".") from None
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
    return spec


def load_spec(path: str | Path) -> SweepSpec:
    tree = read_yaml(Path(path), "Sweep spec", "a sweep spec such as sweeps/smoke.yaml", SpecError)
    return parse_spec(tree, str(path), Path(path).parent)


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(spec: SweepSpec) -> list[RunConfig]:
    """All trials of the spec, in a stable order, each validated; duplicates collapse."""
    base_flat = flatten(RunConfig.model_validate(spec.base).model_dump(mode="json"))
    trials: dict[str, RunConfig] = {}
    matched = [False] * len(spec.conditional)
    for point in _product(spec.grid) or [{}]:
        values = {**base_flat, **point}
        extensions = [{}]
        for i, cond in enumerate(spec.conditional):  # in order: a `when` sees earlier axes
            grown = []
            for e in extensions:
                if all({**values, **e}.get(k) == v for k, v in cond.when.items()):
                    matched[i] = True
                    grown += [{**e, **p} for p in _product(cond.grid)]
                else:
                    grown.append(e)
            extensions = grown
        for extension in extensions:
            for seed in spec.seeds:
                tree = json.loads(json.dumps(spec.base))
                for key, value in {**point, **extension, "train.seed": seed}.items():
                    set_dotted(tree, key, value)
                label = ", ".join(f"{k}={v}" for k, v in {**point, **extension}.items())
                try:
                    config = build_config(tree, f"trial ({label}, seed {seed})")
                except ConfigError as e:
                    raise SpecError(f"In sweep '{spec.name}': {e} Fix the axis values or the base.") from None
                trials.setdefault(config.run_key, config)
    for i, hit in enumerate(matched):
        if not hit:
            raise SpecError(
                f"Sweep '{spec.name}': conditional[{i}].when {spec.conditional[i].when} matches no "
                "trial of the grid, so its axes would never run; fix the condition's values."
            )
    return list(trials.values())


def describe(config: RunConfig, spec: SweepSpec) -> dict[str, Any]:
    """The values of the swept keys for one trial (for tables and run names)."""
    keys = list(spec.grid) + [k for c in spec.conditional for k in c.grid] + ["train.seed"]
    flat = config.flat()
    return {k: flat[k] for k in dict.fromkeys(keys)}
