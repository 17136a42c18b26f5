"""`duosparse analyze SWEEP` and `duosparse export pareto SWEEP` (docs/design.md section 7).

SWEEP is a sweep name (its MLflow experiment, or a sweep tag), a sweep spec YAML (name,
experiment and tracking URI from the spec), or an exported run table (.csv / .parquet) for
offline analysis. Outputs go to a folder (default runs/analysis/<sweep>/) and, when the run
table came from a tracking store, into the artifacts (folder `analysis/`) of the sweep's
newest parent run, so the report opens from the MLflow UI.

The analysis and dashboard layers are imported inside the commands, so that `duosparse
--help` starts without pandas' and plotly's import time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from duosparse import schema, terminal

from .common import console, fail

ANALYSIS_ARTIFACTS = schema.ARTIFACTS_ANALYSIS  # artifact folder on the sweep's parent run
PARETO_ARTIFACTS = schema.ARTIFACTS_PARETO
DEFAULT_OUT = Path("runs") / "analysis"
TABLE_SUFFIXES = (".csv", ".parquet")
SPEC_SUFFIXES = (".yaml", ".yml")

export_app = typer.Typer(
    help="Static exports of a sweep's figures (HTML, PNG, SVG, PDF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@export_app.callback()
def _export_group() -> None:
    """Static exports of a sweep's figures (HTML, PNG, SVG, PDF)."""
    # A callback keeps `export` a group with a single command (`export pareto`).


# --- where the runs come from ---------------------------------------------------------------


@dataclass
class Source:
    table: Any  # the run table (pandas DataFrame)
    sweep: str
    label: str  # "<uri>, experiment 'x'" or the file, for messages and the report
    client: Any = None  # None when read from a file: nothing to log to
    experiment_ids: list[str] = field(default_factory=list)
    experiment: str = ""


def load_source(sweep: str, tracking_uri: str | None) -> Source:
    """The run table of SWEEP (name, spec YAML or table file); one-paragraph errors."""
    from duosparse import tracking
    from duosparse.analysis import runs
    from duosparse.sweep import SpecError, load_spec

    path = Path(sweep)
    try:
        if path.suffix in TABLE_SUFFIXES:
            table = runs.read_table(path)
            if runs.OK not in table:
                raise runs.RunTableError(
                    f"'{path}' is a seed-aggregated table (configs.csv), not a run table; pass "
                    "runs.parquet or runs.csv from the same folder."
                )
            return Source(table, str(table.attrs.get("sweep") or path.stem), str(path))
        experiment, tag = sweep, None
        if path.suffix in SPEC_SUFFIXES:
            spec = load_spec(path)
            experiment, tag = spec.experiment, spec.name
            tracking_uri = tracking_uri or spec.tracking.uri
        elif path.exists():
            raise runs.RunTableError(
                f"'{sweep}' is neither a sweep spec (.yaml) nor a run table (.csv, .parquet)."
            )
        client = tracking.open_store(tracking_uri)
        console.print(f"reading the runs of '{tag or experiment}' from {client.tracking_uri}")
        table = runs.runs_table(experiment, sweep=tag, client=client)
    except (runs.RunTableError, SpecError, tracking.TrackingError) as e:
        fail(str(e))
    if not len(table):
        fail(
            f"the experiment '{experiment}' in {client.tracking_uri} has no training runs yet; "
            "run the sweep first (`duosparse sweep run SPEC`)."
        )
    name = str(table.attrs.get("sweep") or tag or experiment)
    return Source(
        table,
        name,
        f"{client.tracking_uri}, experiment '{experiment}'",
        client,
        list(table.attrs.get("experiment_ids", [])),
        experiment,
    )


def log_to_parent(source: Source, files: list[Path], artifact_path: str) -> str | None:
    """Log `files` to the sweep's newest parent run; its id, or None (offline / no parent)."""
    from duosparse.analysis import runs

    if source.client is None:
        return None
    parent = runs.newest_parent_run(source.client, source.experiment_ids, source.sweep)
    if parent is None:
        console.print(f"no sweep parent run for '{source.sweep}' in the store: outputs not logged")
        return None
    try:
        for path in files:
            source.client.log_artifact(parent, str(path), artifact_path)
    except Exception as e:  # noqa: BLE001 - the files are on disk; logging is a convenience
        console.print(
            f"[yellow]warning:[/] could not log to run {parent} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); the files are on disk.",
            highlight=False,
        )
        return None
    return parent


def _out_dir(out: Path | None, sweep: str) -> Path:
    return (out or DEFAULT_OUT / sweep).resolve()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder (created if missing).")


# --- analyze ----------------------------------------------------------------------------------


def analyze(
    sweep: Annotated[
        str,
        typer.Argument(
            metavar="SWEEP",
            help="Sweep name, sweeps/<study>.yaml, or an exported runs.csv / runs.parquet",
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: runs/analysis/<sweep>)")
    ] = None,
    budget: Annotated[
        list[str] | None,
        typer.Option(
            help="Perplexity budget for the iso-perplexity table, repeatable: 60 (ppl <= 60) or 5% "
            "(within 5% of the dense baseline of the same size); default 1%, 5%, 10%, 25%"
        ),
    ] = None,
    baseline_arch: Annotated[
        str | None,
        typer.Option(
            help="Architecture whose unpruned model of the same size is every architecture's "
            "baseline for relative budgets (default: each architecture's own)"
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(min=50, help="Bootstrap resamples of the trade-off fits")
    ] = 1000,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking URI (default: the spec's, $MLFLOW_TRACKING_URI or ./mlruns.db)"
        ),
    ] = None,
    no_log: Annotated[
        bool, typer.Option("--no-log", help="Do not log the outputs to the sweep's parent run")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the results as JSON on stdout")
    ] = False,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            help="Another sweep over the same space (name, spec or run table), repeatable: its "
            "front and hypervolume per trial beside SWEEP's, on one reference point (e.g. a "
            "grid and the searches of its box)"
        ),
    ] = None,
) -> None:
    """Run table, Pareto fronts, trade-off fits, multiplicativity and iso-perplexity of SWEEP,
    with a self-contained HTML report; logged to the sweep's newest parent run in MLflow. For
    a search, its front against the trials spent; with --compare, the fronts of other sweeps."""
    from duosparse.analysis import fits

    try:
        budgets = [fits.parse_budget(b) for b in budget] if budget else list(fits.DEFAULT_BUDGETS)
    except ValueError as e:
        fail(f"--budget: {e}.")
    if out is not None:
        _check_out(out.resolve())
    source = load_source(sweep, tracking_uri)
    results = _study(source, budgets, baseline_arch, bootstrap)
    tables = _compared(source, compare or [], tracking_uri, results)
    directory = _out_dir(out, source.sweep)
    _check_out(directory)
    files = _write_outputs(directory, source, results, tables)
    parent = None if no_log else log_to_parent(source, files, ANALYSIS_ARTIFACTS)
    if json_out:
        print(
            json.dumps(
                {
                    "sweep": source.sweep,
                    "source": source.label,
                    "out": str(directory),
                    "files": [str(f) for f in files],
                    "logged_to_run": parent,
                    "results": results,
                },
                indent=2,
            )
        )
    else:
        _print_summary(results)
    _where(directory / "report.html", parent, source)


def _study(
    source: Source, budgets: list[Any], baseline_arch: str | None, bootstrap: int
) -> dict[str, Any]:
    """The study's results; with the models in a store, also the paired pruning cost."""
    from duosparse.analysis import runs, study

    table = source.table
    archs = sorted(str(a) for a in table[runs.ARCH].dropna().unique()) if runs.ARCH in table else []
    if baseline_arch is not None and baseline_arch not in archs:
        fail(
            f"--baseline-arch '{baseline_arch}' has no runs in this sweep (architectures: "
            f"{', '.join(archs) or 'none'})."
        )
    console.print(f"analysing {len(table)} runs ({int(table[runs.OK].sum())} usable)")
    try:
        results = study.analyze(table, budgets, baseline_arch, n_boot=bootstrap)
    except ValueError as e:
        fail(str(e))
    if source.client is not None:  # the models themselves are in the store: a paired test
        from duosparse.analysis import paired

        results["pruning_cost"] = study.jsonable(
            paired.pruning_cost(table, source.client, n_boot=bootstrap)
        )
    return results


def _compared(
    source: Source, others: list[str], tracking_uri: str | None, results: dict[str, Any]
) -> dict[str, Any]:
    """SWEEP's and each --compare sweep's run tables, by sweep name; their comparison goes
    into results['comparison']."""
    from duosparse.analysis import study

    if not others:
        return {}
    tables = {source.sweep: source.table}
    for other in others:
        found = load_source(other, tracking_uri)
        if found.sweep in tables:
            fail(f"--compare {other}: the sweep '{found.sweep}' is already in the comparison.")
        tables[found.sweep] = found.table
    results["comparison"] = study.compare_sweeps(tables)
    return tables


def _write_outputs(
    directory: Path, source: Source, results: dict[str, Any], compared: dict[str, Any]
) -> list[Path]:
    """report.html, results.json and the run tables (CSV, and Parquet with pyarrow)."""
    from duosparse.analysis import runs
    from duosparse.dashboards import figures as figs
    from duosparse.dashboards import report

    directory.mkdir(parents=True, exist_ok=True)
    table = source.table
    configs = runs.aggregate_seeds(table)
    figures = figs.build_figures(table, results, configs)
    if compared:
        figures["compare_fronts"] = figs.compare_fronts_figure(compared, results["comparison"])
        figures["compare_progress"] = figs.search_progress_figure(results["comparison"])
    files = [report.write_report(directory / "report.html", table, results, figures, source.label)]
    (directory / "results.json").write_text(json.dumps(results, indent=2))
    files.append(directory / "results.json")
    files.append(runs.write_table(table, directory / "runs.csv"))
    files.append(runs.write_table(configs, directory / "configs.csv"))
    try:
        files.append(runs.write_table(table, directory / "runs.parquet"))
    except ImportError:  # pyarrow missing: the CSV holds the same table
        pass
    return files


def _print_summary(results: dict[str, Any]) -> None:
    out = terminal.stdout()
    for table in (
        *_search_tables(results),
        _hypervolume_table(results),
        _iso_table(results),
        _fits_table(results),
        _multiplicativity_table(results),
    ):
        out.print(table)
    if results.get("pruning_cost"):
        out.print(_pruning_cost_table(results["pruning_cost"]))


def _search_tables(results: dict[str, Any]) -> list[Table]:
    """A search's hypervolume after each trial; the compared sweeps' fronts side by side."""
    tables = []
    if results.get("search", {}).get("by_trial"):
        search = results["search"]
        t = Table(
            "trial",
            "val ppl (selection)",
            "effective MACs",
            "hypervolume (normalised)",
            "front size",
            title=f"Search ({', '.join(search['searcher'])}): front found against trials spent",
        )
        for r in search["by_trial"]:
            val, cost = r.get(search["objective"]), r.get(search["cost"])
            t.add_row(
                str(r["trial"]),
                f"{val:.4g}" if val == val else "-",
                f"{cost:.4g}" if cost == cost else "-",
                f"{r['hypervolume_normalized']:.3f}",
                str(r["front_size"]),
            )
        tables.append(t)
    if results.get("comparison", {}).get("sweeps"):
        t = Table(
            "sweep",
            "trials",
            "usable",
            "hypervolume",
            "normalised",
            "ratio to first",
            "front size",
            title="Compared sweeps: val ppl x log10 effective MACs, one reference point",
        )
        for name, e in results["comparison"]["sweeps"].items():
            t.add_row(
                name,
                str(e["trials"]),
                str(e["usable"]),
                f"{e['hypervolume']:.4g}",
                f"{e['hypervolume_normalized']:.3f}",
                f"{e['ratio_to_first']:.3f}",
                str(len(e["front"])),
            )
        tables.append(t)
    return tables


def _hypervolume_table(results: dict[str, Any]) -> Table:
    hv = Table(
        "architecture",
        "cost axis",
        "hypervolume (normalised)",
        "front size",
        title="Pareto fronts: validation perplexity (selection) vs cost",
    )
    for cost, entry in results.get("hypervolume", {}).items():
        for arch, g in entry.get("groups", {}).items():
            hv.add_row(arch, cost, f"{g['hypervolume_normalized']:.3f}", str(g["front_size"]))
    return hv


def _iso_table(results: dict[str, Any]) -> Table:
    iso = Table(
        "architecture",
        "budget",
        "compute reduction",
        "val ppl (selection)",
        "test ppl",
        "run",
        title="Iso-perplexity: the largest compute reduction within each validation budget",
    )
    for e in results.get("iso_perplexity", []):
        reduction = f"{e['reduction']:.3g}x" if e.get("reduction") else "-"
        val, test = (f"{e[k]:.4g}" if e.get(k) else "-" for k in ("val_ppl", "test_ppl"))
        iso.add_row(
            e["model.arch"], e["budget"], reduction, val, test, e.get("run_id") or e.get("note", "")
        )
    return iso


def _fits_table(results: dict[str, Any]) -> Table:
    tf = Table(
        "group",
        "runs",
        "ppl0",
        "a",
        "b",
        "R2",
        "test / val",
        title="Trade-off fits on validation perplexity: ppl = ppl0 (1 + a R^b)",
    )
    for f in results.get("fits", []):
        group = ", ".join(str(v) for k, v in f.items() if k.startswith(("model.", "data.")))
        if "skipped" in f:
            tf.add_row(group, str(f["n"]), f"[dim]{f['skipped']}[/]", "", "", "", "")
            continue
        cells = [
            f"{f['params'][p]:.3g} [{f['ci'][p][0]:.3g}, {f['ci'][p][1]:.3g}]"
            for p in ("ppl0", "a", "b")
        ]
        ratio = f"{f['test_ratio']:.3f}" if f.get("test_ratio") else "-"
        tf.add_row(group, str(f["n"]), *cells, f"{f['r2']:.3f}", ratio)
    return tf


def _multiplicativity_table(results: dict[str, Any]) -> Table:
    mult = Table(
        "architecture",
        "slope of s_a on s_w",
        "verdict",
        "exact / estimated MACs",
        title="Do activity and weight sparsity multiply?",
    )
    ratios = {e["model.arch"]: e for e in results["multiplicativity"]["macs_vs_estimate"]}
    for e in results["multiplicativity"]["activity_vs_weight"]:
        slope = f"{e['slope']:.3g} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]" if "ci" in e else "-"
        ratio = ratios.get(e["model.arch"], {}).get("ratio")
        mult.add_row(
            e["model.arch"],
            slope,
            e.get("verdict") or e.get("skipped", ""),
            f"{ratio:.3g}" if ratio else "-",
        )
    return mult


def _pruning_cost_table(entries: list[dict[str, Any]]) -> Table:
    cost = Table(
        "model",
        "pruned to",
        "dense test ppl",
        "pruned test ppl",
        "rise [95% interval]",
        title="What the highest prune level costs (paired block bootstrap over test chunks)",
    )
    for e in entries:
        model = e["model.arch"] + (
            f" θ={e['model.threshold']:g}" if e["model.arch"] == "egru" else ""
        )
        if "skipped" in e:
            cost.add_row(model, f"{e['target_sparsity']:g}", f"[dim]{e['skipped']}[/]", "", "")
            continue
        cost.add_row(
            model,
            f"{e['target_sparsity']:g}",
            f"{e['ppl_dense']:.4g}",
            f"{e['ppl_pruned']:.4g}",
            f"{e['difference']:+.4g} [{e['ci_low']:+.4g}, {e['ci_high']:+.4g}]",
        )
    return cost


def _where(report_path: Path, parent: str | None, source: Source) -> None:
    console.print(f"Report: {report_path}  (open it in a browser, e.g. xdg-open {report_path})")
    if parent:
        console.print(
            f"Logged to the sweep's parent run {parent} under '{ANALYSIS_ARTIFACTS}/'. Browse it "
            f"with `make ui` (or `duosparse ui`): experiment '{source.experiment}', run "
            f"'{source.sweep} launch', Artifacts, {ANALYSIS_ARTIFACTS}/report.html."
        )


# --- export pareto ------------------------------------------------------------------------------


@export_app.command("pareto")
def export_pareto(
    sweep: Annotated[
        str,
        typer.Argument(
            metavar="SWEEP",
            help="Sweep name, sweeps/<study>.yaml, or an exported runs.csv / runs.parquet",
        ),
    ],
    format_: Annotated[
        str, typer.Option("--format", help="Comma-separated: html,png,svg,pdf")
    ] = "html,png,svg,pdf",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: runs/analysis/<sweep>/pareto)")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    no_log: Annotated[
        bool, typer.Option("--no-log", help="Do not log the files to the sweep's parent run")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the written files and hypervolumes as JSON")
    ] = False,
) -> None:
    """Pareto fronts of SWEEP (perplexity vs effective, weight-sparse, total MACs and SpiNNaker2
    energy when simulated) as files; PNG/SVG/PDF through kaleido and a system Chromium."""
    from duosparse.analysis import runs, study
    from duosparse.dashboards import export
    from duosparse.dashboards import figures as figs

    try:
        formats = export.parse_formats(format_)
        if any(f in export.STATIC_FORMATS for f in formats):
            export.find_browser()  # no browser: say so before any work
    except export.ExportError as e:
        fail(str(e))
    if out is not None:
        _check_out(out.resolve())
    source = load_source(sweep, tracking_uri)
    configs = runs.aggregate_seeds(source.table)
    if not len(configs):
        fail(
            f"none of the {len(source.table)} runs of '{source.sweep}' finished with a test "
            "perplexity; nothing to plot (`duosparse sweep status` shows why)."
        )
    results = study.pareto_summary(configs)
    figures = {
        name: figs.pareto_figure(configs, cost, results)
        for cost, name in figs.PARETO_NAMES.items()
        if cost in results["pareto"]
    }
    directory = out.resolve() if out else _out_dir(None, source.sweep) / "pareto"
    console.print(f"exporting {len(figures)} Pareto figures as {', '.join(formats)} to {directory}")
    try:
        files = export.export_figures(figures, directory, formats)
    except export.ExportError as e:
        fail(str(e), code=1)
    parent = None if no_log else log_to_parent(source, files, PARETO_ARTIFACTS)
    if json_out:
        print(
            json.dumps(
                {
                    "sweep": source.sweep,
                    "files": [str(f) for f in files],
                    "logged_to_run": parent,
                    "hypervolume": results["hypervolume"],
                },
                indent=2,
            )
        )
    else:
        for f in files:
            terminal.stdout().print(str(f), highlight=False)
        if parent:
            console.print(f"Logged to the sweep's parent run {parent} under '{PARETO_ARTIFACTS}/'.")
