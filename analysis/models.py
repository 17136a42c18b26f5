"""Trained models for the analyses: a model.pt on disk, a run folder holding one, or the
artifact of an MLflow run; and why a file did not load, in one clause."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from duosparse import schema, tracking
from duosparse.model import LanguageModel
from duosparse.train import load_model

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class CheckpointError(ValueError):
    """The model asked for cannot be found or loaded; the message names it and the fix."""


def resolve_source(
    source: str, tracking_uri: str | None, tmpdir: Path
) -> tuple[Path, str | None, Any]:
    """(local checkpoint path, MLflow run id or None, MLflow client or None)."""
    path = Path(source)
    if path.is_dir():
        path = path / schema.ARTIFACT_CHECKPOINT
        if not path.is_file():
            raise CheckpointError(
                f"CHECKPOINT_OR_RUN '{source}' is a folder without {schema.ARTIFACT_CHECKPOINT}; "
                "pass the model.pt a finished `duosparse train` wrote (runs/<key>/model.pt) or "
                "an MLflow run id."
            )
    if path.is_file():
        return path, None, None
    if not _RUN_ID.match(source):
        raise CheckpointError(
            f"CHECKPOINT_OR_RUN '{source}' is neither a file, a run folder holding "
            f"{schema.ARTIFACT_CHECKPOINT}, nor an MLflow run id (32 hex digits, as printed by "
            "`duosparse train`)."
        )
    client = tracking.open_store(tracking_uri)  # TrackingError names the store and the fix
    try:
        client.get_run(source)
    except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing run
        raise CheckpointError(
            f"there is no MLflow run '{source}' in {client.tracking_uri}; pass --tracking-uri "
            "(or set MLFLOW_TRACKING_URI) to the store that holds it."
        ) from None
    try:
        local = client.download_artifacts(source, schema.ARTIFACT_CHECKPOINT, str(tmpdir))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
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
    try:
        return load_model(path)
    except Exception as e:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        raise CheckpointError(
            f"{label or repr(str(path))} cannot be loaded as a duosparse model: "
            f"{checkpoint_problem(e)}. Pass the model.pt a finished `duosparse train` wrote, or "
            "train the run again."
        ) from None
