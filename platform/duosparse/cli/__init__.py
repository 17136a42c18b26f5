"""The `duosparse` command line: the top layer (docs/design.md section 7).

One module per command group, sharing `common`: `train`, `sweep` (run, status), `reconcile`,
`data` (check, download), `analyze` (analyze, export pareto), `prune` (sensitivity),
`simulate` (spinnaker2), `ui`. Commands import the layers below (platform, analysis,
dashboards) and nothing imports the command line. Bad input ends with a one-paragraph message
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import typer

from . import analyze, data, prune, reconcile, simulate, sweep, train, ui

app = typer.Typer(
    help="duosparse: sweeps over activity sparsity (EGRU) x weight sparsity (pruning) "
    "for recurrent language models, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("train")(train.train)
app.add_typer(data.app, name="data")
app.add_typer(sweep.app, name="sweep")
app.command("reconcile")(reconcile.reconcile)
app.add_typer(prune.app, name="prune")
app.add_typer(simulate.app, name="simulate")
app.command("analyze")(analyze.analyze)
app.add_typer(analyze.export_app, name="export")
app.command("ui")(ui.ui)


def main() -> None:
    app()
