"""Where the CLI's output goes, in a terminal and without one (a pipe, a log file, nohup, a
batch scheduler, CI): tables on stdout at their full width, log lines on stderr."""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console

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
