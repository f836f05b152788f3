"""Timelines of a pipeline step, and a text drawing of them.

A timeline is, per rank, a list of intervals (start, end, kind, mb, chunk). The simulator in
`checker` produces one from a schedule; a trace of a real run converts to the same type, so the
same `render_text` draws the predicted and the measured step side by side.

Drawing of rank 0 and 1 of 1F1B with p = 2, m = 3, forward 1 and backward 2 time units:

    rank 0 |AB..aaCbb.cc|         A..Z forward of microbatch 0..25, a..z its backward,
    rank 1 |.AaaBbbCcc..|         '.' idle (the pipeline bubble)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

FORWARD = "F"
BACKWARD = "B"
WEIGHT = "W"  # the deferred weight-gradient half of a split backward (zero-bubble schedules)
IDLE = "."
OTHER = "~"  # any other kind of interval, e.g. communication in a measured trace
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Interval(NamedTuple):
    """One thing a rank did from `start` to `end`: kind "F" (forward), "B" (backward, or the
    input-gradient half of a split one) or "W" (the weight-gradient half) of microbatch `mb`
    on local chunk `chunk`. A measured trace may add other kinds."""

    start: float
    end: float
    kind: str
    mb: int
    chunk: int


@dataclass(frozen=True)
class Timeline:
    """Intervals per rank (``intervals[r]`` for pipeline rank r) and the step's makespan: the
    time from the start of the step (0) until the last rank finishes."""

    intervals: list[list[Interval]]
    makespan: float

    @property
    def num_ranks(self) -> int:
        return len(self.intervals)

    def busy_time(self, rank: int) -> float:
        """Time rank `rank` spends computing (forward, backward and W intervals)."""
        return sum(
            iv.end - iv.start for iv in self.intervals[rank]
            if iv.kind in (FORWARD, BACKWARD, WEIGHT)
        )

    def bubble_fraction(self) -> float:
        """Idle share of the step, averaged over ranks: mean_r (makespan − busy_r) / makespan.

        Only computing counts as busy, so time spent waiting for a message is bubble."""
        if self.makespan <= 0:
            return 0.0
        idle = [(self.makespan - self.busy_time(r)) / self.makespan for r in range(self.num_ranks)]
        return sum(idle) / len(idle)


def as_timeline(timeline: Timeline | Sequence[Sequence[Sequence]]) -> Timeline:
    """A `Timeline` from either a timeline or plain per-rank lists of (start, end, kind, mb,
    chunk) tuples, e.g. converted from a trace. Times are shifted so the earliest start is 0
    (traces carry wall-clock times)."""
    if isinstance(timeline, Timeline):
        return timeline
    rows = [[Interval(*iv) for iv in row] for row in timeline]
    starts = [iv.start for row in rows for iv in row]
    if not starts:
        return Timeline(rows, 0.0)
    t0 = min(starts)
    rows = [
        [Interval(iv.start - t0, iv.end - t0, iv.kind, iv.mb, iv.chunk) for iv in row]
        for row in rows
    ]
    return Timeline(rows, max(iv.end for row in rows for iv in row))


def _symbol(iv: Interval) -> str:
    if iv.kind == FORWARD:
        return _LETTERS[iv.mb % 26]
    if iv.kind == BACKWARD:
        return _LETTERS[iv.mb % 26].lower()
    if iv.kind == WEIGHT:
        return str(iv.mb % 10)
    return OTHER


def render_text(timeline: Timeline | Sequence[Sequence[Sequence]], width: int = 100) -> str:
    """Draw a timeline as text: one row per rank, time running left to right over `width`
    columns, then a legend.

    A column shows the interval that covers the column's midpoint: forward of microbatch k as
    the k-th capital letter (A = microbatch 0, wrapping after Z), its backward (or a split
    backward's B) as the lowercase letter, a split backward's W as the digit k mod 10, idle
    time as '.', any other kind of interval as '~'. When ranks hold several chunks
    (interleaved schedules) a second row under each rank gives the chunk of each column.
    """
    if width < 1:
        raise ValueError(f"width must be at least 1 column, got {width}")
    tl = as_timeline(timeline)
    span = tl.makespan if tl.makespan > 0 else 1.0
    dt = span / width
    show_chunk = any(iv.chunk > 0 for row in tl.intervals for iv in row)
    label_width = len(f"rank {max(tl.num_ranks - 1, 0)}")
    lines = []
    seen_other = False
    seen_weight = any(iv.kind == WEIGHT for row in tl.intervals for iv in row)
    for rank, row in enumerate(tl.intervals):
        cells = [IDLE] * width
        chunks = [" "] * width
        for iv in row:
            # columns j whose midpoint (j + 1/2)·dt lies in [start, end)
            first = max(math.ceil(iv.start / dt - 0.5), 0)
            last = min(math.ceil(iv.end / dt - 0.5), width)
            symbol = _symbol(iv)
            seen_other = seen_other or symbol == OTHER
            for j in range(first, last):
                cells[j] = symbol
                chunks[j] = str(iv.chunk % 10) if symbol != OTHER else " "
        lines.append(f"{f'rank {rank}':<{label_width}} |{''.join(cells)}|")
        if show_chunk:
            lines.append(f"{'chunk':>{label_width}} |{''.join(chunks)}|")
    legend = "A..Z forward of microbatch 0..25, a..z backward, '.' idle"
    if seen_weight:
        legend = ("A..Z forward of microbatch 0..25, a..z its B (input gradient), 0..9 its W "
                  "(weight gradients, microbatch mod 10), '.' idle")
    if show_chunk:
        legend += ", digits below a rank: chunk"
    if seen_other:
        legend += ", '~' other (communication)"
    lines.append(f"{legend}; time per column {dt:.4g}, makespan {tl.makespan:.4g}")
    return "\n".join(lines)
