"""Plots as SVG: line charts, pipeline timelines and stacked bars.

The run report (`mpipar.report`), ``python -m mpipar.viz loss`` and the tutorials' figures
draw with these. Every function returns the SVG document as a string, or draws into a
`Canvas` given to it; axes get "nice" ticks (1, 2 or 5 times a power of ten).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mpipar.parallel.pipeline.timeline import BACKWARD, FORWARD, Interval, Timeline
from mpipar.svg import (
    BACKWARD_COLOR,
    FORWARD_COLOR,
    GRID,
    INK,
    MUTED,
    Canvas,
    text_width,
)

PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 64, 16, 48, 46


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round values covering [lo, hi]: multiples of 1, 2 or 5 × 10^k."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    k = 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks if ticks[0] >= lo - step * 1e-9 else ticks[1:]


def tick_label(value: float) -> str:
    """A tick value, short: 12000 → '12000', 0.25 → '0.25', 1e-05 → '1e-05'."""
    if value == int(value) and abs(value) < 1e7:
        return str(int(value))
    return f"{value:.4g}"


@dataclass(frozen=True)
class Series:
    """One line of a chart: its legend label, points and style."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str
    dashed: bool = False
    dots: bool = False


@dataclass(frozen=True)
class Frame:
    """The plotting area of a chart and the data ranges it maps onto it."""

    x0: float
    y0: float
    width: float
    height: float
    xlo: float
    xhi: float
    ylo: float
    yhi: float

    def x(self, value: float) -> float:
        span = self.xhi - self.xlo or 1.0
        return self.x0 + (value - self.xlo) / span * self.width

    def y(self, value: float) -> float:
        span = self.yhi - self.ylo or 1.0
        return self.y0 + self.height - (value - self.ylo) / span * self.height


def draw_axes(c: Canvas, f: Frame, xlabel: str, ylabel: str) -> None:
    """Grid lines and labels at nice ticks, the frame, and the two axis titles."""
    for t in nice_ticks(f.ylo, f.yhi):
        c.line(f.x0, f.y(t), f.x0 + f.width, f.y(t), GRID)
        c.text(f.x0 - 6, f.y(t) + 4, tick_label(t), size=11, anchor="end", fill=MUTED)
    for t in nice_ticks(f.xlo, f.xhi, 8):
        c.line(f.x(t), f.y0 + f.height, f.x(t), f.y0 + f.height + 4, MUTED)
        c.text(f.x(t), f.y0 + f.height + 17, tick_label(t), size=11, anchor="middle",
               fill=MUTED)
    c.rect(f.x0, f.y0, f.width, f.height, stroke=MUTED)
    c.text(f.x0 + f.width / 2, f.y0 + f.height + 36, xlabel, size=12, anchor="middle")
    c.text(f.x0, f.y0 - 8, ylabel, size=12)


def line_chart(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
               name: str, width: float = 680, height: float = 300) -> str:
    """Lines (and dots) of every series over shared axes, with a legend at the top right."""
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys if math.isfinite(y)]
    ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    ticks = nice_ticks(ylo, yhi)
    ylo, yhi = min(ticks[0], ylo), max(ticks[-1], yhi)
    if yhi == ylo:
        ylo, yhi = ylo - 1.0, yhi + 1.0
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    c = Canvas(width, height, title, name)
    f = Frame(PAD_LEFT, PAD_TOP, width - PAD_LEFT - PAD_RIGHT,
              height - PAD_TOP - PAD_BOTTOM, xlo, xhi if xhi > xlo else xlo + 1.0, ylo, yhi)
    draw_axes(c, f, xlabel, ylabel)
    for s in series:
        points = [(f.x(x), f.y(y)) for x, y in zip(s.xs, s.ys, strict=True)
                  if math.isfinite(y)]
        if len(points) > 1:
            c.polyline(points, s.color, dash=s.dashed)
        if s.dots or len(points) == 1:
            for x, y in points:
                c.circle(x, y, 3, s.color)
    legend_x = f.x0 + f.width
    for s in reversed(series):
        legend_x -= text_width(s.label, 11) + 30
        c.line(legend_x, 14, legend_x + 18, 14, s.color, 2.5, dash=s.dashed)
        c.text(legend_x + 22, 18, s.label, size=11)
    c.text(f.x0, 18, title, size=13, bold=True)
    return c.svg()


# ---- pipeline timelines --------------------------------------------------------------------

KIND_COLORS = {FORWARD: FORWARD_COLOR, BACKWARD: BACKWARD_COLOR}
ROW, ROW_GAP, LABEL_WIDTH = 22, 6, 64


def in_ms(timeline: Timeline) -> Timeline:
    """The same timeline with its times (seconds, from a trace) in milliseconds."""
    rows = [[Interval(iv.start * 1e3, iv.end * 1e3, iv.kind, iv.mb, iv.chunk) for iv in row]
            for row in timeline.intervals]
    return Timeline(rows, timeline.makespan * 1e3)


def draw_timeline(c: Canvas, timeline: Timeline, labels: Sequence[str], *, x: float,
                  y: float, width: float, span: float) -> float:
    """One row per rank from y down: forward boxes blue, backward orange (lighter for odd
    chunks), each with its microbatch when it fits; ``span`` time units fill ``width``
    pixels after the labels. Returns the y just below the last row."""
    scale = (width - LABEL_WIDTH) / (span or 1.0)
    chunks = any(iv.chunk > 0 for row in timeline.intervals for iv in row)
    for i, (label, row) in enumerate(zip(labels, timeline.intervals, strict=True)):
        top = y + i * (ROW + ROW_GAP)
        c.text(x, top + 15, label, size=11)
        c.rect(x + LABEL_WIDTH, top, span * scale, ROW, fill="#f4f4f4")
        for iv in row:
            if iv.kind not in KIND_COLORS:
                continue
            left, w = x + LABEL_WIDTH + iv.start * scale, (iv.end - iv.start) * scale
            c.rect(left, top, w, ROW, KIND_COLORS[iv.kind], "#ffffff", stroke_width=0.5,
                   opacity=0.55 if iv.chunk % 2 else None)
            text = f"{iv.mb}" + (f".{iv.chunk}" if chunks else "")
            if text_width(text, 9) + 2 <= w:
                c.text(left + w / 2, top + 15, text, size=9, anchor="middle", fill="#ffffff")
    return y + len(labels) * (ROW + ROW_GAP)


def draw_time_axis(c: Canvas, *, x: float, y: float, width: float, span: float,
                   unit: str) -> None:
    """Ticks and labels of a time axis under timelines drawn by :func:`draw_timeline`."""
    scale = (width - LABEL_WIDTH) / (span or 1.0)
    left = x + LABEL_WIDTH
    c.line(left, y, left + span * scale, y, MUTED)
    for t in nice_ticks(0.0, span, 8):
        c.line(left + t * scale, y, left + t * scale, y + 4, MUTED)
        c.text(left + t * scale, y + 16, tick_label(t), size=11, anchor="middle", fill=MUTED)
    c.text(left + span * scale, y + 32, unit, size=11, anchor="end", fill=MUTED)


def draw_legend(c: Canvas, x: float, y: float, chunks: bool = False) -> None:
    """Forward and backward swatches (and the chunk shading) from (x, y) rightwards."""
    items = [(FORWARD_COLOR, None, "forward"), (BACKWARD_COLOR, None, "backward")]
    if chunks:
        items.append((FORWARD_COLOR, 0.55, "lighter: chunk 1"))
    for color, opacity, label in items:
        c.rect(x, y - 10, 12, 12, color, opacity=opacity)
        c.text(x + 16, y, label, size=11)
        x += 16 + text_width(label, 11) + 16


def timeline_chart(timeline: Timeline, labels: Sequence[str], *, title: str, name: str,
                   unit: str = "ms", width: float = 760) -> str:
    """One measured or simulated step as its own picture."""
    height = PAD_TOP + len(labels) * (ROW + ROW_GAP) + 50
    c = Canvas(width, height, title, name)
    c.text(12, 18, title, size=13, bold=True)
    chunks = any(iv.chunk > 0 for row in timeline.intervals for iv in row)
    draw_legend(c, width - 330, 18, chunks)
    bottom = draw_timeline(c, timeline, labels, x=12, y=PAD_TOP, width=width - 24,
                           span=timeline.makespan)
    draw_time_axis(c, x=12, y=bottom, width=width - 24, span=timeline.makespan, unit=unit)
    return c.svg()


# ---- stacked bars --------------------------------------------------------------------------


def stacked_bars(rows: Sequence[tuple[str, Sequence[float]]], parts: Sequence[str],
                 colors: Sequence[str], *, title: str, name: str,
                 fmt: Callable[[float], str], width: float = 680) -> str:
    """One horizontal bar per row, cut into ``parts`` (a value each), with the total at its
    end and a legend of the parts."""
    bar, gap = 20, 8
    left = 24 + max((text_width(label, 11) for label, _ in rows), default=0.0)
    first = 56  # the first bar's top, under the title and the legend
    height = first + len(rows) * (bar + gap) + 10
    c = Canvas(width, height, title, name)
    c.text(12, 18, title, size=13, bold=True)
    x = 12.0
    for part, color in zip(parts, colors, strict=True):
        c.rect(x, 30, 12, 12, color)
        c.text(x + 16, 40, part, size=11)
        x += 16 + text_width(part, 11) + 16
    biggest = max((sum(v) for _, v in rows), default=0.0) or 1.0
    usable = width - left - 90
    for i, (label, values) in enumerate(rows):
        top = first + i * (bar + gap)
        c.text(12, top + 15, label, size=11)
        x = left
        for value, color in zip(values, colors, strict=True):
            c.rect(x, top, value / biggest * usable, bar, color)
            x += value / biggest * usable
        c.text(x + 6, top + 15, fmt(sum(values)), size=11, fill=INK)
    return c.svg()
