"""Warm starts: a run that begins from another run's final weights (`init.from_run_key`).

The source is found in the MLflow store by its run_key tag; it must be FINISHED and share
the keys that fix the parameters' shapes and the vocabulary (config.WARM_START_KEYS). Its
final checkpoint (the model.pt artifact: best-validation weights, masks and thresholds) comes
through MLflow's artifact store, so a warm start works on any worker of a Ray cluster that
can reach the tracking server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import schema
from .config import WARM_START_KEYS, RunConfig


class WarmStartError(ValueError):
    """A warm start that cannot be made; the message names init.from_run_key and the fix."""


def find_source_run(client: Any, run_key: str) -> Any:
    """The newest FINISHED run with this run_key in any experiment of the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = (
        client.search_runs(
            experiments,
            filter_string=f"tags.`{schema.TAG_RUN_KEY}` = '{run_key}'",
            max_results=1000,
        )
        if experiments
        else []
    )
    finished = [
        r
        for r in found
        if r.info.status == "FINISHED" and r.data.tags.get(schema.TAG_KIND) != "sweep"
    ]
    if not finished:
        states = sorted({r.info.status for r in found})
        seen = f"its runs there are {', '.join(states)}" if states else "no run there has it"
        raise WarmStartError(
            f"init.from_run_key {run_key[:12]}... names no FINISHED run in the MLflow store "
            f"({seen}); train that config first (or wait for it to finish), or fix the key."
        )
    return max(finished, key=lambda r: r.info.end_time or 0)


def check_compatible(config: RunConfig, source: Any) -> None:
    """Refuse a source whose architecture, sizes or corpus differ from the config's."""
    flat = config.flat()
    params = source.data.params
    differ = [
        f"{k} {params.get(k)!s} there, {flat[k]!s} here"
        for k in WARM_START_KEYS
        if str(params.get(k)) != str(flat[k])
    ]
    if differ:
        raise WarmStartError(
            f"init.from_run_key {config.init.from_run_key[:12]}... is a different model: "
            f"{'; '.join(differ)}. A warm start keeps {', '.join(WARM_START_KEYS)}; start from a "
            "run of the same model, or drop init.from_run_key."
        )


def resolve(client: Any, config: RunConfig) -> Any:
    """The source run of a warm-start config, checked (None for a cold start)."""
    if config.init.from_run_key is None:
        return None
    source = find_source_run(client, config.init.from_run_key)
    check_compatible(config, source)
    return source


def fetch_checkpoint(client: Any, source: Any, folder: str | Path) -> Path:
    """Download the source run's final model.pt into `folder`; returns its path."""
    try:
        local = client.download_artifacts(
            source.info.run_id, schema.ARTIFACT_CHECKPOINT, str(folder)
        )
    except Exception as e:  # MLflow raises several types for a missing artifact or store
        raise WarmStartError(
            f"init.from_run_key {source.data.tags.get(schema.TAG_RUN_KEY, '?')[:12]}...: its run "
            f"{source.info.run_id} has no readable {schema.ARTIFACT_CHECKPOINT} artifact ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); re-run that config to restore it."
        ) from None
    return Path(local)
