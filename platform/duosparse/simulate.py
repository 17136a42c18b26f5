"""`duosparse simulate spinnaker2`: a trained run (or a sweep, or a config) deployed on a
simulated SpiNNaker2, with per-token energy and latency against a GPU baseline.

The model itself lives in the analysis layer (duosparse.analysis.spinnaker2, see
docs/spinnaker2.md); it is imported inside the command so that importing the platform never
imports the analysis layer. Figures are logged on each simulated run as hw/spinnaker2/*
metrics (duosparse.schema.spinnaker2) plus a JSON artifact with the full result.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from . import schema, terminal

simulate_app = typer.Typer(
    help="Simulated deployments on neuromorphic hardware.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

console = terminal.stderr()


@simulate_app.callback()
def _group() -> None:
    """Simulated deployments on neuromorphic hardware."""
    # A callback keeps `simulate` a group even with a single command (`simulate spinnaker2`).


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _parse_sets(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set key=value for the SpiNNaker2 profile, --set gpu.key=value for the GPU one."""
    import yaml

    chip, gpu = {}, {}
    for text in items:
        if "=" not in text:
            _fail(
                f"--set '{text}' is not of the form key=value; write for example "
                "--set host.latency_s=0."
            )
        key, raw = (part.strip() for part in text.split("=", 1))
        value = yaml.safe_load(raw)
        if key.startswith("gpu."):
            gpu[key.removeprefix("gpu.")] = value
        else:
            chip[key] = value
    return chip, gpu


def _log(
    client: Any, run_id: str, result: Any, step: int, figures: list[str], artifact: str
) -> None:
    """hw/spinnaker2/<figure> metrics and the JSON artifact on the run."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = result.figures()
    metrics = [Metric(schema.spinnaker2(name), float(values[name]), now, step) for name in figures]
    client.log_batch(run_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / artifact
        path.write_text(json.dumps({"run_id": run_id, **result.to_dict()}, indent=2, default=float))
        client.log_artifact(run_id, str(path))


def _log_refusal(client: Any, run_id: str, chips_needed: int, step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric(schema.spinnaker2("fits"), 0.0, now, step),
            Metric(schema.spinnaker2("chips_needed"), float(chips_needed), now, step),
        ],
    )


def _load_run(client: Any, run_id: str, s2: Any) -> tuple[Any, int]:
    """The run's network (masked weights + measured event rates) and its final epoch."""
    from .sensitivity import checkpoint_problem
    from .train import load_model

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
        paths = {}
        for name in (schema.ARTIFACT_CHECKPOINT, schema.ARTIFACT_ACTIVITY):
            try:
                paths[name] = Path(client.download_artifacts(run_id, name, tmp))
            except Exception:  # noqa: BLE001
                raise s2.SimulationError(
                    f"run {run_id} has no artifact '{name}'; it was not written by `duosparse "
                    "train` (or the artifact store is not reachable from here)."
                ) from None
        try:
            model, config = load_model(paths[schema.ARTIFACT_CHECKPOINT])
        except Exception as e:  # noqa: BLE001 - any failure means "not a usable checkpoint"
            raise s2.SimulationError(
                f"the {schema.ARTIFACT_CHECKPOINT} artifact of run {run_id} cannot be loaded as a "
                f"duosparse model: {checkpoint_problem(e)}. Train the run again (or restore the "
                "artifact) before simulating it."
            ) from None
        try:
            activity = json.loads(paths[schema.ARTIFACT_ACTIVITY].read_text())
        except (OSError, ValueError) as e:
            raise s2.SimulationError(
                f"the {schema.ARTIFACT_ACTIVITY} artifact of run {run_id} is not readable JSON "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); train the run "
                "again (or restore the artifact) before simulating it."
            ) from None
    return s2.network_from_model(model, activity, source=f"run {run_id}"), config.train.epochs


def _sweep_runs(client: Any, sweep: str) -> list[Any]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{schema.TAG_SWEEP}` = '{sweep}' and attributes.status = 'FINISHED'",
        max_results=10_000,
    )
    return [r for r in runs if r.data.tags.get(schema.TAG_KIND) != "sweep"]


def _times(ratio: float, better: str, worse: str) -> str:
    return f"{ratio:.3g}x {better}" if ratio >= 1 else f"{1 / ratio:.3g}x {worse}"


def _human(label: str, result: Any, budget: int | None) -> None:
    out = terminal.stdout()
    m, f = result.mapping, result.figures()
    lvl = result.level
    out.print(
        f"[bold]SpiNNaker2 deployment of {label}[/] ({result.precision}, decoder on "
        f"{result.decoder}, level {lvl.name}: {lvl.voltage_v:g} V / "
        f"{lvl.frequency_hz / 1e6:g} MHz, "
        f"{'pipelined' if result.pipelined else 'sequential'})",
        highlight=False,
    )
    fits = "fits" if result.fits else "[red]does not fit[/]"
    out.print(
        f"  {m.pes} PEs on {m.chips} chip(s); needs at least {m.pes_needed} PEs / "
        f"{m.chips_needed} chip(s); {fits} {budget or 1} chip(s)",
        highlight=False,
    )
    out.print(
        f"  largest PE: {m.max_pe_bytes / 1024:.1f} KiB of {m.budget_bytes / 1024:.1f} KiB; "
        f"{result.macs_per_token:,.0f} MACs and {result.events_per_token:,.0f} events per token",
        highlight=False,
    )
    table = Table("per token", "SpiNNaker2", "GPU baseline", "SpiNNaker2 vs GPU")
    table.add_row(
        "latency",
        f"{result.latency_s * 1e3:.4g} ms",
        f"{result.gpu['latency_s'] * 1e3:.4g} ms",
        _times(f["speedup_vs_gpu"], "faster", "slower"),
    )
    table.add_row(
        "energy",
        f"{result.energy_j * 1e6:.4g} uJ",
        f"{result.gpu['energy_j'] * 1e6:.4g} uJ",
        _times(f["energy_gain_vs_gpu"], "less energy", "more energy"),
    )
    table.add_row("power", f"{result.power_w:.3g} W", f"{result.gpu['power_w']:.3g} W", "")
    out.print(table)
    out.print(
        f"  latency: compute {result.compute_s * 1e6:.1f} us, "
        f"communication {result.comm_s * 1e6:.1f} us, "
        f"sync {result.sync_s * 1e6:.1f} us, host {result.host_s * 1e6:.1f} us; energy: static "
        f"{result.static_j * 1e6:.1f} uJ, dynamic {result.dynamic_j * 1e6:.1f} uJ, communication "
        f"{result.comm_j * 1e6:.1f} uJ",
        highlight=False,
    )


@simulate_app.command("spinnaker2")
def spinnaker2(
    run_id: Annotated[
        str | None, typer.Argument(help="MLflow run id of a finished training run")
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option(help="Simulate every finished run of this sweep (tag duosparse.sweep)"),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="RunConfig YAML: shapes only, random masks at prune.target_sparsity, --event-rate"
        ),
    ] = None,
    decoder: Annotated[
        str, typer.Option(help="Decoder on the chip or on the host: chip | host")
    ] = "host",
    precision: Annotated[
        str,
        typer.Option(help="fp32 (Cortex-M4F, compressed columns) | int8 (MAC array, dense rows)"),
    ] = "fp32",
    chips: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Chips available; refuse (saying how many it needs) if the model does not fit",
        ),
    ] = None,
    pes: Annotated[
        str,
        typer.Option(
            help="PEs to use: compact (fewest the memory allows) | spread (all PEs of the "
            "chips) | a number"
        ),
    ] = "compact",
    level: Annotated[
        str | None,
        typer.Option(
            help="DVFS performance level from the profile (low | high; default: the profile's)"
        ),
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            help="Layers of a token one after another (autoregressive generation) instead "
            "of pipelined",
        ),
    ] = False,
    event_rate: Annotated[
        float | None,
        typer.Option(
            help="--config only: events per unit per token (default 0.2 EGRU, 1.0 LSTM/GRU)"
        ),
    ] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="--config only: vocabulary size (default: the corpus's)")
    ] = None,
    profile: Annotated[
        Path | None, typer.Option(help="SpiNNaker2 profile YAML (default: the packaged one)")
    ] = None,
    gpu_profile: Annotated[
        Path | None, typer.Option(help="GPU baseline profile YAML (default: A100)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a profile constant: key=value (gpu.key=value for the GPU), "
            "e.g. host.latency_s=0",
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db)"),
    ] = None,
    no_log: Annotated[
        bool, typer.Option("--no-log", help="Do not write the figures to the runs")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the results as JSON on stdout")
    ] = False,
) -> None:
    """Map a model onto SpiNNaker2 PEs; energy and latency per token from its measured sparsity.

    Compared with a GPU baseline; logged on the run as hw/spinnaker2/* metrics (docs/spinnaker2.md).
    """
    chosen = [x for x in (run_id, sweep, config) if x is not None]
    if len(chosen) != 1:
        _fail("give exactly one of RUN_ID, --sweep SWEEP or --config CONFIG.yaml.")
    if (event_rate is not None or vocab_size is not None) and config is None:
        _fail(
            "--event-rate and --vocab-size apply to --config only; a run's measured event "
            "rates are used otherwise."
        )

    from .analysis import spinnaker2 as s2  # lazily: the platform does not import analysis
    from .config import ConfigError, load_config
    from .tracking import TrackingError, open_store

    chip_sets, gpu_sets = _parse_sets(list(set_ or []))
    try:
        hw = s2.load_profile(profile).replace(**chip_sets)
        gpu = s2.load_profile(gpu_profile, gpu=True).replace(**gpu_sets)
        s2.performance_level(hw, level)  # bad --level before any work
        if decoder not in s2.DECODER_PLACES:
            raise s2.SimulationError(
                f"--decoder must be one of {', '.join(s2.DECODER_PLACES)} (got '{decoder}')."
            )
        pe_policy: int | str = int(pes) if pes.isdigit() else pes
        if pe_policy not in s2.PE_POLICIES and not isinstance(pe_policy, int):
            raise s2.SimulationError(
                f"--pes must be compact, spread or a number of PEs (got '{pes}')."
            )
        if precision not in s2.PRECISIONS:
            raise s2.SimulationError(
                f"--precision must be one of {', '.join(s2.PRECISIONS)} (got '{precision}')."
            )
    except s2.SimulationError as e:
        _fail(str(e))
    options = dict(
        profile=hw,
        gpu_profile=gpu,
        precision=precision,
        decoder=decoder,
        level=level,
        pipelined=not sequential,
        pes=pe_policy,
    )

    def run_one(net: Any) -> Any:
        return s2.simulate(net, chips=chips, **options)

    # --- a config: shapes only, nothing to log ---------------------------------------------
    if config is not None:
        try:
            cfg = load_config(config)
            net = s2.network_from_config(cfg, event_rate, vocab_size, decoder=decoder == "chip")
            result = run_one(net)
        except (ConfigError, s2.SimulationError) as e:
            _fail(str(e), 1 if isinstance(e, s2.DoesNotFit) else 2)
        if json_out:
            print(
                json.dumps({"config": str(config), **result.to_dict()}, indent=2, default=_jsonable)
            )
        else:
            _human(
                f"{config} (random masks, event rate {net.layers[0].out_rates.mean():g})",
                result,
                chips,
            )
        return

    try:
        client = open_store(tracking_uri)
    except TrackingError as e:
        _fail(str(e))

    # --- one run ------------------------------------------------------------------------
    if run_id is not None:
        try:
            net, step = _load_run(client, run_id, s2)
            result = run_one(net)
        except s2.DoesNotFit as e:
            if not no_log:
                _log_refusal(client, run_id, e.chips_needed, step)
            _fail(str(e), 1)
        except s2.SimulationError as e:
            _fail(str(e))
        if not no_log:
            _log(client, run_id, result, step, list(s2.FIGURES), s2.ARTIFACT)
        if json_out:
            print(json.dumps({"run_id": run_id, **result.to_dict()}, indent=2, default=_jsonable))
        else:
            _human(f"run {run_id}", result, chips)
            if not no_log:
                console.print(
                    f"Logged as {schema.spinnaker2('*')} on run {run_id} (duosparse ui to browse)."
                )
        return

    # --- a sweep: every finished run; one that fails does not stop the others --------------
    runs = _sweep_runs(client, sweep)
    if not runs:
        _fail(
            f"no finished runs carry {schema.TAG_SWEEP} = '{sweep}' in {client.tracking_uri}; "
            "check the sweep name (`duosparse sweep status`) or --tracking-uri."
        )
    results, problems = [], []
    for i, run in enumerate(runs, 1):
        rid = run.info.run_id
        if not json_out:
            console.print(f"[{i}/{len(runs)}] run {rid}")
        try:
            net, step = _load_run(client, rid, s2)
            result = s2.simulate_or_refuse(net, chips, **options)
        except s2.SimulationError as e:
            problems.append(f"run {rid}: {e}")
            continue
        if not no_log:
            _log(client, rid, result, step, list(s2.FIGURES), s2.ARTIFACT)
        results.append((rid, result))
    if json_out:
        print(
            json.dumps(
                {
                    "sweep": sweep,
                    "runs": [{"run_id": rid, **r.to_dict()} for rid, r in results],
                    "problems": problems,
                },
                indent=2,
                default=_jsonable,
            )
        )
    else:
        table = Table(
            "run",
            "fits",
            "PEs",
            "chips",
            "latency / token",
            "energy / token",
            "GPU energy / token",
            "energy gain",
            title=f"sweep {sweep} on SpiNNaker2",
        )
        for rid, r in results:
            table.add_row(
                rid[:12],
                "yes" if r.fits else f"[red]no ({r.mapping.chips_needed})[/]",
                str(r.mapping.pes),
                str(r.mapping.chips),
                f"{r.latency_s * 1e3:.4g} ms",
                f"{r.energy_j * 1e6:.4g} uJ",
                f"{r.gpu['energy_j'] * 1e6:.4g} uJ",
                f"{r.gpu['energy_j'] / r.energy_j:.3g}x",
            )
        terminal.stdout().print(table)
    for problem in problems:
        console.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


def _jsonable(value: Any) -> Any:
    """numpy scalars and non-finite floats in JSON output."""
    value = float(value)
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    simulate_app(prog_name=f"{Path(sys.executable).name} -m duosparse.simulate")
