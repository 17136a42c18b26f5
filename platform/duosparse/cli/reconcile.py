"""`duosparse reconcile`: runs whose process is gone, closed KILLED (the explicit form of
what `train` and a sweep launch do when they start; nothing else writes to the store)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import console, fail


def reconcile(
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db)"),
    ] = None,
) -> None:
    """Mark KILLED the RUNNING runs whose process has ended.

    Plain `train` runs, sweep launches and their trials; the same `train` command, or `sweep
    run --resume`, then continues each from its last checkpoint. `train` and `sweep run` do
    this when they start; every other command only reads the store.
    """
    from duosparse import sweep_runner, tracking

    try:
        client = tracking.open_store(tracking_uri)
    except tracking.TrackingError as e:
        fail(str(e))
    trains = tracking.mark_dead_train_runs_killed(client)
    trials = sum(
        sweep_runner.mark_orphans_killed(client, e.experiment_id)
        for e in client.search_experiments()
    )
    console.print(
        f"{trains} train run(s) and {trials} sweep run(s) of ended processes marked KILLED in "
        f"{client.tracking_uri}"
    )
