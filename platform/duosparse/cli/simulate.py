"""`duosparse simulate spinnaker2`: a trained run (or a sweep, or a config) deployed on a
simulated SpiNNaker2, with per-token energy and latency against a GPU baseline.

The model is duosparse.analysis.spinnaker2 (docs/spinnaker2.md); applying it to tracked runs
is duosparse.analysis.deployment. Both are imported inside the command, so that `duosparse
--help` starts without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from duosparse import schema, terminal

from .common import console, fail, json_default

app = typer.Typer(
    help="Simulated deployments on neuromorphic hardware.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Simulated deployments on neuromorphic hardware."""
    # A callback keeps `simulate` a group even with a single command (`simulate spinnaker2`).


@app.command("spinnaker2")
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
    if len([x for x in (run_id, sweep, config) if x is not None]) != 1:
        fail("give exactly one of RUN_ID, --sweep SWEEP or --config CONFIG.yaml.")
    if (event_rate is not None or vocab_size is not None) and config is None:
        fail(
            "--event-rate and --vocab-size apply to --config only; a run's measured event "
            "rates are used otherwise."
        )
    options = _options(profile, gpu_profile, list(set_ or []), level, decoder, pes, precision)
    options.update(chips=chips, pipelined=not sequential)
    if config is not None:
        _simulate_config(config, event_rate, vocab_size, options, json_out)
        return
    from duosparse.tracking import TrackingError, open_store

    try:
        client = open_store(tracking_uri)
    except TrackingError as e:
        fail(str(e))
    if run_id is not None:
        _simulate_run(client, run_id, options, no_log, json_out)
    else:
        _simulate_sweep(client, str(sweep), options, no_log, json_out)


def _options(
    profile: Path | None,
    gpu_profile: Path | None,
    sets: list[str],
    level: str | None,
    decoder: str,
    pes: str,
    precision: str,
) -> dict[str, Any]:
    """The simulation's keyword arguments, every option checked before any work."""
    from duosparse.analysis import spinnaker2 as s2

    chip_sets, gpu_sets = _parse_sets(sets)
    try:
        hw = s2.load_profile(profile).with_overrides(chip_sets)
        gpu = s2.load_profile(gpu_profile, gpu=True).with_overrides(gpu_sets)
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
        fail(str(e))
    return dict(
        profile=hw,
        gpu_profile=gpu,
        precision=precision,
        decoder=decoder,
        level=level,
        pes=pe_policy,
    )


def _parse_sets(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set key=value for the SpiNNaker2 profile, --set gpu.key=value for the GPU one."""
    from duosparse.config import ConfigError, parse_override

    chip, gpu = {}, {}
    for text in items:
        try:
            key, value = parse_override(text, example="host.latency_s=0")
        except ConfigError as e:
            fail(str(e))
        if key.startswith("gpu."):
            gpu[key.removeprefix("gpu.")] = value
        else:
            chip[key] = value
    return chip, gpu


def _simulate_config(
    config: Path, event_rate: float | None, vocab_size: int | None, options: dict, json_out: bool
) -> None:
    """Shapes only: random masks at the config's prune level, an assumed event rate."""
    from duosparse.analysis import spinnaker2 as s2
    from duosparse.config import ConfigError, load_config

    try:
        cfg = load_config(config)
        chip = options["decoder"] == "chip"
        net = s2.network_from_config(cfg, event_rate, vocab_size, decoder=chip)
        result = s2.simulate(net, **options)
    except (ConfigError, s2.SimulationError) as e:
        fail(str(e), 1 if isinstance(e, s2.DoesNotFit) else 2)
    if json_out:
        print(
            json.dumps({"config": str(config), **result.to_dict()}, indent=2, default=json_default)
        )
    else:
        rate = net.layers[0].out_rates.mean()
        _print_result(f"{config} (random masks, event rate {rate:g})", result, options["chips"])


def _simulate_run(client: Any, run_id: str, options: dict, no_log: bool, json_out: bool) -> None:
    from duosparse.analysis import deployment
    from duosparse.analysis import spinnaker2 as s2

    try:
        net, step = deployment.run_network(client, run_id)
        result = s2.simulate(net, **options)
    except s2.DoesNotFit as e:
        if not no_log:
            deployment.log_refusal(client, run_id, e.chips_needed, step)
        fail(str(e), 1)
    except s2.SimulationError as e:
        fail(str(e))
    if not no_log:
        deployment.log_result(client, run_id, result, step)
    if json_out:
        print(json.dumps({"run_id": run_id, **result.to_dict()}, indent=2, default=json_default))
        return
    _print_result(f"run {run_id}", result, options["chips"])
    if not no_log:
        console.print(
            f"Logged as {schema.spinnaker2('*')} on run {run_id} (duosparse ui to browse)."
        )


def _simulate_sweep(client: Any, sweep: str, options: dict, no_log: bool, json_out: bool) -> None:
    """Every finished run of the sweep; one that fails does not stop the others."""
    from duosparse.analysis import deployment
    from duosparse.analysis import spinnaker2 as s2

    runs = deployment.finished_sweep_runs(client, sweep)
    if not runs:
        fail(
            f"no finished runs carry {schema.TAG_SWEEP} = '{sweep}' in {client.tracking_uri}; "
            "check the sweep name (`duosparse sweep status`) or --tracking-uri."
        )
    chips = options.pop("chips")
    results, problems = [], []
    for i, run in enumerate(runs, 1):
        rid = run.info.run_id
        if not json_out:
            console.print(f"[{i}/{len(runs)}] run {rid}")
        try:
            net, step = deployment.run_network(client, rid)
            result = s2.simulate_or_refuse(net, chips, **options)
        except s2.SimulationError as e:
            problems.append(f"run {rid}: {e}")
            continue
        if not no_log:
            deployment.log_result(client, rid, result, step)
        results.append((rid, result))
    if json_out:
        found = [{"run_id": rid, **r.to_dict()} for rid, r in results]
        out = {"sweep": sweep, "runs": found, "problems": problems}
        print(json.dumps(out, indent=2, default=json_default))
    else:
        terminal.stdout().print(_sweep_table(sweep, results))
    for problem in problems:
        console.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


def _sweep_table(sweep: str, results: list[tuple[str, Any]]) -> Table:
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
    return table


def _times(ratio: float, better: str, worse: str) -> str:
    return f"{ratio:.3g}x {better}" if ratio >= 1 else f"{1 / ratio:.3g}x {worse}"


def _print_result(label: str, result: Any, budget: int | None) -> None:
    """One deployment in words and a table: where it runs, what a token costs, and why."""
    out = terminal.stdout()
    m, f, lvl = result.mapping, result.figures(), result.level
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
    gpu = result.gpu
    table.add_row(
        "latency",
        f"{result.latency_s * 1e3:.4g} ms",
        f"{gpu['latency_s'] * 1e3:.4g} ms",
        _times(f["speedup_vs_gpu"], "faster", "slower"),
    )
    table.add_row(
        "energy",
        f"{result.energy_j * 1e6:.4g} uJ",
        f"{gpu['energy_j'] * 1e6:.4g} uJ",
        _times(f["energy_gain_vs_gpu"], "less energy", "more energy"),
    )
    table.add_row("power", f"{result.power_w:.3g} W", f"{gpu['power_w']:.3g} W", "")
    out.print(table)
    out.print(
        f"  latency: compute {result.compute_s * 1e6:.1f} us, "
        f"communication {result.comm_s * 1e6:.1f} us, "
        f"sync {result.sync_s * 1e6:.1f} us, host {result.host_s * 1e6:.1f} us; energy: static "
        f"{result.static_j * 1e6:.1f} uJ, dynamic {result.dynamic_j * 1e6:.1f} uJ, communication "
        f"{result.comm_j * 1e6:.1f} uJ",
        highlight=False,
    )
