"""`duosparse data check` and `duosparse data download`: the corpora."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duosparse import data, terminal

from .common import console, fail

app = typer.Typer(help="Find, verify and download the corpora.", no_args_is_help=True)


@app.command("check")
def check(
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding <corpus>/...")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Report where each corpus is found and whether its files verify (sha256)."""
    report = data.data_report(data_dir)
    if json_out:
        print(json.dumps(report, indent=2, default=str))
    else:
        table = Table("corpus", "found in", "file", "bytes", "sha256 ok")
        for entry in report:
            files = entry.get("files") or {}
            if not files:
                table.add_row(entry["corpus"], "[red]not found[/]", "", "", "")
            for split, info in files.items():
                table.add_row(
                    entry["corpus"],
                    str(entry.get("path")),
                    split,
                    str(info.get("bytes")),
                    "yes" if info.get("ok") else "[red]no[/]",
                )
        terminal.stdout().print(table)
    ok = all(
        entry.get("files") and all(f.get("ok") for f in entry["files"].values()) for entry in report
    )
    if not ok:
        fail(
            "some corpora are missing or do not verify; set DUOSPARSE_DATA_DIR (or --data-dir) to a "
            "folder holding <corpus>/{train,valid,test}.txt, or run `duosparse data download <corpus>`.",
            1,
        )


@app.command("download")
def download(
    corpus: Annotated[str, typer.Argument(help="ptb or wikitext-2")],
    data_dir: Annotated[
        Path | None, typer.Option(help="Where to put it (default: the user cache)")
    ] = None,
) -> None:
    """Download a corpus from its canonical source and verify it by sha256."""
    if corpus not in data.CORPORA:
        fail(f"unknown corpus '{corpus}'; choose one of {', '.join(data.CORPORA)}.")
    dest = data_dir or data.user_cache_dir() / "data"
    try:
        path = data.download_corpus(corpus, Path(dest))
    except (data.DataNotFoundError, data.DataIntegrityError) as e:
        fail(str(e))
    console.print(f"{corpus} downloaded and verified in {path}")
