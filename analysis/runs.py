"""The run table: one tidy pandas DataFrame per sweep (or experiment), read from MLflow.

One row per training run. Columns, all typed:

- identity and state: `run_id`, `run_name`, `run_key`, `sweep`, `kind`, `parent_run_id`,
  `status` (MLflow's FINISHED / FAILED / KILLED / RUNNING), `failure` (the reason),
  `early_stopped` (ASHA stopped it), `ok` (finished, not stopped early, has a test/ppl and
  no perplexity at the cap exp(50), which only a diverged model reaches: the runs every
  analysis uses), `start_time`, `end_time`;
- the flattened RunConfig under its dotted keys (`model.arch`, `prune.target_sparsity`, ...),
  typed from the RunConfig field types (MLflow keeps params as strings);
- every metric under its schema name (`test/ppl`, `ops/effective_macs_per_token`,
  `sparsity/activity/layer_0`, `hw/spinnaker2/energy_per_token_j`, ...): the latest value,
  which is the final test-split figure (`val/ppl`, logged per epoch only, is the last
  epoch's);
- `val/best_ppl` (BEST_VAL_PPL), derived here from the run's `val/ppl` history: the best
  validation perplexity among the epochs at the final sparsity, the epoch whose weights the
  run tested. Every analysis selects on it and reports `test/ppl` beside it.

`write_table` / `read_table` export and re-import it (CSV or Parquet) with the same types,
so every analysis runs from a file without a tracking server.
"""

from __future__ import annotations

import math
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from duosparse import pruning, schema
from duosparse.config import KEYS_OUT_OF_IDENTITY_AT_DEFAULT, PruneConfig, RunConfig
from duosparse.train import LOSS_CAP
from pydantic import BaseModel, TypeAdapter, ValidationError
from scipy import stats

# --- column names (metrics and config keys keep their schema names) ---------------------
RUN_ID = "run_id"
RUN_NAME = "run_name"
RUN_KEY = "run_key"
SWEEP = "sweep"
KIND = "kind"
PARENT_RUN_ID = "parent_run_id"
STATUS = "status"
FAILURE = "failure"
EARLY_STOPPED = "early_stopped"
STAGE = "stage"
SEARCH = "search"  # a search's trial: its algorithm and seed (schema.TAG_SEARCH); else empty
OK = "ok"
START_TIME = "start_time"
END_TIME = "end_time"
# seed-aggregated tables
N_SEEDS = "n_seeds"
SEEDS = "seeds"
RUN_IDS = "run_ids"

META_TYPES: dict[str, str] = {
    RUN_ID: "string",
    RUN_NAME: "string",
    RUN_KEY: "string",
    SWEEP: "string",
    KIND: "string",
    PARENT_RUN_ID: "string",
    STATUS: "string",
    FAILURE: "string",
    EARLY_STOPPED: "boolean",
    STAGE: "string",
    SEARCH: "string",
    OK: "boolean",
    START_TIME: "datetime64[ns, UTC]",
    END_TIME: "datetime64[ns, UTC]",
}
AGG_TYPES: dict[str, str] = {N_SEEDS: "int64", SEEDS: "string", RUN_IDS: "string"}

# The selection figure. A run logs `val/ppl` per epoch only, so its latest value is the last
# epoch's; the training loop tests the weights of the best validation epoch among those at
# the final sparsity, and that epoch's perplexity is what configurations are chosen on
# (choosing on test/ppl would select on the split that is reported). Not an MLflow name:
# the run table derives it from the metric history (`best_val_ppl`).
BEST_VAL_PPL = "val/best_ppl"

# Perplexities are logged as exp(min(loss, LOSS_CAP)): a run at the cap diverged, whatever
# its status says (runs logged before the divergence rule may be FINISHED), and is never used.
PPL_CAP = math.exp(LOSS_CAP)

ARCH = "model.arch"
SEED = "train.seed"
WARM_START = "init.from_run_key"  # lineage, like the seed: not a configuration choice
# A model's size: runs of different sizes have different dense baselines.
SIZE_KEYS = ("data.corpus", "model.embedding_size", "model.hidden_size", "model.num_layers")


class RunTableError(ValueError):
    """No usable runs, or a file that is not a run table; the message says what to do."""


# --- typing the config columns ----------------------------------------------------------


@cache
def config_fields() -> dict[str, Any]:
    """Dotted RunConfig key -> its type annotation, in RunConfig order."""

    def walk(model: type[BaseModel], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.update(walk(ann, f"{prefix}{name}."))
            else:
                out[f"{prefix}{name}"] = ann
        return out

    return walk(RunConfig, "")


def _dtype(annotation: Any) -> str:
    """The pandas dtype of a config field: nullable, so a missing value stays missing."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _dtype(args[0])
    if origin is typing.Literal:
        return _dtype(type(args[0]))
    if origin in (list, tuple):
        return "object"  # held as tuples: hashable, so tables can group and count them
    return {bool: "boolean", int: "Int64", float: "float64"}.get(annotation, "string")


@cache
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation)


def parse_param(key: str, text: str | None) -> Any:
    """An MLflow param string ('0.5', 'True', 'null', 'egru') -> the config field's value."""
    if text is None:
        return None
    value = yaml.safe_load(text) if text.strip() else None
    annotation = config_fields().get(key)
    if annotation is None:  # a key this code version does not know: keep the text
        return text
    if isinstance(value, str) and value.startswith("("):  # a tuple written out by a CSV
        value = yaml.safe_load("[" + value[1:-1] + "]")
    try:
        value = _adapter(annotation).validate_python(value)
    except ValidationError:
        return None  # an old run with another type; missing rather than wrong
    return tuple(value) if isinstance(value, list | tuple) else value


def config_columns(table: pd.DataFrame) -> list[str]:
    """The RunConfig columns of a table, in RunConfig order."""
    return [c for c in config_fields() if c in table.columns]


def _is_metric(column: str) -> bool:
    # metrics are 'section/name' (schema.py); aggregated statistics are 'metric:stat'
    return "/" in column and column not in config_fields()


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if _is_metric(c) and ":" not in c]


def varying_config(table: pd.DataFrame) -> list[str]:
    """Config columns with more than one value: the sweep's axes (seed included, the
    warm-start lineage not)."""
    return [
        c for c in config_columns(table) if c != WARM_START and table[c].nunique(dropna=False) > 1
    ]


def apply_types(table: pd.DataFrame) -> pd.DataFrame:
    """Give every known column its dtype (after CSV import, or after building from MLflow)."""
    # one new frame from the typed columns: the input stays as it was, and the result is not
    # fragmented (casting column by column in place leaves a block per column)
    typed = pd.DataFrame({col: _typed(col, table[col]) for col in table.columns}, index=table.index)
    typed.attrs = dict(table.attrs)
    return typed


def _typed(col: str, values: pd.Series) -> pd.Series:
    if col in META_TYPES or col in AGG_TYPES:
        dtype = META_TYPES.get(col) or AGG_TYPES[col]
    elif col in config_fields():
        dtype = _dtype(config_fields()[col])
    elif _is_metric(col):
        dtype = "float64"
    else:
        dtype = "string"
    if dtype.startswith("datetime"):
        return pd.to_datetime(values, utc=True, format="ISO8601")
    if dtype == "string":
        return values.astype("string").replace("", pd.NA)
    if dtype == "boolean" and values.dtype == object:
        return values.map(_bool).astype("boolean")
    if dtype == "object":
        # parquet gives arrays back, CSV strings: both become the tuples MLflow's params gave
        return values.map(
            lambda v: (
                parse_param(col, v)
                if isinstance(v, str)
                else tuple(v.tolist())
                if isinstance(v, np.ndarray)
                else tuple(v)
                if isinstance(v, list | tuple)
                else v
            )
        ).astype(object)
    return values.astype(dtype)


def _bool(value: Any) -> Any:
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower(), pd.NA)
    return pd.NA if value is None or (isinstance(value, float) and math.isnan(value)) else value


# --- reading MLflow -----------------------------------------------------------------------


@cache
def _late_key_defaults() -> dict[str, Any]:
    """The keys added to RunConfig after stores had runs (config.KEYS_OUT_OF_IDENTITY_AT_DEFAULT)
    and their defaults: a run logged before a key existed has no param for it."""
    defaults = RunConfig().flat()
    return {key: defaults[key] for key in KEYS_OUT_OF_IDENTITY_AT_DEFAULT}


def final_sparsity_epoch(params: dict[str, Any]) -> int:
    """The first epoch whose validation counts for the best model: the epoch after which
    the masks are final (0: no pruning, every epoch counts), by `pruning.final_epoch` on the
    run's typed prune values (a missing one takes RunConfig's default)."""
    given = {
        name: params[f"prune.{name}"]
        for name in PruneConfig.model_fields
        if params.get(f"prune.{name}") is not None and not pd.isna(params[f"prune.{name}"])
    }
    return int(pruning.final_epoch(PruneConfig.model_construct(**given)))


def best_val_ppl(history: list[tuple[int, float]], first_epoch: int) -> float:
    """The lowest finite val/ppl among (epoch, value) pairs with epoch >= first_epoch; NaN
    when there is none (a run that never reached its final sparsity)."""
    values = [v for step, v in history if step >= first_epoch and math.isfinite(v)]
    return min(values) if values else math.nan


def at_cap(ppl: Any) -> Any:
    """Whether a perplexity (a number or a column) is at the cap a diverged run reaches."""
    return np.asarray(ppl, dtype=float) >= PPL_CAP * (1 - 1e-9)


def _val_history(client: Any, run: Any) -> list[tuple[int, float]]:
    if client is None or schema.VAL_PPL not in run.data.metrics:
        return []
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, schema.VAL_PPL)]


def _row(run: Any, val_history: list[tuple[int, float]]) -> dict[str, Any]:
    tags, info = run.data.tags, run.info
    status = info.status
    early = tags.get(schema.TAG_EARLY_STOPPED) == "true"
    test_ppl = run.data.metrics.get(schema.TEST_PPL, math.nan)
    row: dict[str, Any] = {
        RUN_ID: info.run_id,
        RUN_NAME: info.run_name or tags.get(schema.TAG_RUN_NAME),
        RUN_KEY: tags.get(schema.TAG_RUN_KEY),
        SWEEP: tags.get(schema.TAG_SWEEP),
        KIND: tags.get(schema.TAG_KIND),
        PARENT_RUN_ID: tags.get(schema.TAG_PARENT_RUN_ID),
        STATUS: status,
        FAILURE: tags.get(schema.TAG_FAILURE) or None,
        EARLY_STOPPED: early,
        STAGE: tags.get(schema.TAG_STAGE),
        SEARCH: tags.get(schema.TAG_SEARCH),
        OK: False,  # below, once the best validation perplexity is known
        START_TIME: pd.to_datetime(info.start_time, unit="ms", utc=True),
        END_TIME: pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
    }
    params = {k: parse_param(k, v) for k, v in run.data.params.items()}
    if "model.arch" in params:
        # a training run logged before a key existed ran at that key's default (its run_key
        # says so too): filled in, it groups with the same configuration logged after
        for key, default in _late_key_defaults().items():
            params.setdefault(key, default)
    row.update(params)
    row.update(run.data.metrics)
    row[BEST_VAL_PPL] = best_val_ppl(val_history, final_sparsity_epoch(params))
    # every figure an analysis reads: a run without its compute counts (stopped between its
    # test and its accounting, or logged by something else) cannot be placed on a front
    complete = all(m in run.data.metrics for m in schema.RUN_METRICS)
    row[OK] = bool(
        status == "FINISHED"
        and not early
        and complete
        and math.isfinite(test_ppl)
        and not at_cap(test_ppl)
        and not at_cap(row[BEST_VAL_PPL])
    )
    return row


def _with_run_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """Every schema metric as a column (NaN where a run lacks it), so that analyses can select
    on any of them whatever subset of runs a table holds."""
    missing = [m for m in schema.RUN_METRICS if m not in table.columns]
    return table.assign(**{m: np.nan for m in missing}) if missing else table


def table_from_runs(runs: list[Any], client: Any) -> pd.DataFrame:
    """The run table of MLflow Run objects (trial or train runs; sweep parents are left out).

    `client` (an MlflowClient on the runs' store) reads each run's val/ppl history for
    BEST_VAL_PPL; one request per run. A run_key met more than once keeps its best run:
    FINISHED before others, then the newest.
    """
    kept = [r for r in runs if r.data.tags.get(schema.TAG_KIND) != "sweep"]
    rows = [_row(r, _val_history(client, r)) for r in kept]
    if not rows:
        return apply_types(pd.DataFrame(columns=[*META_TYPES, BEST_VAL_PPL]))
    table = pd.DataFrame(rows)
    table["_finished"] = table[STATUS] == "FINISHED"
    table = table.sort_values(["_finished", START_TIME], ascending=False)
    keyed = table[RUN_KEY].notna()
    table = pd.concat([table[keyed].drop_duplicates(RUN_KEY), table[~keyed]])
    table = _with_run_metrics(table.drop(columns="_finished"))
    return apply_types(_ordered(table).sort_values(START_TIME).reset_index(drop=True))


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    meta = [c for c in META_TYPES if c in table.columns]
    config = config_columns(table)
    metrics = [BEST_VAL_PPL, *schema.RUN_METRICS]  # the selection figure first
    known = [c for c in metrics if c in table.columns]
    rest = sorted(c for c in table.columns if c not in {*meta, *config, *known})
    return table[meta + config + known + rest]


def experiment_ids(client: Any, name: str) -> tuple[list[str], str | None]:
    """The experiments of a sweep or experiment `name`, and the sweep tag to filter on.

    `name` is an experiment (a sweep's experiment is its name unless the spec says otherwise);
    failing that, a sweep name looked up by tag in every experiment.
    """
    if "'" in name or "`" in name:  # MLflow's filter strings cannot quote these
        raise RunTableError(f"'{name}': sweep and experiment names cannot hold quotes here.")
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        tagged = client.search_runs(
            [experiment.experiment_id], f"tags.`{schema.TAG_SWEEP}` = '{name}'", max_results=1
        )
        return [experiment.experiment_id], name if tagged else None
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, f"tags.`{schema.TAG_SWEEP}` = '{name}'", max_results=50_000)
    return sorted({r.info.experiment_id for r in found}), name if found else None


def runs_table(
    name: str, tracking_uri: str | None = None, sweep: str | None = None, client: Any = None
) -> pd.DataFrame:
    """The run table of sweep or experiment `name` in the MLflow store at `tracking_uri`.

    `sweep` restricts it to runs tagged with that sweep (for an experiment shared by several
    sweeps); by default runs are restricted to sweep `name` when any carry that tag.
    """
    from duosparse import tracking

    client = client or tracking.open_store(tracking_uri)
    ids, tag = experiment_ids(client, name)
    tag = sweep or tag
    if not ids:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise RunTableError(
            f"there is no experiment or sweep '{name}' in the tracking store "
            f"{client.tracking_uri} (experiments there: {known}); check the name, pass the "
            "sweep's spec YAML, or --tracking-uri."
        )
    filter_string = f"tags.`{schema.TAG_SWEEP}` = '{tag}'" if tag else ""
    runs = client.search_runs(ids, filter_string, max_results=50_000)
    table = table_from_runs(runs, client)
    table.attrs.update(sweep=tag or name, tracking_uri=client.tracking_uri, experiment_ids=ids)
    return table


def newest_parent_run(client: Any, ids: list[str], sweep: str) -> str | None:
    """The run id of the sweep's newest launch (parent run), where analyses are logged."""
    runs = client.search_runs(
        ids,
        f"tags.`{schema.TAG_KIND}` = 'sweep' and tags.`{schema.TAG_SWEEP}` = '{sweep}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# --- seeds ------------------------------------------------------------------------------


def mean_ci(values: Any, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, Student-t confidence interval and standard deviation of the finite values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * std / math.sqrt(x.size)
    return mean, mean - half, mean + half, std


def ok_mask(table: pd.DataFrame) -> pd.Series:
    """True for the runs the analysis counts (column `ok`: FINISHED, with a finite, uncapped
    perplexity); every run when the table has no such column."""
    if OK not in table:
        return pd.Series(True, index=table.index)
    return table[OK].fillna(False).astype(bool)


def usable_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The runs the analysis counts (`ok_mask`)."""
    return table[ok_mask(table)]


def aggregate_seeds(
    table: pd.DataFrame, metrics: list[str] | None = None, confidence: float = 0.95
) -> pd.DataFrame:
    """One row per configuration (every config key but the seed) over the `ok` runs.

    Each metric column holds the mean over seeds, with `<metric>:ci_low`, `<metric>:ci_high`
    (Student-t, `confidence`) and `<metric>:std` beside it; `run_id` is the first seed's run
    (a representative for links), `run_ids` all of them.
    """
    ok = usable_rows(table)
    metrics = metrics or metric_columns(table)
    keys = [c for c in config_columns(table) if c not in (SEED, WARM_START)]
    rows = []
    if keys and len(ok):
        groups = ok.groupby(keys, dropna=False, sort=True)
    else:
        groups = [((), ok)] if len(ok) else []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key))
        row[RUN_ID] = group[RUN_ID].iloc[0]
        row[RUN_IDS] = ",".join(group[RUN_ID])
        row[N_SEEDS] = len(group)
        row[SEEDS] = ",".join(str(s) for s in group[SEED]) if SEED in group else ""
        if SWEEP in group:
            row[SWEEP] = group[SWEEP].iloc[0]
        for m in metrics:
            mean, low, high, std = mean_ci(group[m], confidence)
            row.update({m: mean, f"{m}:ci_low": low, f"{m}:ci_high": high, f"{m}:std": std})
        rows.append(row)
    columns = keys + [RUN_ID, RUN_IDS, N_SEEDS, SEEDS] + ([SWEEP] if SWEEP in table else [])
    columns += [f"{m}{s}" for m in metrics for s in ("", ":ci_low", ":ci_high", ":std")]
    out = pd.DataFrame(rows, columns=columns)
    out.attrs.update(table.attrs)
    return apply_types(out)


# --- files --------------------------------------------------------------------------------

TABLE_SUFFIXES = (".csv", ".parquet")


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Export to CSV or Parquet (by suffix); `read_table` restores the same types."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        out = table.copy()
        out.attrs = {
            k: v for k, v in table.attrs.items() if isinstance(v, str | int | float | list)
        }
        out.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        raise RunTableError(f"'{path}': export as .csv or .parquet.")
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    """A run table (or seed-aggregated table) written by `write_table`."""
    path = Path(path)
    if not path.is_file():
        raise RunTableError(f"the run table '{path}' does not exist.")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        elif path.suffix == ".csv":
            table = pd.read_csv(path)  # pandas 3 parses floats back exactly
        else:
            raise RunTableError(f"'{path}' is neither .csv nor .parquet.")
    except RunTableError:
        raise
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for a bad file
        raise RunTableError(
            f"'{path}' cannot be read as a run table ({type(e).__name__}: {e})."
        ) from None
    if RUN_ID not in table.columns:
        raise RunTableError(
            f"'{path}' is not a duosparse run table (no '{RUN_ID}' column); export one with "
            "`duosparse analyze SWEEP` (runs.parquet / runs.csv in its output folder)."
        )
    if schema.TEST_PPL in table.columns and BEST_VAL_PPL not in table.columns:
        # Selecting on the last epoch's val/ppl instead would be wrong whenever an earlier
        # epoch was the best, so the table is refused rather than analysed approximately.
        raise RunTableError(
            f"'{path}' has no '{BEST_VAL_PPL}' column (best validation perplexity, which every "
            "analysis selects on): it was exported by an older duosparse. Analyse the sweep "
            "from its tracking store (`duosparse analyze SWEEP`), which writes a new runs.parquet."
        )
    attrs = dict(table.attrs)
    table = apply_types(table)
    if OK in table:  # a FAILED or capped run is never used, whatever the exporting version said
        table = _with_run_metrics(table)
        unusable = np.zeros(len(table), dtype=bool)
        if STATUS in table:
            unusable |= (table[STATUS] != "FINISHED").fillna(True).to_numpy(dtype=bool)
        for column in (schema.TEST_PPL, BEST_VAL_PPL):
            if column in table:
                unusable |= at_cap(table[column].to_numpy(dtype=float, na_value=math.nan))
        table[OK] = (ok_mask(table) & ~unusable).astype("boolean")
    table.attrs.update(attrs)
    if "sweep" not in table.attrs:
        sweeps = table[SWEEP].dropna().unique() if SWEEP in table else []
        table.attrs["sweep"] = str(sweeps[0]) if len(sweeps) == 1 else path.stem
    return table
