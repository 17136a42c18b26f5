"""The layout a newcomer reads (docs/design.md section 1): imports point one way, command line
-> dashboards -> analysis -> platform, with no import cycle (function-level imports included),
and no function longer than a screen and a half.

Read from the source with `ast`, so the test sees every import, wherever it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (package, layer); a module may import its own layer and those below it
LAYERS = {
    "platform/duosparse": ("duosparse", 0),
    "analysis": ("duosparse.analysis", 1),
    "dashboards": ("duosparse.dashboards", 2),
    "platform/duosparse/cli": ("duosparse.cli", 3),  # inside the platform's folder, on top
}
LAYER_NAMES = ["platform", "analysis", "dashboards", "cli"]
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, tuple[Path, int]]:
    """Every duosparse module: dotted name -> (file, layer)."""
    found = {}
    for folder, (package, layer) in LAYERS.items():  # the command line last: it wins
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = (path, layer)
    return found


MODULES = _modules()
MODULES_BY_PATH = {  # file -> (its layer's folder, module name)
    path: (next(f for f, (_, n) in LAYERS.items() if n == layer), name)
    for name, (path, layer) in MODULES.items()
}


def _is_package(name: str) -> bool:
    return MODULES[name][0].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The duosparse modules `name` imports, at module level or inside functions."""
    path, _ = MODULES[name]
    here = name if _is_package(name) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            targets = [
                f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import duosparse.x.y` -> the module
                target = target.rpartition(".")[0]
            if target and target != name and target != "duosparse":
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_layout_is_what_the_test_reads():
    # the walk found every layer and the modules a reader would look for first
    for name in ("duosparse.train", "duosparse.analysis.runs", "duosparse.dashboards.report"):
        assert name in MODULES
    assert "duosparse.cli.train" in GRAPH and "duosparse.train" in GRAPH["duosparse.cli.train"]
    # relative imports resolve: analysis/study.py imports its siblings with `from . import ...`
    assert {"duosparse.analysis.fits", "duosparse.analysis.pareto"} <= GRAPH[
        "duosparse.analysis.study"
    ]


def test_imports_point_down_the_layers():
    upward = [
        f"{name} ({LAYER_NAMES[MODULES[name][1]]}) imports {target} "
        f"({LAYER_NAMES[MODULES[target][1]]})"
        for name, targets in GRAPH.items()
        for target in targets
        if MODULES[target][1] > MODULES[name][1]
    ]
    assert not upward, "\n".join(sorted(upward))


def _cycle() -> list[str] | None:
    """One import cycle among the modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[name] = 2
        path.pop()
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_there_is_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "duosparse.schema", GRAPH["duosparse.schema"] | {"duosparse.train"})
    cycle = _cycle()
    assert cycle is not None and cycle[0] == cycle[-1] and "duosparse.schema" in cycle


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("folder", list(LAYERS))
def test_no_function_is_longer_than_80_lines(folder):
    """From `def` to the last line; for a command (cli/) from its docstring on, since its
    options are declarations that Typer reads, one per parameter."""
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if MODULES_BY_PATH[path][0] != folder:
            continue  # the command line inside platform/duosparse/ is its own layer
        for node in _functions(path):
            first = node.body[0].lineno if folder.endswith("cli") else node.lineno
            lines = node.end_lineno - first + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "split into named steps:\n" + "\n".join(long)
