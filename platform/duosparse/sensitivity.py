"""Pruning sensitivity: how much does each prunable tensor tolerate being pruned on its own?

For every prunable tensor (the recurrent input and recurrent matrices of every layer, and the
embedding/decoder when the run pruned it) and every level s, the tensor alone is pruned by
magnitude to sparsity s, on top of the masks it already has (a level at or below its current
sparsity changes nothing), the validation perplexity is measured with `train.evaluate`, and
the tensor is put back exactly as it was. Nothing is retrained: the table shows where a
pruning budget is cheap and where it hurts, to choose `prune.scope` or per-layer targets.

`duosparse prune sensitivity CHECKPOINT_OR_RUN --levels 0.5,0.7,0.9,0.95`: a checkpoint
(`model.pt`, or a run folder holding one) is analysed and the table printed; an MLflow run id
has its `model.pt` artifact downloaded and gets the table logged back into it (artifact
`sensitivity.json`, metrics `sensitivity/<tensor>/<level>` and `sensitivity/baseline`).
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import Tensor, nn

from . import data, schema, terminal
from .model import LanguageModel, current_weight
from .pruning import tensor_name

DEFAULT_LEVELS = "0.5,0.7,0.9,0.95"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class SensitivityError(ValueError):
    """Bad input to the analysis; the message names the option and the fix."""


# --- the analysis -----------------------------------------------------------------------------


def parse_levels(text: str) -> list[float]:
    """'0.5,0.9' -> [0.5, 0.9] (sorted, without repeats); each level in [0, 1)."""
    levels = []
    for part in text.split(","):
        part = part.strip()
        try:
            level = float(part)
        except ValueError:
            raise SensitivityError(
                f"--levels: '{part}' is not a number; give sparsity levels in [0, 1) separated "
                "by commas, e.g. --levels 0.5,0.7,0.9,0.95."
            ) from None
        if not (0.0 <= level < 1.0) or not math.isfinite(level):
            raise SensitivityError(
                f"--levels: {part} is not a sparsity level in [0, 1) (the fraction of a "
                "tensor's weights set to zero); e.g. --levels 0.5,0.7,0.9,0.95."
            )
        levels.append(level)
    if not levels:
        raise SensitivityError("--levels is empty; e.g. --levels 0.5,0.7,0.9,0.95.")
    return sorted(set(levels))


def magnitude_mask(weight: Tensor, mask: Tensor | None, level: float) -> Tensor:
    """A mask pruning `weight` to round(level * numel) zeros by magnitude, on top of `mask`.

    Entries `mask` already removes stay removed; the extra ones are the smallest |weight|
    among the rest. A level at or below the current sparsity returns `mask` unchanged.
    """
    keep = (torch.ones_like(weight, dtype=torch.bool) if mask is None else mask != 0).flatten()
    extra = round(level * weight.numel()) - int((~keep).sum())
    if extra > 0:
        scores = weight.detach().abs().flatten().masked_fill(~keep, math.inf)
        keep = keep.clone()
        keep[torch.topk(scores, extra, largest=False).indices] = False
    return keep.view_as(weight).to(weight.dtype)


@contextmanager
def pruned_alone(module: nn.Module, name: str, level: float) -> Iterator[float]:
    """Prune one tensor to `level` for the duration of the block, then restore it bit for bit.

    Yields the tensor's sparsity inside the block. A pruned tensor gets its mask buffer
    narrowed; an unpruned one has its parameter zeroed in place (a tied embedding/decoder is
    one parameter, so both uses see it).
    """
    with torch.no_grad():
        mask = getattr(module, name + "_mask", None)
        new = magnitude_mask(current_weight(module, name), mask, level)
        target = mask if mask is not None else getattr(module, name)
        saved = target.detach().clone()
        if mask is not None:
            mask.copy_(new)
        else:
            target.mul_(new)
    try:
        yield float((new == 0).double().mean())
    finally:
        with torch.no_grad():
            target.copy_(saved)


def sensitivity_table(
    model: LanguageModel,
    stream: Tensor,
    bptt: int,
    levels: list[float],
    max_batches: int | None = None,
    include_embedding: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The sensitivity table of `model` on a batchified validation `stream`.

    Returns {"baseline": {...}, "levels": [...], "rows": [one per tensor x level]}, each row
    with the tensor's name, shape, sparsity before and during the test, loss and perplexity.
    """
    from .train import evaluate  # train imports nothing heavy, but keep the CLI start fast

    base = evaluate(model, stream, bptt, max_batches, include_embedding)
    rows: list[dict[str, Any]] = []
    for module, name in model.prunable(include_embedding):
        weight = current_weight(module, name)
        before = float((weight == 0).double().mean())
        for level in levels:
            with pruned_alone(module, name, level) as sparsity:
                ev = evaluate(model, stream, bptt, max_batches, include_embedding)
            row = {
                "tensor": tensor_name(model, module, name),
                "shape": list(weight.shape),
                "level": level,
                "sparsity_before": before,
                "sparsity": sparsity,
                "loss": ev.loss,
                "ppl": ev.ppl,
                "delta_ppl": ev.ppl - base.ppl,
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return {
        "split": "valid",
        "bptt": bptt,
        "max_batches": max_batches,
        "include_embedding": include_embedding,
        "levels": levels,
        "baseline": {
            "loss": base.loss,
            "ppl": base.ppl,
            "weight_sparsity": base.accounting[schema.SPARSITY_WEIGHT],
        },
        "rows": rows,
    }


def metrics_of(table: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a table: sensitivity/<tensor>/<level> = val ppl, and the baseline."""
    out = {schema.SENSITIVITY_BASELINE: table["baseline"]["ppl"]}
    for row in table["rows"]:
        out[schema.sensitivity_metric(row["tensor"], row["level"])] = row["ppl"]
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# --- where the model comes from -----------------------------------------------------------


def resolve_source(
    source: str, tracking_uri: str | None, tmpdir: Path
) -> tuple[Path, str | None, Any]:
    """(local checkpoint path, MLflow run id or None, MLflow client or None)."""
    path = Path(source)
    if path.is_dir():
        path = path / schema.ARTIFACT_CHECKPOINT
        if not path.is_file():
            raise SensitivityError(
                f"CHECKPOINT_OR_RUN '{source}' is a folder without {schema.ARTIFACT_CHECKPOINT}; "
                "pass the model.pt a finished `duosparse train` wrote (runs/<key>/model.pt) or "
                "an MLflow run id."
            )
    if path.is_file():
        return path, None, None
    if not _RUN_ID.match(source):
        raise SensitivityError(
            f"CHECKPOINT_OR_RUN '{source}' is neither a file, a run folder holding "
            f"{schema.ARTIFACT_CHECKPOINT}, nor an MLflow run id (32 hex digits, as printed by "
            "`duosparse train`)."
        )
    from . import tracking

    client = tracking.open_store(tracking_uri)  # TrackingError names the store and the fix
    try:
        client.get_run(source)
    except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing run
        raise SensitivityError(
            f"there is no MLflow run '{source}' in {client.tracking_uri}; pass --tracking-uri "
            "(or set MLFLOW_TRACKING_URI) to the store that holds it."
        ) from None
    try:
        local = client.download_artifacts(source, schema.ARTIFACT_CHECKPOINT, str(tmpdir))
    except Exception as e:  # noqa: BLE001
        raise SensitivityError(
            f"MLflow run '{source}' has no readable {schema.ARTIFACT_CHECKPOINT} artifact "
            f"({type(e).__name__}); only finished training runs have one."
        ) from None
    return Path(local), source, client


def checkpoint_problem(error: Exception) -> str:
    """Why a file did not load as a model.pt, in one complete clause (torch's own messages run
    to several sentences about weights_only that do not apply here)."""
    import pickle

    from pydantic import ValidationError

    text = str(error)
    if "zip archive" in text or "PytorchStreamReader" in text or isinstance(error, EOFError):
        return "it is truncated or corrupted (not a complete PyTorch archive)"
    if isinstance(error, pickle.UnpicklingError):
        return "it is not a PyTorch checkpoint of tensors (the file holds something else)"
    if isinstance(error, KeyError):
        return f"it has no {error} entry, so it is not a final model.pt (last.pt is resume state)"
    if isinstance(error, ValidationError):
        return "its config does not validate with this version of duosparse"
    sentence = text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else ""
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def load(path: Path, label: str | None = None) -> tuple[LanguageModel, Any]:
    """The model and config of a model.pt; `label` names it in messages (default: the path)."""
    from .train import load_model

    try:
        return load_model(path)
    except Exception as e:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        raise SensitivityError(
            f"{label or repr(str(path))} cannot be loaded as a duosparse model: "
            f"{checkpoint_problem(e)}. Pass the model.pt a finished `duosparse train` wrote, or "
            "train the run again."
        ) from None


# --- the command ----------------------------------------------------------------------------

prune_app = typer.Typer(
    help="Weight pruning: analyses of trained (pruned or dense) models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@prune_app.callback()
def _prune() -> None:
    """Weight pruning: analyses of trained (pruned or dense) models."""


@prune_app.command("sensitivity")
def sensitivity_command(
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
    from rich.console import Console

    from .cli import fail

    err = Console(stderr=True)
    try:
        parsed = parse_levels(levels)
        target_device = _device(device)
    except SensitivityError as e:
        fail(str(e))

    from . import tracking

    with tempfile.TemporaryDirectory(prefix="duosparse-sensitivity-") as tmp:
        try:
            checkpoint, run_id, client = resolve_source(source, tracking_uri, Path(tmp))
            # a downloaded artifact is named by its run, not by the temporary folder it is in
            label = (
                f"the {schema.ARTIFACT_CHECKPOINT} artifact of MLflow run {run_id}"
                if run_id
                else None
            )
            model, config = load(checkpoint, label)
            corpus = data.load_corpus(
                config.data.corpus, data_dir or config.data.dir, seed=config.train.seed
            )
        except (
            SensitivityError,
            tracking.TrackingError,
            data.DataNotFoundError,
            data.DataIntegrityError,
        ) as e:
            fail(str(e))
        model.to(target_device)
        embedding = (
            config.prune.include_embedding if include_embedding is None else include_embedding
        )
        stream = data.batchify(corpus.valid, config.train.eval_batch_size).to(target_device)
        tensors = len(model.prunable(embedding))
        origin = f"MLflow run {run_id}" if run_id else str(checkpoint)
        err.print(
            f"{tensors} tensors x {len(parsed)} levels from {origin} "
            f"({config.model.arch}, {config.data.corpus} valid)",
            highlight=False,
        )
        table = _run_with_progress(
            model,
            stream,
            config.train.bptt,
            parsed,
            max_batches,
            embedding,
            tensors * len(parsed),
            err,
        )
        table.update({"source": source, "run_id": run_id, "run_key": config.run_key})
        metrics = metrics_of(table)
        table = _jsonable(table)
        text = json.dumps(table, indent=2)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        if run_id is not None:
            artifact = Path(tmp) / schema.ARTIFACT_SENSITIVITY
            artifact.write_text(text + "\n")
            reporter = tracking.MlflowReporter(client, run_id)
            try:
                reporter.log_metrics(metrics, step=config.train.epochs)
                reporter.log_artifact(artifact)
            except Exception as e:  # noqa: BLE001 - MLflow raises many types
                fail(
                    f"the analysis ran but could not be logged to MLflow run {run_id} "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                    "check the tracking store, or rerun with --out FILE to keep the table.",
                    1,
                )
            err.print(
                f"logged {schema.ARTIFACT_SENSITIVITY} and {schema.SENSITIVITY_PREFIX}* "
                f"metrics to MLflow run {run_id}",
                highlight=False,
            )
    if json_out:
        print(text)
    else:
        terminal.stdout().print(_rich_table(table))


def _device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise SensitivityError(f"--device '{name}' is not one of auto, cpu, cuda.")
    if name == "cuda" and not torch.cuda.is_available():
        raise SensitivityError("--device cuda: no CUDA device is visible; use auto or cpu.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _run_with_progress(
    model: LanguageModel,
    stream: Tensor,
    bptt: int,
    levels: list[float],
    max_batches: int | None,
    include_embedding: bool,
    total: int,
    err: Any,
) -> dict[str, Any]:
    if not sys.stderr.isatty():
        return sensitivity_table(model, stream, bptt, levels, max_batches, include_embedding)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("sensitivity", total=total)
        return sensitivity_table(
            model,
            stream,
            bptt,
            levels,
            max_batches,
            include_embedding,
            on_row=lambda row: bar.update(
                task, advance=1, description=f"{row['tensor']} @ {row['level']:g}"
            ),
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
