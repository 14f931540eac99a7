"""Charts for the HTML artifacts: a matplotlib figure rendered to SVG inside the page.

The page stays one self-contained file: no scripts, no CDN, text kept as ``<text>``
elements (``svg.fonttype: none``) rather than glyph outlines, so it is a few KB, renders
offline in the KFP UI's sandboxed iframe and stays searchable. Hover tooltips are not
something matplotlib's SVG offers; pages that need the details show them in a table.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BLUE, RED, GREY = "#1f77b4", "#d62728", "#999999"

# A fixed hash salt and no date: the same data gives the same bytes (artifacts diff cleanly).
_STYLE: dict[Any, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "flywheel",
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.grid": True,
    "grid.color": "#eeeeee",
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


def svg_chart(draw: Callable[[Axes], None], width: float = 7.2, height: float = 3.0) -> str:
    """`draw` fills one Axes; returns the `<svg>` element (inches, at 100 px per inch)."""
    # Imported here: matplotlib costs about a second to import, and most callers of the
    # report modules only want the result models.
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        # A bare Figure, not pyplot: no global figure registry, no GUI backend.
        fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        draw(fig.add_subplot())
        out = io.StringIO()
        fig.savefig(out, format="svg", metadata=_NO_METADATA)
    text = out.getvalue()
    # The XML prolog and DOCTYPE belong to a standalone file, not to an element in HTML.
    return text[text.index("<svg") :]


def integer_x_ticks(ax: Axes) -> None:
    """Ticks on whole numbers only (trials, steps): no `trial 0.25`."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
