"""Run a sweep on Ray Tune, recorded in MLflow: one parent run per launch, one child run per
trial, identified by run_key (not by Ray's trial ids, which Ray's MLflow callback keeps only
in memory).

- The driver opens the store once (creating a fresh SQLite schema before any trial races to),
  creates the experiment and the parent run, and drops trials whose run_key is FINISHED.
- Each trial logs from inside its trainable into its own child run; a retried or resumed
  trial finds its run by run_key and continues it, and its training state from the resume
  file written every epoch (`<storage>/<name>.resume/<run_key>.pt`, dropped when the trial
  ends). That file is ours, not a Tune checkpoint: Tune deletes its older checkpoints before
  its experiment state on storage names the newer one, so a driver killed in between left a
  state that Tune itself could not restore ("checkpoint does not exist on storage anymore").
- Runs left RUNNING by a driver that died are marked KILLED at the next launch (or by
  `duosparse reconcile`); `sweep status` only reads, and shows them with that reason.
- A spec with stages runs them in order, one Tune experiment each (`<name>.<stage>`); a trial
  of a later stage warm-starts from its parent run's final checkpoint, fetched through MLflow,
  and is SKIPPED (with the reason) when that parent FAILED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import schema, tracking, warmstart
from .config import RunConfig
from .eta import SweepEta
from .sweep import SweepSpec, describe, expand_stages, search_bases

TUNE_VAL_LOSS = "val_loss"  # Tune's view of val/loss, for ASHA


class SweepError(RuntimeError):
    """A sweep that cannot start; the message names the cause and the fix."""


class SweepInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the launch; it and its unfinished trials are KILLED."""

    def __init__(self, signal_name: str, killed: int):
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name, self.killed = signal_name, killed


# --- MLflow identity --------------------------------------------------------------------


def _driver_alive(driver: str | None) -> bool:
    """Whether the process that launched a sweep still runs (known only on its own host:
    from another one it is taken as alive and left alone)."""
    if not driver or ":" not in driver:
        return False
    return tracking.process_alive(driver) is not False


def sweep_runs(client: Any, experiment_id: str) -> list[Any]:
    return client.search_runs([experiment_id], max_results=50_000)


def orphans(client: Any, experiment_id: str) -> list[Any]:
    """RUNNING runs whose launching driver is gone (their launch's driver, for trials)."""
    runs = sweep_runs(client, experiment_id)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"}
    found = []
    for run in runs:
        if run.info.status != "RUNNING" or run.data.tags.get(schema.TAG_KIND) not in (
            "sweep",
            "trial",
        ):
            continue
        parent = parents.get(run.data.tags.get(schema.TAG_PARENT_RUN_ID, run.info.run_id))
        if not _driver_alive((parent or run).data.tags.get(schema.TAG_DRIVER)):
            found.append(run)
    return found


def mark_orphans_killed(client: Any, experiment_id: str) -> int:
    """RUNNING runs whose launching driver is gone become KILLED; returns how many."""
    dead = orphans(client, experiment_id)
    for run in dead:
        tracking.finish_run(
            client, run.info.run_id, "KILLED", "the sweep driver stopped before this run ended"
        )
    return len(dead)


def runs_by_key(client: Any, experiment_id: str) -> dict[str, Any]:
    """The newest trial run for each run_key (there should be only one)."""
    found: dict[str, Any] = {}
    for run in sweep_runs(client, experiment_id):
        key = run.data.tags.get(schema.TAG_RUN_KEY)
        if key and run.data.tags.get(schema.TAG_KIND) == "trial":
            if key not in found or run.info.start_time > found[key].info.start_time:
                found[key] = run
    return found


# --- the trainable (runs on Ray workers) --------------------------------------------------


class TuneReporter:
    """Reports each epoch to MLflow, saves the epoch's resume state, then reports to Tune."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        workdir: Path,
        resume_uri: str | None,
        extra: dict[str, Any] | None = None,
    ):
        self.mlflow = tracking.MlflowReporter(client, run_id)
        self.run_id, self.workdir, self.resume_uri = run_id, workdir, resume_uri
        # Tune (and ASHA, and a single-objective searcher) want the same keys in every result
        self.result: dict[str, Any] = {
            "epoch": 0,
            TUNE_VAL_LOSS: float("inf"),
            "mlflow_run_id": run_id,
            **(extra or {}),
        }

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from ray import tune

        self.mlflow.log_metrics(metrics, step)
        if schema.VAL_LOSS not in metrics:  # the final test figures: no new epoch for Tune
            return
        self.result.update({"epoch": step, TUNE_VAL_LOSS: metrics[schema.VAL_LOSS]})
        # after MLflow has the epoch: a kill in between repeats an epoch, never loses one
        save_resume_state(self.workdir / "last.pt", self.resume_uri)
        tune.report(dict(self.result))

    def log_missing(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_missing(metrics, step)  # Tune had it, or restarts from its own checkpoint

    def done(self, failed: bool = False, extra: dict[str, Any] | None = None) -> None:
        from ray import tune

        tune.report({**self.result, **(extra or {}), "duosparse_done": True, "failed": failed})

    def log_artifact(self, path: Path) -> None:
        self.mlflow.log_artifact(path)


def run_trial(params: dict[str, Any]) -> None:
    """Ray Tune trainable: one RunConfig, one MLflow child run (a grid trial, or a point a
    search sampled: then the objectives go back to the searcher when it ends)."""
    if "search" in params:
        from . import sweep_search

        context = params["search"]
        config = sweep_search.trial_config(context, sweep_search.sampled_keys(params))
        trial = sweep_search.trial_params(context, config, params)
        trial["resume_uri"] = resume_uri(context["storage"], context["sweep"], config.run_key)
        _train_trial(
            trial,
            config,
            lambda client, run_id: sweep_search.search_result(client, run_id, config, context),
            sweep_search.placeholders(context),
        )
        return
    params = params["trial"]
    _train_trial(params, RunConfig.model_validate(params["config"]), None, {})


Outcome = Callable[[Any, "str | None"], dict[str, float]]


def _train_trial(
    params: dict[str, Any], config: RunConfig, outcome: Outcome | None, extra: dict[str, Any]
) -> None:
    """Train `config` in its child run (or continue it); `outcome` (searches) adds what the
    last result tells the searcher, from what the run logged (None: the run failed)."""
    from ray import tune

    from .train import TrainingDiverged, train

    client = tracking.mlflow_client(params["tracking_uri"])
    existing = runs_by_key(client, params["experiment_id"]).get(config.run_key)
    resume_uri = params.get("resume_uri")  # None in a Tune state saved by an older duosparse
    final = (lambda run_id: outcome(client, run_id)) if outcome else (lambda run_id: {})
    if existing is not None and existing.info.status == "FINISHED":
        # finished before a killed driver could record it in Tune, or a search sampled a
        # config that already ran: nothing left to run, its logged figures are the result
        drop_resume_state(resume_uri)
        tune.report(
            {
                "epoch": config.train.epochs,
                TUNE_VAL_LOSS: float("inf"),
                "mlflow_run_id": existing.info.run_id,
                "duosparse_done": True,
                "failed": False,
                "deduplicated": True,
                **final(existing.info.run_id),
            }
        )
        return
    run_id = _trial_run(client, params, config, existing)
    workdir = Path(tempfile.mkdtemp(prefix=f"duosparse-{config.run_key[:12]}-"))
    # a retry or a resumed sweep continues from the last epoch (train checks the run_key)
    load_resume_state(resume_uri, workdir / "last.pt")
    reporter = TuneReporter(client, run_id, workdir, resume_uri, extra)
    try:
        source = warmstart.resolve(client, config)
        init = warmstart.fetch_checkpoint(client, source, workdir / "init") if source else None
        train(config, reporter, workdir, progress=False, init_checkpoint=init)
    except (TrainingDiverged, warmstart.WarmStartError) as e:
        # deterministic: retrying would diverge again, so the trial ends here, FAILED
        tracking.finish_run(client, run_id, "FAILED", str(e))
        drop_resume_state(resume_uri)  # a rerun starts afresh rather than diverge again
        reporter.done(failed=True, extra=final(None))
        return
    except Exception as e:
        tracking.finish_run(client, run_id, "FAILED", f"{type(e).__name__}: {e}")
        raise  # Ray retries it per the spec's `retries`
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    tracking.finish_run(client, run_id, "FINISHED")
    drop_resume_state(resume_uri)
    reporter.done(extra=final(run_id))


# --- resume state: one file per unfinished trial, on Tune's storage (a path or a URI) ---------


def resume_uri(storage: str, sweep_name: str, run_key: str) -> str:
    return f"{storage.rstrip('/')}/{sweep_name}.resume/{run_key}.pt"


def _filesystem(uri: str) -> tuple[Any, str]:
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


def save_resume_state(local: Path, uri: str | None) -> None:
    """Copy `local` to `uri`, replacing the previous epoch's file only once the copy is whole."""
    if uri is None:
        return
    filesystem, path = _filesystem(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    partial = path + ".partial"
    with (
        open(local, "rb") as source,
        filesystem.open_output_stream(partial, compression=None) as target,
    ):
        shutil.copyfileobj(source, target, 1 << 20)
    filesystem.move(partial, path)


def load_resume_state(uri: str | None, local: Path) -> bool:
    """Copy the trial's resume file to `local`; False when there is none."""
    from pyarrow import fs

    if uri is None:
        return False
    filesystem, path = _filesystem(uri)
    if filesystem.get_file_info(path).type != fs.FileType.File:
        return False
    with (
        filesystem.open_input_stream(path, compression=None) as source,
        open(local, "wb") as target,
    ):
        shutil.copyfileobj(source, target, 1 << 20)
    return True


def drop_resume_state(uri: str | None) -> None:
    from pyarrow import fs

    if uri is None:
        return
    filesystem, path = _filesystem(uri)
    if filesystem.get_file_info(path).type == fs.FileType.File:
        filesystem.delete_file(path)


def _trial_run(client: Any, params: dict[str, Any], config: RunConfig, existing: Any) -> str:
    """The trial's MLflow run: `existing` (the unfinished run of its run_key), or a new child."""
    if existing is None:
        run_id = tracking.start_run(
            client,
            params["experiment_id"],
            config,
            kind="trial",
            run_name=params["run_name"],
            parent_run_id=params["parent_run_id"],
            tags={
                schema.TAG_SWEEP: params["sweep"],
                **({schema.TAG_STAGE: params["stage"]} if params.get("stage") else {}),
                **({schema.TAG_SPEC_HASH: params["spec_hash"]} if params.get("spec_hash") else {}),
                **params.get("tags", {}),
            },
        )
        # A worker that outlived a killed driver may have created one at the same moment:
        # every process keeps the oldest run of the key and deletes its own newer one.
        same = client.search_runs(
            [params["experiment_id"]],
            filter_string=f"tags.`{schema.TAG_RUN_KEY}` = '{config.run_key}' "
            f"and tags.`{schema.TAG_KIND}` = 'trial'",
        )
        oldest = min(same, key=lambda r: (r.info.start_time, r.info.run_id))
        if oldest.info.run_id == run_id:
            return run_id
        client.delete_run(run_id)
        existing = oldest
    if existing.info.status != "RUNNING":
        client.update_run(existing.info.run_id, status="RUNNING")
    client.set_tag(existing.info.run_id, schema.TAG_FAILURE, "")
    tracking.complete_params(client, existing, config)
    return existing.info.run_id


# --- the driver ---------------------------------------------------------------------------


SKIPPED = "SKIPPED"  # not an MLflow status: a trial whose warm-start parent FAILED never runs


@dataclass
class Plan:
    spec: SweepSpec
    trials: list[RunConfig]
    status: dict[str, str] = field(
        default_factory=dict
    )  # run_key -> MLflow status, PENDING or SKIPPED
    reasons: dict[str, str] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    stages: dict[str, str | None] = field(default_factory=dict)  # run_key -> its stage
    # a search stage's trials are found in the store (sweep and stage tags), not known ahead
    search_runs: dict[str | None, list[Any]] = field(default_factory=dict)
    # search stages a launch of this very spec (same hash) saw through to its last sample
    search_done: set[str | None] = field(default_factory=set)

    def remaining(self, stage: str | None) -> int:
        """How many of a search stage's num_samples are still to draw: none once a launch of
        this spec drew them all (some may have reused a run or failed), else those without a
        FINISHED run of the search (0 for a grid)."""
        search = self.spec.stage_search(stage)
        if search is None or stage in self.search_done:
            return 0
        done = {
            r.data.tags.get(schema.TAG_RUN_KEY)
            for r in self.search_runs.get(stage, [])
            if r.info.status == "FINISHED"
        }
        return max(search.num_samples - len(done), 0)

    @property
    def samples_left(self) -> int:
        return sum(self.remaining(stage) for stage in self.spec.stage_names)

    @property
    def size(self) -> int:
        """Grid trials plus each search's num_samples."""
        searches = [self.spec.stage_search(s) for s in self.spec.stage_names]
        return len(self.trials) + sum(s.num_samples for s in searches if s)

    @property
    def todo(self) -> list[RunConfig]:
        return [c for c in self.trials if self.status.get(c.run_key) not in ("FINISHED", SKIPPED)]

    def stage_todo(self, stage: str | None) -> list[RunConfig]:
        return [c for c in self.todo if self.stages.get(c.run_key) == stage]

    def rows(self) -> list[dict[str, Any]]:
        return self._grid_rows() + self._search_rows()

    def _search_rows(self) -> list[dict[str, Any]]:
        """One row per run a search stage ran, then one for the samples not drawn yet."""
        staged, rows = bool(self.spec.stages), []
        keys = [k for k in describe(RunConfig(), self.spec)]
        for stage in self.spec.stage_names:
            search = self.spec.stage_search(stage)
            if search is None:
                continue
            where = {"stage": stage} if staged else {}
            for run in sorted(self.search_runs.get(stage, []), key=lambda r: r.info.start_time):
                params = run.data.params
                rows.append(
                    {
                        "run_key": run.data.tags.get(schema.TAG_RUN_KEY, "")[:12],
                        **where,
                        **{k: _param(params.get(k)) for k in keys},
                        "status": run.info.status,
                        "reason": run.data.tags.get(schema.TAG_FAILURE, ""),
                        "run_id": run.info.run_id,
                    }
                )
            left = self.remaining(stage)
            if left:
                rows.append(
                    {
                        "run_key": "",
                        **where,
                        **{k: None for k in keys},
                        "status": "PENDING",
                        "reason": f"search: {left} of {search.num_samples} samples to go",
                        "run_id": "",
                    }
                )
        return rows

    def _grid_rows(self) -> list[dict[str, Any]]:
        staged = bool(self.spec.stages)
        return [
            {
                "run_key": c.run_key[:12],
                **({"stage": self.stages.get(c.run_key)} if staged else {}),
                **describe(c, self.spec),
                "status": self.status.get(c.run_key, "PENDING"),
                "reason": self.reasons.get(c.run_key, ""),
                "run_id": self.run_ids.get(c.run_key, ""),
            }
            for c in self.trials
        ]


def tracking_uri_for(spec: SweepSpec, override: str | None = None) -> str:
    return override or spec.tracking.uri or tracking.default_tracking_uri()


def plan(spec: SweepSpec, uri: str, reconcile: bool = False) -> Plan:
    """Expand the spec and look up each trial's state in MLflow. Only with `reconcile` (a
    launch) does it write: runs whose driver is gone are then marked KILLED; otherwise they
    are shown RUNNING with that reason."""
    stages: dict[str, str | None] = {}
    trials: dict[str, RunConfig] = {}
    for stage, configs in expand_stages(spec):
        for config in configs:
            trials.setdefault(config.run_key, config)
            stages.setdefault(config.run_key, stage)
    result = Plan(spec, list(trials.values()), stages=stages)
    client = tracking.open_store(uri, reconcile=reconcile)
    experiment = client.get_experiment_by_name(spec.experiment)
    if experiment is None:
        return result
    dead = set()
    if reconcile:
        mark_orphans_killed(client, experiment.experiment_id)
    else:
        dead = {run.info.run_id for run in orphans(client, experiment.experiment_id)}
    found = runs_by_key(client, experiment.experiment_id)
    for config in result.trials:
        run = found.get(config.run_key)
        if run is None:
            continue
        result.status[config.run_key] = run.info.status
        result.run_ids[config.run_key] = run.info.run_id
        if run.data.tags.get(schema.TAG_FAILURE):
            result.reasons[config.run_key] = run.data.tags[schema.TAG_FAILURE]
        if run.data.tags.get(schema.TAG_EARLY_STOPPED) == "true":
            result.reasons[config.run_key] = "stopped early by ASHA"
        if run.info.run_id in dead:
            result.reasons[config.run_key] = (
                "its sweep driver is gone; the next `duosparse sweep run` (or `duosparse "
                "reconcile`) marks it KILLED and continues it"
            )
    _skip_orphaned(result)
    result.search_runs = search_runs(client, experiment.experiment_id, spec, dead, result.reasons)
    result.search_done = _searches_done(client, experiment.experiment_id, spec)
    return result


def _searches_done(client: Any, experiment_id: str, spec: SweepSpec) -> set[str | None]:
    """The search stages that a launch of this spec (same hash) drew to the last sample."""
    if not spec.searches:
        return set()
    found = set()
    launches = client.search_runs(
        [experiment_id],
        f"tags.`{schema.TAG_KIND}` = 'sweep' and tags.`{schema.TAG_SWEEP}` = '{spec.name}' "
        f"and tags.`{schema.TAG_SPEC_HASH}` = '{spec.spec_hash()}'",
        max_results=10_000,
    )
    for stage in spec.stage_names:
        if any(schema.search_done_tag(stage) in r.data.tags for r in launches):
            found.add(stage)
    return found


def _param(text: str | None) -> Any:
    return yaml.safe_load(text) if text else None


def search_runs(
    client: Any, experiment_id: str, spec: SweepSpec, dead: set[str], reasons: dict[str, str]
) -> dict[str | None, list[Any]]:
    """The trial runs of each search stage of `spec` (by its sweep and stage tags); a run of a
    driver that is gone gets that reason."""
    stages = [s for s in spec.stage_names if spec.stage_search(s) is not None]
    found: dict[str | None, list[Any]] = {s: [] for s in stages}
    if not stages:
        return found
    for run in runs_by_key(client, experiment_id).values():
        tags = run.data.tags
        stage = tags.get(schema.TAG_STAGE)
        if (
            tags.get(schema.TAG_SWEEP) == spec.name
            and tags.get(schema.TAG_SEARCH)
            and stage in found
        ):
            found[stage].append(run)
            if run.info.run_id in dead:
                reasons[tags[schema.TAG_RUN_KEY]] = "its sweep driver is gone"
    return found


def _skip_orphaned(result: Plan) -> None:
    """Trials not yet run whose warm-start parent (a trial of this plan) FAILED or was SKIPPED."""
    for config in result.trials:  # in stage order: a SKIPPED parent skips its children too
        parent = config.init.from_run_key
        if config.run_key in result.run_ids or parent not in result.stages:
            continue
        if result.status.get(parent) in ("FAILED", SKIPPED):
            result.status[config.run_key] = SKIPPED
            result.reasons[config.run_key] = (
                f"its warm start, run {parent[:12]} of stage '{result.stages[parent]}', "
                f"{result.status[parent]}: {result.reasons.get(parent, 'no reason recorded')}"
            )[:2000]


def silent_starts(configs: list[RunConfig]) -> dict[str, str]:
    """run_key -> why that EGRU trial would start silent (train.probe_silent_start), for the
    trials whose corpus can be read here; one probe per distinct model, seed and batch."""
    from . import data
    from .train import probe_silent_start

    found: dict[str, str] = {}
    probed: dict[str, str | None] = {}
    for config in configs:
        if config.model.arch != "egru" or config.init.from_run_key:  # warm starts begin trained
            continue
        t = config.train
        key = json.dumps(
            [
                config.model.model_dump(mode="json"),
                config.data.model_dump(mode="json"),
                t.seed,
                t.batch_size,
                t.bptt,
            ],
            sort_keys=True,
        )
        if key not in probed:
            try:
                corpus = data.load_corpus(config.data.corpus, config.data.dir, seed=t.seed)
            except (data.DataNotFoundError, data.DataIntegrityError):
                probed[key] = None  # the trial itself will report the missing data
            else:
                probed[key] = probe_silent_start(config, corpus)
        if probed[key]:
            found[config.run_key] = probed[key]
    return found


def _check_cluster(address: str | None, uri: str) -> None:
    remote = bool(address) and address not in ("local",)
    if remote and tracking.is_local_uri(uri):
        raise SweepError(
            f"The sweep goes to the Ray cluster at '{address}' but the MLflow store is '{uri}', a "
            "local SQLite/file store that workers on other machines cannot reach (and SQLite "
            "cannot take parallel writers over a network). Start an MLflow tracking server and "
            "set MLFLOW_TRACKING_URI=http://HOST:PORT (or tracking.uri in the spec)."
        )


def _storage_path(spec: SweepSpec) -> str:
    """Where Tune keeps its state: the spec's storage_path, $DUOSPARSE_TUNE_STORAGE, or
    ./runs/tune. Under `ray job submit` the cwd is the job's unpacked working_dir, which Ray
    may delete and unpack again (and a new job gets a new one), so there the default is the
    user's cache instead. On a multi-machine cluster set storage_path to shared storage."""
    path = spec.storage_path or os.environ.get("DUOSPARSE_TUNE_STORAGE")
    if not path:
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set for `ray job submit` entrypoints
        path = str(
            Path.home() / ".cache" / "duosparse" / "tune"
            if in_job
            else Path.cwd() / "runs" / "tune"
        )
    return path if "://" in path else str(Path(path).resolve())


def _corpus_sizes() -> Callable[[RunConfig], tuple[int, int, int] | None]:
    """(train, valid, test) token counts per corpus, read once each here on the driver; None
    where the driver cannot read it (the trials on the cluster may)."""
    from . import data

    cache: dict[tuple, tuple[int, int, int] | None] = {}

    def sizes(config: RunConfig) -> tuple[int, int, int] | None:
        key = (
            config.data.corpus,
            config.data.dir,
            config.train.seed if config.data.corpus == "synthetic" else 0,
        )
        if key not in cache:
            try:
                corpus = data.load_corpus(
                    config.data.corpus, config.data.dir, seed=config.train.seed
                )
                cache[key] = (len(corpus.train), len(corpus.valid), len(corpus.test))
            except (data.DataNotFoundError, data.DataIntegrityError):
                cache[key] = None
        return cache[key]

    return sizes


def _restore_path(storage: str, spec: SweepSpec, stage: str | None) -> str:
    return f"{storage.rstrip('/')}/{spec.name}" + (f".{stage}" if stage else "")


def run_sweep(
    spec: SweepSpec,
    address: str | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    show_progress: bool = True,
) -> Plan:
    """Launch (or resume) the sweep, stage after stage; returns the plan with each trial's
    final status."""
    from . import sweep_progress

    address = address or os.environ.get("RAY_ADDRESS")
    # Ray starts workers at niceness 15; trials are the work here, so give them full priority
    os.environ.setdefault("RAY_worker_niceness", "0")
    uri = tracking_uri_for(spec, tracking_uri)
    _check_cluster(address, uri)
    client = tracking.open_store(uri, reconcile=True)  # the schema once, before any trial
    experiment_id = tracking.ensure_experiment(client, spec.experiment, experiment_note(spec))
    current = plan(spec, uri, reconcile=True)
    if not current.todo and not current.samples_left:
        return current
    _check_warm_starts(client, current)
    parent = _start_launch(client, spec, experiment_id)
    started = client.get_run(parent).info.start_time
    _start_ray(address)
    sweep_progress.LAUNCH_ETA = SweepEta(current.todo, _corpus_sizes())
    keys = [c.run_key for c in current.todo]
    adopt_trial_runs(client, experiment_id, keys, parent)  # the runs this launch continues
    launch = _Launch(spec, uri, experiment_id, parent, resume, show_progress)
    stop = _StopOnSignal()
    try:
        with stop:
            current = _run_stages(launch, current, stop)
    except KeyboardInterrupt:  # a second signal, or one outside Tune: stopped at once
        stop.signal_name = stop.signal_name or "SIGINT"
    finally:
        sweep_progress.LAUNCH_ETA = None
        keys += _search_keys_since(client, experiment_id, spec, started)
        adopt_trial_runs(client, experiment_id, keys, parent)  # trials a restored Tuner started
        if stop.signal_name:
            reason = f"interrupted by {stop.signal_name}"
            killed = _kill_running_trials(client, experiment_id, keys, reason)
            tracking.finish_run(client, parent, "KILLED", reason)
        else:
            tracking.finish_run(client, parent, "FINISHED")
    if stop.signal_name:
        raise SweepInterrupted(stop.signal_name, killed)
    return current


@dataclass
class _Launch:
    """One `sweep run`: what every stage's Tuner is given."""

    spec: SweepSpec
    uri: str
    experiment_id: str
    parent: str  # the launch's MLflow run
    resume: bool
    show_progress: bool


def _search_keys_since(
    client: Any, experiment_id: str, spec: SweepSpec, since_ms: int
) -> list[str]:
    """run_keys of the search trials this launch ran or continued (still running, or ended
    after it started)."""
    if not spec.searches:
        return []
    found = search_runs(client, experiment_id, spec, set(), {})
    return [
        r.data.tags[schema.TAG_RUN_KEY]
        for runs in found.values()
        for r in runs
        if r.info.end_time is None or r.info.end_time >= since_ms
    ]


def _start_launch(client: Any, spec: SweepSpec, experiment_id: str) -> str:
    """The launch's parent run, with the spec as this launch read it (its hash is on every
    trial) beside the report to come; its run id."""
    tags = {
        schema.TAG_KIND: "sweep",
        schema.TAG_SWEEP: spec.name,
        schema.TAG_SPEC_HASH: spec.spec_hash(),
        schema.TAG_DRIVER: tracking.process_id(),
        **tracking.code_tags(),
    }
    parent = client.create_run(experiment_id, run_name=f"{spec.name} launch", tags=tags)
    run_id = parent.info.run_id
    client.set_tag(run_id, schema.TAG_NOTE, launch_note(spec, experiment_id, run_id))
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    client.log_text(run_id, text, schema.ARTIFACT_SPEC)
    return run_id


def _start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    env_vars = {k: os.environ[k] for k in ("DUOSPARSE_DATA_DIR",) if k in os.environ}
    # "local" starts a fresh Ray here rather than joining one a `ray start` left behind
    ray.init(
        address=address or "local",
        runtime_env={"env_vars": env_vars} if env_vars else None,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


def _run_stages(launch: _Launch, current: Plan, stop: _StopOnSignal) -> Plan:
    """Each stage's unfinished trials on a Tuner of its own; the plan after the last stage
    (each stage sees the one before's failures: a failed parent skips its children)."""
    from . import sweep_progress

    spec, storage = launch.spec, _storage_path(launch.spec)
    for stage in spec.stage_names:
        eta = sweep_progress.LAUNCH_ETA
        for config in current.trials:  # skipped ones: their work is not coming
            skipped = current.status.get(config.run_key) == SKIPPED
            if eta and skipped and current.stages.get(config.run_key) == stage:
                eta.trial_ended(config.run_key, started=False)
        todo = current.stage_todo(stage)
        path = _restore_path(storage, spec, stage)
        tuner = None
        if spec.stage_search(stage) is not None and current.remaining(stage):
            tuner = _search_tuner(launch, stage, path)
        elif todo:
            tuner = _tuner(launch, stage, todo, path)
        if tuner is not None:
            with stop.tune_stops_gracefully():
                grid = _fit_from_storage_folder(storage, tuner)
            if spec.stage_search(stage) is not None and not stop.signal_name and grid is not None:
                _mark_search_done(launch, stage, grid)
        if stop.signal_name:
            break
        current = plan(spec, launch.uri)
    return current


def experiment_note(spec: SweepSpec) -> str:
    """The experiment's description in the MLflow UI."""
    what = f" {spec.description.strip()}" if spec.description.strip() else ""
    return (
        f"duosparse sweep **{spec.name}** (`sweeps/{spec.name}.yaml` or the spec it was run from).{what}\n\n"
        "Each *launch* run holds one child run per trial; a trial's params are its whole config, "
        "its metrics are logged per epoch and, at the end, on the test split. "
        f"Useful columns: {', '.join(f'`{c}`' for c in schema.UI_COLUMNS)}. "
        f"`duosparse analyze {spec.name}` adds the report and the Pareto figures to the newest launch "
        f"run, under `{schema.ARTIFACTS_ANALYSIS}/`."
    )


def launch_note(spec: SweepSpec, experiment_id: str, run_id: str) -> str:
    """A launch run's description: what it is, which columns to pick, and links (within the
    MLflow UI) to where the report and the figures land."""
    artifacts = f"#/experiments/{experiment_id}/runs/{run_id}/artifacts"
    return (
        f"Launch of sweep **{spec.name}** (spec hash `{spec.spec_hash()[:12]}`): its children are "
        "the trials this launch ran or continued.\n\n"
        f"In the runs table, pick the columns {', '.join(f'`{c}`' for c in schema.UI_COLUMNS)} "
        "(*Columns* button) to compare trials; a trial's page has its per-epoch charts.\n\n"
        f"After `duosparse analyze {spec.name}`: [the report]({artifacts}/{schema.ARTIFACTS_ANALYSIS}/report.html) "
        "(Pareto fronts, trade-off fits, iso-perplexity) and the tables in this run's artifacts; "
        f"`duosparse export pareto` (part of `make sweep`) adds [the figures]({artifacts}/{schema.ARTIFACTS_PARETO}) "
        "as PNG."
    )


def adopt_trial_runs(client: Any, experiment_id: str, run_keys: list[str], parent: str) -> None:
    """Hang the trial runs of `run_keys` under the launch `parent`: a run continued by a later
    launch belongs to the launch that finished it, not to the interrupted one that began it."""
    wanted = set(run_keys)
    for key, run in runs_by_key(client, experiment_id).items():
        if key in wanted and run.data.tags.get(schema.TAG_PARENT_RUN_ID) != parent:
            client.set_tag(run.info.run_id, schema.TAG_PARENT_RUN_ID, parent)


def _kill_running_trials(client: Any, experiment_id: str, run_keys: list[str], reason: str) -> int:
    wanted, count = set(run_keys), 0
    for key, run in runs_by_key(client, experiment_id).items():
        if key in wanted and run.info.status == "RUNNING":
            tracking.finish_run(client, run.info.run_id, "KILLED", reason)
            count += 1
    return count


def _no_restore_hint(record: logging.LogRecord) -> bool:
    """Tune's lines about its interruption: ours replace them (the resume line is `duosparse
    sweep run SPEC --resume`, not `Tuner.restore(...)`)."""
    text = record.getMessage()
    return not any(
        s in text for s in ("Tuner.restore", "Stop signal received", "Trials did not complete")
    )


class _StopOnSignal:
    """SIGINT and SIGTERM stop the launch: inside Tune's loop the first one asks Tune to stop
    gracefully (SIGUSR1, which Tune always handles: it saves its state and stops the trials), so
    that `--resume` finds everything; a second one, or one outside Tune's loop, stops at once.
    Tune's own SIGINT handler is off: it would print a `Tuner.restore(...)` hint, not ours."""

    def __init__(self):
        self.signal_name: str | None = None
        self._in_tune = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        logging.getLogger("ray.tune.tune").addFilter(_no_restore_hint)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        logging.getLogger("ray.tune.tune").removeFilter(_no_restore_hint)

    def _handle(self, signum: int, frame: object) -> None:
        import signal

        first = self.signal_name is None
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if first and self._in_tune:
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def tune_stops_gracefully(self):
        self._in_tune = True
        try:
            yield
        finally:
            self._in_tune = False


def _tuner(launch: _Launch, stage: str | None, todo: list[RunConfig], path: str) -> Any:
    """A new Tuner for one stage's unfinished trials, or the interrupted one with --resume."""
    from ray import tune

    spec, uri = launch.spec, launch.uri
    trainable = _trainable(spec)
    restored = _restored(launch, path, trainable)
    if restored is not None:
        return restored
    storage = path.rsplit("/", 1)[0]
    return tune.Tuner(
        trainable,
        param_space={
            "trial": tune.grid_search(
                [
                    _trial_params(
                        c,
                        spec,
                        uri,
                        launch.experiment_id,
                        launch.parent,
                        stage,
                        resume_uri(storage, spec.name, c.run_key),
                    )
                    for c in todo
                ]
            )
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.max_concurrent, scheduler=_scheduler(spec, todo)
        ),
        run_config=_run_config(launch, stage, path),
    )


def _trainable(spec: SweepSpec) -> Any:
    from ray import tune

    return tune.with_resources(run_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _restored(launch: _Launch, path: str, trainable: Any) -> Any | None:
    """With --resume, the interrupted Tuner at `path` (its searcher included); otherwise None,
    and a local folder at `path` is cleared for a new one."""
    from ray import tune

    if launch.resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    if "://" not in path:
        shutil.rmtree(path, ignore_errors=True)
    return None


def _run_config(launch: _Launch, stage: str | None, path: str) -> Any:
    from ray import tune

    from .sweep_progress import SweepProgress

    storage, name = path.rsplit("/", 1)
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        verbose=0,
        callbacks=[SweepProgress(launch.uri, launch.show_progress, stage)],
        failure_config=tune.FailureConfig(max_failures=launch.spec.retries),
    )


def _search_tuner(launch: _Launch, stage: str | None, path: str) -> Any:
    """A Tuner whose OptunaSearch draws the stage's num_samples points, or the interrupted one
    (searcher state included) with --resume."""
    from ray import tune

    from . import sweep_search

    spec = launch.spec
    search = spec.stage_search(stage)
    trainable = _trainable(spec)
    restored = _restored(launch, path, trainable)
    if restored is not None:
        return restored
    storage = path.rsplit("/", 1)[0]
    bases = search_bases(spec, stage)
    context = sweep_search.search_context(
        spec,
        stage,
        bases,
        {
            "tracking_uri": launch.uri,
            "experiment_id": launch.experiment_id,
            "parent_run_id": launch.parent,
            "sweep": spec.name,
            "stage": stage,
            "spec_hash": spec.spec_hash(),
            "storage": storage,
        },
    )
    space = sweep_search.space_for(spec, stage, bases, context["int_keys"])
    return tune.Tuner(
        trainable,
        param_space={"search": context},
        tune_config=tune.TuneConfig(
            search_alg=sweep_search.make_searcher(search, space, spec.max_concurrent),
            num_samples=search.num_samples,
        ),
        run_config=_run_config(launch, stage, path),
    )


def _check_warm_starts(client: Any, current: Plan) -> None:
    """Warm starts from runs outside the spec (init.from_run_key in a base) must be usable
    before anything starts; the spec's own stages produce theirs as they run."""
    checked: set[str] = set()
    for config in current.todo:
        key = config.init.from_run_key
        if key is None or key in current.stages or key in checked:
            continue
        stage = current.stages.get(config.run_key)
        try:
            warmstart.resolve(client, config)
        except warmstart.WarmStartError as e:
            where = f"stage '{stage}'" if stage else "the spec's base"
            raise SweepError(f"Sweep '{current.spec.name}', {where}: {e}") from None
        checked.add(key)


def _mark_search_done(launch: _Launch, stage: str | None, grid: Any) -> None:
    """Record on the launch run that its search stage drew every sample (so that the next
    launch does not draw them again when some reused a run or failed)."""
    if len(grid) < launch.spec.stage_search(stage).num_samples:
        return
    client = tracking.mlflow_client(launch.uri)
    client.set_tag(launch.parent, schema.search_done_tag(stage), str(len(grid)))


def _fit_from_storage_folder(storage: str, tuner: Any) -> Any:
    """Run the Tuner from inside the (absolute, stable) storage folder.

    Under `ray job submit` the driver's cwd is the job's unpacked working_dir, which Ray may
    delete and unpack again while workers on the same host set up their runtime env; Tune's
    closing ExperimentAnalysis then fails in os.getcwd(). Its paths are all absolute, so a
    stable cwd for the duration of fit() changes nothing else."""
    previous = os.environ.get("PWD") or os.getcwd()
    if "://" in storage:
        return tuner.fit()
    Path(storage).mkdir(parents=True, exist_ok=True)
    os.chdir(storage)
    try:
        return tuner.fit()
    finally:
        try:
            os.chdir(previous)
        except OSError:
            pass


def _trial_params(
    config: RunConfig,
    spec: SweepSpec,
    uri: str,
    experiment_id: str,
    parent: str,
    stage: str | None,
    resume: str,
) -> dict:
    label = "-".join(f"{k.split('.')[-1]}={v}" for k, v in describe(config, spec).items())
    return {
        "config": config.model_dump(mode="json"),
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent,
        "sweep": spec.name,
        "stage": stage,
        "run_key": config.run_key,
        "resume_uri": resume,
        "spec_hash": spec.spec_hash(),
        "run_name": f"{spec.name}:{stage + ':' if stage else ''}{label}",
    }


def _scheduler(spec: SweepSpec, trials: list[RunConfig]):
    if spec.early_stopping is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = max(max(c.train.epochs for c in trials), 1)
    return ASHAScheduler(
        metric=TUNE_VAL_LOSS,
        mode="min",
        time_attr="epoch",
        max_t=max(epochs, spec.early_stopping.grace_period),
        grace_period=spec.early_stopping.grace_period,
        reduction_factor=spec.early_stopping.reduction_factor,
    )
