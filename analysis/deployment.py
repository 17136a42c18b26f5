"""The SpiNNaker2 model applied to tracked runs: a finished run's network (its masked weights
and measured event rates) read from MLflow, and the simulated figures logged back on it as
hw/spinnaker2/* metrics plus a JSON artifact (docs/spinnaker2.md). The command is
`duosparse simulate spinnaker2` (duosparse.cli.simulate)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from duosparse import schema, tracking
from duosparse.train import load_model

from . import spinnaker2 as s2
from .models import checkpoint_problem


def finished_sweep_runs(client: Any, sweep: str) -> list[Any]:
    """The FINISHED training runs that carry the sweep's tag (launch runs left out)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{schema.TAG_SWEEP}` = '{sweep}' and attributes.status = 'FINISHED'",
        max_results=10_000,
    )
    return [r for r in runs if r.data.tags.get(schema.TAG_KIND) != "sweep"]


def run_network(client: Any, run_id: str) -> tuple[s2.Network, int]:
    """The run's network (masked weights + measured event rates) and its final epoch."""
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types
        raise s2.SimulationError(
            f"there is no run '{run_id}' in the tracking store {client.tracking_uri}; copy the id "
            "from `duosparse train --json` or the MLflow UI, or pass --tracking-uri."
        ) from None
    if run.info.status != "FINISHED":
        raise s2.SimulationError(
            f"run {run_id} is {run.info.status}; only finished training runs have the trained "
            "model and activity to simulate."
        )
    with tempfile.TemporaryDirectory() as tmp:
        paths = _download(client, run_id, tmp)
        model, config = _load_checkpoint(paths[schema.ARTIFACT_CHECKPOINT], run_id)
        activity = _load_activity(paths[schema.ARTIFACT_ACTIVITY], run_id)
    return s2.network_from_model(model, activity, source=f"run {run_id}"), config.train.epochs


def _download(client: Any, run_id: str, folder: str) -> dict[str, Path]:
    paths = {}
    for name in (schema.ARTIFACT_CHECKPOINT, schema.ARTIFACT_ACTIVITY):
        try:
            paths[name] = Path(client.download_artifacts(run_id, name, folder))
        except Exception:  # noqa: BLE001
            raise s2.SimulationError(
                f"run {run_id} has no artifact '{name}'; it was not written by `duosparse "
                "train` (or the artifact store is not reachable from here)."
            ) from None
    return paths


def _load_checkpoint(path: Path, run_id: str) -> tuple[Any, Any]:
    try:
        return load_model(path)
    except Exception as e:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        raise s2.SimulationError(
            f"the {schema.ARTIFACT_CHECKPOINT} artifact of run {run_id} cannot be loaded as a "
            f"duosparse model: {checkpoint_problem(e)}. Train the run again (or restore the "
            "artifact) before simulating it."
        ) from None


def _load_activity(path: Path, run_id: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise s2.SimulationError(
            f"the {schema.ARTIFACT_ACTIVITY} artifact of run {run_id} is not readable JSON "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); train the run "
            "again (or restore the artifact) before simulating it."
        ) from None


def log_result(client: Any, run_id: str, result: s2.SimulationResult, step: int) -> None:
    """hw/spinnaker2/<figure> metrics and the JSON artifact on the run."""
    values = result.figures()
    reporter = tracking.MlflowReporter(client, run_id)
    reporter.log_metrics({schema.spinnaker2(name): values[name] for name in s2.FIGURES}, step)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / s2.ARTIFACT
        path.write_text(json.dumps({"run_id": run_id, **result.to_dict()}, indent=2, default=float))
        reporter.log_artifact(path)


def log_refusal(client: Any, run_id: str, chips_needed: int, step: int) -> None:
    """The run does not fit the chips given: fits = 0 and how many chips it needs."""
    tracking.MlflowReporter(client, run_id).log_metrics(
        {schema.spinnaker2("fits"): 0.0, schema.spinnaker2("chips_needed"): chips_needed}, step
    )
