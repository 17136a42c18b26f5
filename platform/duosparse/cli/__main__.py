"""`python -m duosparse.cli ...`, as `duosparse ...` (for Ray job entrypoints and tests)."""

from . import app

app(prog_name="duosparse")
