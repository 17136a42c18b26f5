"""`duosparse prune sensitivity CHECKPOINT_OR_RUN`: each prunable tensor pruned alone
(the analysis is duosparse.analysis.sensitivity)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from duosparse import schema, terminal

from .common import console, fail, jsonable

DEFAULT_LEVELS = "0.5,0.7,0.9,0.95"  # as analysis.sensitivity.DEFAULT_LEVELS, without importing it

app = typer.Typer(
    help="Weight pruning: analyses of trained (pruned or dense) models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Weight pruning: analyses of trained (pruned or dense) models."""


@app.command("sensitivity")
def sensitivity(
    source: Annotated[
        str,
        typer.Argument(
            metavar="CHECKPOINT_OR_RUN",
            help="model.pt (or the run folder holding it), or an MLflow run id",
        ),
    ],
    levels: Annotated[
        str, typer.Option(help="Comma-separated sparsity levels in [0, 1) to prune each tensor to")
    ] = DEFAULT_LEVELS,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Folder holding <corpus>/{train,valid,test}.txt (default: as the run)"),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow store holding the run (default: $MLFLOW_TRACKING_URI or ./mlruns.db)"
        ),
    ] = None,
    max_batches: Annotated[
        int | None,
        typer.Option(
            min=1, help="Cap on validation chunks per evaluation (default: the whole split)"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    include_embedding: Annotated[
        bool | None,
        typer.Option(
            "--include-embedding/--no-include-embedding",
            help="Also test the embedding/decoder (default: as the run's prune.include_embedding)",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the table as JSON to FILE")] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the table as JSON on stdout")
    ] = False,
) -> None:
    """Validation perplexity with each prunable tensor pruned alone to each level.

    Magnitude pruning on top of the tensor's masks, no retraining. Given an MLflow run id,
    the table is also logged into that run (sensitivity.json, sensitivity/* metrics).
    """
    from duosparse.analysis import sensitivity as analysis
    from duosparse.train import DeviceUnavailable, resolve_device

    try:
        parsed = analysis.parse_levels(levels)
        target_device = resolve_device(device, field="--device")
    except (analysis.SensitivityError, DeviceUnavailable) as e:
        fail(str(e))
    with tempfile.TemporaryDirectory(prefix="duosparse-sensitivity-") as tmp:
        model, config, run_id, client, origin = _load(source, tracking_uri, Path(tmp))
        stream, embedding = _validation_stream(model, config, data_dir, include_embedding)
        model.to(target_device)
        stream = stream.to(target_device)
        tensors = len(model.prunable(embedding))
        console.print(
            f"{tensors} tensors x {len(parsed)} levels from {origin} "
            f"({config.model.arch}, {config.data.corpus} valid)",
            highlight=False,
        )
        table = _with_progress(
            lambda on_row: analysis.sensitivity_table(
                model, stream, config.train.bptt, parsed, max_batches, embedding, on_row=on_row
            ),
            tensors * len(parsed),
        )
        table.update({"source": source, "run_id": run_id, "run_key": config.run_key})
        metrics = analysis.metrics_of(table)
        table = jsonable(table)
        text = json.dumps(table, indent=2)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        if run_id is not None:
            _log_to_run(client, run_id, text, metrics, config.train.epochs, Path(tmp))
    if json_out:
        print(text)
    else:
        terminal.stdout().print(_rich_table(table))


def _load(source: str, tracking_uri: str | None, tmp: Path) -> tuple[Any, Any, Any, Any, str]:
    """(model, config, run id or None, client or None, where it came from, for messages)."""
    from duosparse import tracking
    from duosparse.analysis import models

    try:
        checkpoint, run_id, client = models.resolve_source(source, tracking_uri, tmp)
        # a downloaded artifact is named by its run, not by the temporary folder it is in
        label = (
            f"the {schema.ARTIFACT_CHECKPOINT} artifact of MLflow run {run_id}" if run_id else None
        )
        model, config = models.load(checkpoint, label)
    except (models.CheckpointError, tracking.TrackingError) as e:
        fail(str(e))
    return model, config, run_id, client, f"MLflow run {run_id}" if run_id else str(checkpoint)


def _validation_stream(
    model: Any, config: Any, data_dir: Path | None, include_embedding: bool | None
) -> tuple[Any, bool]:
    from duosparse import data

    try:
        corpus = data.load_corpus(
            config.data.corpus, data_dir or config.data.dir, seed=config.train.seed
        )
    except (data.DataNotFoundError, data.DataIntegrityError) as e:
        fail(str(e))
    embedding = config.prune.include_embedding if include_embedding is None else include_embedding
    return data.batchify(corpus.valid, config.train.eval_batch_size), embedding


def _log_to_run(
    client: Any, run_id: str, text: str, metrics: dict[str, float], step: int, tmp: Path
) -> None:
    from duosparse import tracking

    artifact = tmp / schema.ARTIFACT_SENSITIVITY
    artifact.write_text(text + "\n")
    reporter = tracking.MlflowReporter(client, run_id)
    try:
        reporter.log_metrics(metrics, step=step)
        reporter.log_artifact(artifact)
    except Exception as e:  # noqa: BLE001 - MLflow raises many types
        fail(
            f"the analysis ran but could not be logged to MLflow run {run_id} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "check the tracking store, or rerun with --out FILE to keep the table.",
            1,
        )
    console.print(
        f"logged {schema.ARTIFACT_SENSITIVITY} and {schema.SENSITIVITY_PREFIX}* "
        f"metrics to MLflow run {run_id}",
        highlight=False,
    )


def _with_progress(work: Any, total: int) -> dict[str, Any]:
    """`work(on_row)` with a progress bar over its rows in a terminal."""
    if not sys.stderr.isatty():
        return work(None)
    with terminal.progress_bar(console) as bar:
        task = bar.add_task("sensitivity", total=total)
        return work(
            lambda row: bar.update(
                task, advance=1, description=f"{row['tensor']} @ {row['level']:g}"
            )
        )


def _rich_table(table: dict[str, Any]) -> Any:
    from rich.table import Table

    base = table["baseline"]
    out = Table(
        title=f"pruning sensitivity, valid ppl (baseline {_num(base['ppl'])}, "
        f"weight sparsity {base['weight_sparsity']:.3f})"
    )
    for column in ("tensor", "shape", "level", "sparsity", "val ppl", "Δ ppl"):
        out.add_column(column, justify="left" if column in ("tensor", "shape") else "right")
    for row in table["rows"]:
        out.add_row(
            row["tensor"],
            "x".join(map(str, row["shape"])),
            f"{row['level']:g}",
            f"{row['sparsity']:.3f}",
            _num(row["ppl"]),
            _num(row["delta_ppl"], signed=True),
        )
    return out


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "inf"
    return f"{value:+,.2f}" if signed else f"{value:,.2f}"
