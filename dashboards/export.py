"""Static export of figures: HTML (plotly alone) and PNG / SVG / PDF (kaleido + Chromium).

kaleido 1.x renders in a headless Chrome or Chromium that it does not ship. The browser is
found the way kaleido finds it, through its launcher choreographer's public
`Chromium.find_browser` (a copy fetched earlier with `kaleido_get_chrome`, then the usual
Chrome/Chromium executable names on PATH and install paths, Debian's /usr/bin/chromium
among them), after $BROWSER_PATH. Nothing is ever downloaded from here;
without a browser the error says how to install one.
"""

from __future__ import annotations

import os
from pathlib import Path

import plotly.graph_objects as go

FORMATS = ("html", "png", "svg", "pdf")
STATIC_FORMATS = ("png", "svg", "pdf")
WIDTH, HEIGHT, SCALE = 900, 560, 2  # PNG at twice the layout size, for slides and papers

NO_BROWSER = (
    "static export (PNG/SVG/PDF) needs a Chrome or Chromium for plotly's kaleido, and none was "
    "found{where}. Install Debian's with `apt-get install chromium` (or your platform's "
    "Chrome/Chromium), or point BROWSER_PATH at an existing chrome/chromium executable; HTML "
    "export needs neither (--format html)."
)


class ExportError(RuntimeError):
    """A figure could not be exported; the message says why and what to do."""


def _executable(path: str | Path) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def _kaleido_search() -> str | None:
    """What kaleido's launcher would start: a local kaleido_get_chrome copy, else a Chrome,
    Chromium, Edge or Brave on PATH or in the usual install folders."""
    try:
        from choreographer.browsers import Chromium
    except ImportError:  # no kaleido installed: _write_static says how to get it
        return None
    return Chromium.find_browser(skip_local=False)


def find_browser() -> str:
    """The Chrome/Chromium kaleido will use, or ExportError saying how to get one."""
    explicit = os.environ.get("BROWSER_PATH")
    if explicit:
        if _executable(explicit):
            return explicit
        raise ExportError(NO_BROWSER.format(where=f" at BROWSER_PATH={explicit!r}"))
    found = _kaleido_search()
    if found and _executable(found):
        return found
    raise ExportError(NO_BROWSER.format(where=" on PATH or in the usual install folders"))


def parse_formats(text: str) -> list[str]:
    """'html,png' -> ['html', 'png'], refusing unknown formats."""
    formats = [f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(
            f"--format {text!r}: {'unknown format ' + ', '.join(bad) if bad else 'no format'}; "
            f"choose from {', '.join(FORMATS)} (comma-separated, e.g. html,png,svg,pdf)."
        )
    return list(dict.fromkeys(formats))


def export_figures(
    figures: dict[str, go.Figure],
    out_dir: str | Path,
    formats: list[str] | tuple[str, ...] = FORMATS,
) -> list[Path]:
    """Write each figure as <out_dir>/<name>.<format>; one browser start for all static files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "html" in formats:
        for name, fig in figures.items():
            path = out / f"{name}.html"
            fig.write_html(path, include_plotlyjs=True, full_html=True)  # self-contained
            written.append(path)
    static = [f for f in formats if f in STATIC_FORMATS]
    if static and figures:
        written += _write_static(figures, out, static)
    return written


def _write_static(figures: dict[str, go.Figure], out: Path, formats: list[str]) -> list[Path]:
    browser = find_browser()
    try:
        import kaleido
    except ImportError:
        raise ExportError(
            "static export needs kaleido >= 1: pip install 'duosparse[export]' (or kaleido)."
        ) from None
    specs, paths = [], []
    for name, fig in figures.items():
        layout = fig.to_dict()
        width = fig.layout.width or WIDTH
        height = fig.layout.height or HEIGHT
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            specs.append(
                dict(
                    fig=layout,
                    path=path,
                    opts=dict(
                        format=fmt, width=width, height=height, scale=SCALE if fmt == "png" else 1
                    ),
                )
            )
            paths.append(path)
    try:
        # mathjax off: its default is a CDN script, and the labels use no LaTeX
        kaleido.write_fig_from_object_sync(specs, kopts={"path": browser, "mathjax": False})
    except Exception as e:  # noqa: BLE001 - kaleido/choreographer raise many types
        raise ExportError(
            f"the browser {browser} could not render the figures ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}). Check that it starts headless "
            "(`chromium --headless --dump-dom about:blank`), or point BROWSER_PATH at another "
            "Chrome/Chromium."
        ) from None
    missing = [p for p in paths if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise ExportError(f"kaleido wrote no output for {', '.join(map(str, missing))}.")
    return paths
