"""PNG output shared by ``bnfold audit --plot`` and ``bnfold bench --plot``: matplotlib's Agg canvas used directly
(no pyplot, so no global backend switch and no display needed), written atomically."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .files import write_atomically


def new_figure(width: float, height: float):
    """A matplotlib Figure attached to an Agg canvas; InputError if matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'bnfold[audit]'") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def check_png_path(out_path) -> Path:
    """``out_path`` as a Path, after checking that its directory exists (before any long computation)."""
    out_path = Path(out_path)
    directory = out_path.parent if str(out_path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{out_path}: output directory {directory} does not exist")
    return out_path


def save_png(fig, out_path) -> None:
    """Write ``fig`` to ``out_path`` through a temporary file in the same directory and a rename: a failed or
    interrupted write leaves no partial file."""
    out_path = check_png_path(out_path)
    write_atomically(out_path, lambda f: fig.savefig(f, format="png"))
