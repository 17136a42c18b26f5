"""What every command shares: where messages go, how a command fails, and JSON output
(`jsonable`, from duosparse.terminal, which the analysis uses too)."""

from __future__ import annotations

from typing import Any, NoReturn

import typer

from duosparse import terminal
from duosparse.terminal import jsonable

console = terminal.stderr()


def fail(message: str, code: int = 2) -> NoReturn:
    """One paragraph on stderr and a non-zero exit (2: bad input; 1: the work failed)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    """A `warnings.showwarning` that prints as the CLI does, without the source line."""
    warn(str(message))


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for what jsonable leaves: numpy scalars."""
    return jsonable(float(value))
