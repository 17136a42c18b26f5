"""Where the CLI's output goes, in a terminal and without one (a pipe, a log file, nohup, a
batch scheduler, CI): tables on stdout at their full width, log lines on stderr."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

PIPED_WIDTH = 1000  # wide enough for any table; rich then uses each table's natural width


def stdout() -> Console:
    """A console for tables and results on stdout: the terminal's width in a terminal, and
    wide enough not to cut columns ("FINISH…") when piped, where rich would assume 80."""
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def stderr() -> Console:
    """A console for messages on stderr: in a terminal wrapped to its width; otherwise one
    line per message, as a log file wants them (rich would wrap at 80)."""
    return Console(stderr=True, soft_wrap=not sys.stderr.isatty())


def setup_logging(console: Console, quiet: bool = False) -> None:
    """duosparse's log lines on stderr: through rich's handler on `console` in a terminal, as
    plain timestamped lines otherwise; only warnings and errors with `quiet`."""
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=console, show_path=False, log_time_format="%H:%M:%S"
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        )
    logger = logging.getLogger("duosparse")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def quiet_libraries() -> None:
    """Ray's and MLflow's banners and hints out of the user's way (`--verbose` keeps them):
    Tune's new-style reporter prints a configuration box, the results folder and a
    TensorBoard hint even at verbose=0, where its classic one prints nothing; Ray warns about
    token authentication at every start; MLflow announces each schema creation, and with a
    tracking server writes a "View run at" link to stdout (where --json output goes) for every
    run it ends."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("ray._private.authentication", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)


def jsonable(value: Any) -> Any:
    """What JSON can hold, for --json output and results files: numpy, pandas and torch
    scalars as Python numbers, arrays and tuples as lists, timestamps as ISO text, and NaN,
    infinities and missing values as null (JSON has none of them); through dicts and lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or type(value).__name__ in ("NAType", "NaTType"):  # pandas' missing values
        return None
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def progress_bar(
    console: Console, *fields: str, eta: bool = True, transient: bool = True, enabled: bool = True
) -> Progress:
    """The one progress bar of the CLI: the task's description, a bar, done/total, then the
    given text columns (rich format strings over the task, e.g. "loss {task.fields[loss]:.3f}")
    and the time remaining. On `console` (stderr: stdout is for --json and tables)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(text) for text in fields),
        *([TimeRemainingColumn()] if eta else []),
        console=console,
        transient=transient,
        disable=not enabled,
    )
