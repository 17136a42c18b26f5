"""`duosparse sweep run SPEC` and `duosparse sweep status SPEC` (docs/design.md section 7)."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from duosparse import terminal

from .common import console, fail, warn

app = typer.Typer(help="Run and inspect sweeps declared in sweeps/*.yaml.", no_args_is_help=True)


@app.command("run")
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="sweeps/<study>.yaml")],
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted launch (Tuner.restore)")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the trial table and stop")
    ] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: spec, $MLFLOW_TRACKING_URI, ./mlruns.db)"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    allow_silent_start: Annotated[
        bool,
        typer.Option(
            "--allow-silent-start", help="Run EGRU trials even where a layer emits no event at init"
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", help="No progress or ETA lines (errors, warnings and the final table only)"
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Keep Ray's and MLflow's own banners and hints")
    ] = False,
) -> None:
    """Run every trial of SPEC that has not FINISHED yet, on Ray Tune, logged to MLflow."""
    from duosparse import sweep_runner

    terminal.setup_logging(console, quiet)
    if not verbose:
        terminal.quiet_libraries()
    spec, uri, plan = _load_plan(spec_path, tracking_uri)
    _check_silent_starts(spec, plan, refuse=not (dry_run or allow_silent_start))
    if dry_run:
        title = f"sweep {spec.name}: {plan.size} trials, {_to_run(plan)} to run"
        _print_plan(spec, plan, json_out, title, counts=False)
        return
    console.print(
        f"sweep {spec.name}: {plan.size} trials, {_to_run(plan)} to run; MLflow {uri}, experiment '{spec.experiment}'"
    )
    resume_words = [
        *(["--address", address] if address else []),
        *(["--tracking-uri", tracking_uri] if tracking_uri else []),
        *(["--allow-silent-start"] if allow_silent_start else []),
    ]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ray Tune's own prints; stdout is ours
            final = sweep_runner.run_sweep(
                spec,
                address=address,
                resume=resume,
                tracking_uri=tracking_uri,
                show_progress=not (json_out or quiet),
            )
    except sweep_runner.SweepError as e:
        fail(str(e))
    except sweep_runner.SweepInterrupted as e:
        _interrupted(spec.name, spec_path, resume_words, e)
    _print_plan(spec, final, json_out, f"sweep {spec.name}", counts=json_out)
    if not json_out:
        console.print(f"{_counts(final)}. Browse with: make ui")
    if _counts(final).get("FINISHED", 0) < len(final.trials) or final.samples_left:
        raise typer.Exit(1)


def _to_run(plan: Any) -> int:
    """Grid trials not FINISHED plus search samples without a FINISHED run."""
    return len(plan.todo) + plan.samples_left


@app.command("status")
def status(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Finished / running / failed / pending trials of SPEC, with failure reasons (reads only:
    runs of a driver that is gone are shown RUNNING with that reason until the next launch or
    `duosparse reconcile`)."""
    spec, _, plan = _load_plan(spec_path, tracking_uri)
    _print_plan(spec, plan, json_out, f"sweep {spec.name}")


def _load_plan(spec_path: Path, tracking_uri: str | None) -> tuple[Any, str, Any]:
    from duosparse import sweep_runner, tracking
    from duosparse.sweep import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
        uri = sweep_runner.tracking_uri_for(spec, tracking_uri)
        return spec, uri, sweep_runner.plan(spec, uri)
    except (SpecError, tracking.TrackingError) as e:
        fail(str(e))


def _check_silent_starts(spec: Any, plan: Any, refuse: bool) -> None:
    """Warn about EGRU trials whose layers emit no event at initialisation; refuse to run them
    unless told to."""
    from duosparse import sweep_runner

    silent = sweep_runner.silent_starts(plan.todo)
    if not silent:
        return
    warn(
        f"{len(silent)} EGRU trial(s) would start silent, for example: {next(iter(silent.values()))}"
    )
    if refuse:
        fail(
            f"refusing to start sweep {spec.name}: {len(silent)} trial(s) have an EGRU layer "
            "without events at initialisation (above). Fix the thresholds or the initialisation "
            "in the spec, or pass --allow-silent-start to run them anyway."
        )


def _interrupted(name: str, spec_path: Path, options: list[str], e: Any) -> None:
    command = shlex.join(["duosparse", "sweep", "run", str(spec_path), "--resume", *options])
    fail(
        f"sweep {name} was interrupted by {e.signal_name}: the launch and its {e.killed} trial(s) in "
        "progress are marked KILLED in MLflow, finished trials are kept, and each unfinished trial "
        f"continues from its last epoch. Resume it with: {command}",
        code=128 + signal.Signals[e.signal_name].value,
    )


def _print_plan(spec: Any, plan: Any, json_out: bool, title: str, counts: bool = True) -> None:
    """The trial table (and status counts) on stdout, as a table or as JSON."""
    if json_out:
        out = {"sweep": spec.name, **({"counts": _counts(plan)} if counts else {})}
        print(json.dumps({**out, "trials": plan.rows()}, indent=2))
        return
    rows = plan.rows()
    table = Table(*(rows[0].keys() if rows else ["run_key"]), title=title)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    terminal.stdout().print(table)
    if counts:
        console.print(str(_counts(plan)))


def _counts(plan: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in plan.rows():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
