"""SVG written by hand: rectangles, lines, arrows and text as plain strings.

The tutorials' figures and the run report are drawn with this module rather than a plotting
library, so that a figure's bytes depend only on mpipar's code and the data it draws: no
library version, font file or renderer can change them, and a test can regenerate every
committed figure and compare it byte for byte. Coordinates are written with at most two
decimals (:func:`num`), text is escaped, and nothing reads the clock or the environment.

A :class:`Canvas` collects elements in drawing order (later on top) and :meth:`Canvas.svg`
returns the document. The same string is a ``.svg`` file and, pasted into HTML, an inline
picture; ``name`` keeps the ids of two canvases on one page apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
CHAR_WIDTH = 0.6  # a generous average glyph width, in font sizes, to leave room for text

# Colours: one per rank (or chunk), and the two kinds of pipeline work.
RANK_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
               "#8c8c8c")
FORWARD_COLOR = "#4c72b0"
BACKWARD_COLOR = "#dd8452"
INK = "#222222"
MUTED = "#777777"
GRID = "#dddddd"


def num(x: float) -> str:
    """``x`` with at most two decimals and no trailing zeros: 3 → '3', 2.50 → '2.5'."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def text_width(text: str, size: float) -> float:
    """An upper estimate of the width of ``text`` at font ``size`` (no font is measured)."""
    return len(text) * size * CHAR_WIDTH


def _attrs(**attrs: object) -> str:
    """`` key="value"`` pairs in the given order; None is left out, ``_`` becomes ``-``."""
    out = []
    for key, value in attrs.items():
        if value is None:
            continue
        value = num(value) if isinstance(value, float | int) else str(value)
        out.append(f" {key.rstrip('_').replace('_', '-')}={quoteattr(value)}")
    return "".join(out)


class Canvas:
    """An SVG picture of ``width`` × ``height`` pixels, with a ``title`` for screen readers."""

    def __init__(self, width: float, height: float, title: str, name: str = "fig") -> None:
        self.width = width
        self.height = height
        self.title = title
        self.name = name
        self.items: list[str] = []

    def rect(self, x: float, y: float, w: float, h: float, fill: str = "none",
             stroke: str | None = None, *, rx: float | None = None,
             opacity: float | None = None, dash: bool = False,
             stroke_width: float | None = None) -> None:
        self.items.append("<rect" + _attrs(
            x=x, y=y, width=max(w, 0.0), height=max(h, 0.0), rx=rx, fill=fill,
            fill_opacity=opacity, stroke=stroke, stroke_width=stroke_width,
            stroke_dasharray="4 3" if dash else None) + "/>")

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str = INK,
             width: float = 1.0, *, dash: bool = False, arrow: bool = False) -> None:
        """A straight line; ``arrow`` puts an arrowhead at (x2, y2)."""
        self.items.append("<line" + _attrs(
            x1=x1, y1=y1, x2=x2, y2=y2, stroke=stroke, stroke_width=width,
            stroke_dasharray="5 4" if dash else None,
            marker_end=f"url(#{self.name}-arrow)" if arrow else None) + "/>")

    def polyline(self, points: Sequence[tuple[float, float]], stroke: str,
                 width: float = 1.5, *, dash: bool = False) -> None:
        path = " ".join(f"{num(x)},{num(y)}" for x, y in points)
        self.items.append("<polyline" + _attrs(
            points=path, fill="none", stroke=stroke, stroke_width=width,
            stroke_linejoin="round", stroke_dasharray="6 4" if dash else None) + "/>")

    def circle(self, x: float, y: float, r: float, fill: str) -> None:
        self.items.append("<circle" + _attrs(cx=x, cy=y, r=r, fill=fill) + "/>")

    def text(self, x: float, y: float, text: str, *, size: float = 12, anchor: str = "start",
             fill: str = INK, bold: bool = False, italic: bool = False,
             mono: bool = False) -> None:
        """``text`` with its baseline at y; ``anchor`` is start, middle or end."""
        self.items.append("<text" + _attrs(
            x=x, y=y, font_size=size, text_anchor=None if anchor == "start" else anchor,
            fill=fill, font_weight="bold" if bold else None,
            font_style="italic" if italic else None,
            font_family=MONO if mono else None) + f">{escape(text)}</text>")

    def svg(self) -> str:
        """The whole document (one line per element, ending in a newline)."""
        head = ("<svg" + _attrs(xmlns="http://www.w3.org/2000/svg", width=self.width,
                                height=self.height,
                                viewBox=f"0 0 {num(self.width)} {num(self.height)}",
                                font_family=FONT, role="img") + ">")
        marker = (f'<defs><marker id="{self.name}-arrow" viewBox="0 0 10 10" refX="9" '
                  'refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
                  f'<path d="M0,0 L10,5 L0,10 z" fill="{INK}"/></marker></defs>')
        background = "<rect" + _attrs(width=self.width, height=self.height,
                                      fill="#ffffff") + "/>"
        return "\n".join([head, f"<title>{escape(self.title)}</title>", marker, background,
                          *self.items, "</svg>"]) + "\n"
