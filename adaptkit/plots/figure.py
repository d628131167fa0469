"""What every picture shares: the target file checked before any work, a figure made without pyplot, and
the file written atomically.

matplotlib is an optional extra (`pip install 'adaptkit[plot]'`), imported only here and only when a
picture is asked for. Figures are made with `matplotlib.figure.Figure` on an Agg canvas, not through
pyplot: pyplot keeps every figure in a process-wide registry until closed and picks a backend from the
environment (an interactive one may need a display); an Agg canvas owned by its figure needs neither, so
nothing outlives the call and a library caller's own pyplot state is left alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import AdaptkitError
from ..io.outputs import atomic_file, check_file_target

#: The picture formats, chosen by the file's suffix.
FORMATS = {".png": "png", ".svg": "svg"}
#: No creation date or software version in an SVG, so that the same data gives the same bytes.
SVG_METADATA: dict[str, Any] = {"Date": None, "Creator": None}
EXTRA = "pip install 'adaptkit[plot]'"


def check_target(path: str | Path) -> tuple[Path, str]:
    """The picture's path and format (from its suffix), checked before any work: a known suffix, an
    existing folder to write into, and matplotlib installed."""
    target = Path(path)
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise AdaptkitError(f"{path}: a picture's file name ends in .png or .svg (the format), "
                            f"not '{target.suffix or 'nothing'}'")
    check_file_target(target, "picture")
    _matplotlib()
    return target, fmt


def _matplotlib():
    """matplotlib's Figure and Agg canvas classes, or a one-line error naming the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AdaptkitError(f"pictures need matplotlib: {EXTRA}") from None
    return Figure, FigureCanvasAgg


def new_figure(columns: int = 1, *, width: float = 6.4, height: float = 4.2):
    """A figure of `columns` side-by-side axes (`width` inches each) on its own Agg canvas: (figure, axes)."""
    figure_class, canvas = _matplotlib()
    fig = figure_class(figsize=(width * columns, height), dpi=100, layout="constrained")
    canvas(fig)
    axes = fig.subplots(1, columns, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, list(axes)


def draw(fig, path: str | Path) -> str:
    """Write `fig` to `path` (PNG or SVG by the suffix): into a hidden file beside it, renamed into place only
    once complete, so an error or a kill leaves no half-written picture (and an older picture stands)."""
    target, fmt = check_target(path)
    try:
        with atomic_file(target) as f:
            if fmt == "png":
                _save_png(fig, f)
            else:
                fig.savefig(f, format="svg", metadata=SVG_METADATA)
    finally:
        fig.clear()  # the figure's artists go now, whatever holds the figure itself
    return str(path)


def _save_png(fig, f) -> None:
    """The figure as a PNG of at most 256 colours: a plot's flat colours and antialiased lines lose nothing
    visible, and the file is about a third of matplotlib's RGBA PNG (pictures get committed and mailed)."""
    from PIL import Image  # matplotlib's own dependency

    fig.canvas.draw()
    rgb = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(f, format="png", optimize=True)


def natural_key(name: str) -> list:
    """Sort key reading digit runs as numbers: layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def short_names(names: list[str]) -> dict[str, str]:
    """Each dotted name without the dotted prefix all of them share (`encoder.layer.` of a model's
    modules), so that labels show what tells the modules apart."""
    split = [n.split(".") for n in names]
    common = 0
    while len(names) > 1 and all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    return {n: ".".join(s[common:]) for n, s in zip(names, split)}


__all__ = ["EXTRA", "FORMATS", "check_target", "draw", "natural_key", "new_figure", "short_names"]
