"""Collectives as before/after boxes (chapter 0), and the ring all-reduce step by step
(chapter 2).

A buffer is drawn as cells, and a cell's value as the set of contributions summed into it: a
`Part` of (chunk, rank) pairs. Rank r starts with chunk a of its own data, ``a_r`` = Part
{(a, r)}; adding two parts is the union of their contributions, so a cell that every rank's
``a`` went into is Σa. The four collectives are then short definitions on lists of parts
(:func:`allreduce` ...), and the ring is not redrawn from a description but *run*: mpipar's
own `ring_reduce_scatter` and `ring_allgather` execute on n threads, one per rank, over
buffers of parts, with a stand-in communicator (:class:`RecordingRing`) that passes each
`sendrecv` round in lock step and writes down what every rank sent in every step.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpipar.parallel.ring import chunk_bounds, ring_allgather, ring_reduce_scatter
from mpipar.svg import INK, MUTED, RANK_COLORS, Canvas

CHUNKS = "abcdefgh"
SUBSCRIPTS = "₀₁₂₃₄₅₆₇₈₉"
N_RANKS = 4


@dataclass(frozen=True)
class Part:
    """A cell's value: the (chunk, rank) contributions that were summed into it."""

    terms: frozenset[tuple[int, int]]

    def __add__(self, other: Part) -> Part:
        return Part(self.terms | other.terms)

    @property
    def chunk(self) -> int:
        return min(chunk for chunk, _ in self.terms)

    @property
    def ranks(self) -> list[int]:
        return sorted(rank for _, rank in self.terms)


def own(chunk: int, rank: int) -> Part:
    """Chunk ``chunk`` of rank ``rank``'s data, nothing summed into it yet."""
    return Part(frozenset({(chunk, rank)}))


def label(part: Part, n: int) -> str:
    """``a₀`` for one rank's chunk, ``a₀₁₂`` for a partial sum, ``Σa`` for the whole sum."""
    letter = CHUNKS[part.chunk]
    if len(part.ranks) == n and n > 1:
        return "Σ" + letter
    return letter + "".join(SUBSCRIPTS[r] for r in part.ranks)


# ---- what each collective leaves on every rank ---------------------------------------------

Buffers = list[list[Part | None]]  # buffers[rank] = that rank's cells (None: nothing there)


def allreduce(bufs: Buffers) -> Buffers:
    """Every rank gets the cell-by-cell sum over ranks."""
    total = [sum(cells[1:], cells[0]) for cells in zip(*bufs, strict=True)]
    return [list(total) for _ in bufs]


def reduce_scatter(bufs: Buffers) -> Buffers:
    """Rank r keeps block r of the sum (one cell per rank here)."""
    total = allreduce(bufs)[0]
    block = len(total) // len(bufs)
    return [total[r * block:(r + 1) * block] for r in range(len(bufs))]


def allgather(bufs: Buffers) -> Buffers:
    """Every rank gets every rank's cells, in rank order."""
    everything = [cell for cells in bufs for cell in cells]
    return [list(everything) for _ in bufs]


def broadcast(bufs: Buffers, root: int = 0) -> Buffers:
    """Every rank gets a copy of ``root``'s cells."""
    return [list(bufs[root]) for _ in bufs]


def starting_buffers(n: int) -> Buffers:
    """Rank r holds chunks a, b, ... of its own data: a_r, b_r, ..."""
    return [[own(chunk, rank) for chunk in range(n)] for rank in range(n)]


def collective_examples(n: int = N_RANKS) -> list[tuple[str, str, Buffers, Buffers]]:
    """(call, what it does, before, after) for the four collectives of chapter 0."""
    full = starting_buffers(n)
    blocks = [[own(rank, rank)] for rank in range(n)]  # rank r holds one chunk: its own
    only_root = [cells if rank == 0 else [None] * n for rank, cells in enumerate(full)]
    return [
        ("allreduce(x)", "every rank gets the sum", full, allreduce(full)),
        ("reduce_scatter(x, out)", "rank r gets block r of the sum", full,
         reduce_scatter(full)),
        ("allgather(y, out)", "every rank gets every block", blocks, allgather(blocks)),
        ("broadcast(x, root=0)", "every rank gets rank 0's x", only_root,
         broadcast(only_root)),
    ]


CELL_W, CELL_H, ROW_H = 38, 22, 28


def draw_cells(c: Canvas, cells: Sequence[Part | None], x: float, y: float, n: int) -> None:
    """One buffer: a cell per part, coloured by the rank it came from (dark once summed)."""
    for i, part in enumerate(cells):
        left = x + i * CELL_W
        if part is None:
            c.rect(left, y, CELL_W - 3, CELL_H, "#ffffff", MUTED, rx=3, dash=True)
            continue
        summed = len(part.ranks) > 1
        c.rect(left, y, CELL_W - 3, CELL_H, "#444444" if summed else RANK_COLORS[part.ranks[0]],
               rx=3)
        c.text(left + (CELL_W - 3) / 2, y + 15, label(part, n), size=12, anchor="middle",
               fill="#ffffff")


def collectives_figure() -> str:
    """Four panels, before → after, of 4 ranks each (chapter 0)."""
    n = N_RANKS
    panel_w, panel_h = 420, 48 + n * ROW_H
    c = Canvas(2 * panel_w + 20, 2 * panel_h + 40, "The four collectives on 4 ranks",
               "collectives")
    c.text(12, 22, "Collectives on 4 ranks: what each rank holds before and after the call",
           size=14, bold=True)
    for k, (call, what, before, after) in enumerate(collective_examples(n)):
        x, y = 12 + (k % 2) * (panel_w + 10), 40 + (k // 2) * panel_h
        c.text(x, y + 14, call, size=13, bold=True, mono=True)
        c.text(x + 8 + len(call) * 13 * 0.62, y + 14, "— " + what, size=12, fill=MUTED)
        for rank in range(n):
            top = y + 26 + rank * ROW_H
            c.text(x, top + 15, f"rank {rank}", size=11)
            draw_cells(c, before[rank], x + 50, top, n)
            c.line(x + 50 + n * CELL_W + 6, top + 11, x + 50 + n * CELL_W + 40, top + 11,
                   MUTED, arrow=True)
            draw_cells(c, after[rank], x + 50 + n * CELL_W + 48, top, n)
    c.text(12, 2 * panel_h + 32, "a₀ = chunk a of rank 0's buffer, coloured by rank; "
           "Σa = a₀ + a₁ + a₂ + a₃ (dark); dashed = nothing there yet", size=11, fill=MUTED)
    return c.svg()


# ---- the ring all-reduce, run for real -----------------------------------------------------


class RecordingRing:
    """A communicator of ``size`` ranks played by threads: ``sendrecv`` hands each rank's
    buffer to its destination through a shared table, all ranks in lock step, and logs
    (call number, rank, destination, what was sent). Only what the ring functions use."""

    def __init__(self, rank: int, size: int, shared: dict) -> None:
        self.rank, self.size, self.shared, self.calls = rank, size, shared, 0

    def sendrecv(self, sendbuf: np.ndarray, dest: int, recvbuf: np.ndarray,
                 source: int) -> np.ndarray:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[(self.rank, dest)] = sendbuf.copy()
        self.shared["log"].append((self.calls, self.rank, dest, tuple(sendbuf)))
        barrier.wait()
        recvbuf[...] = slots[(source, self.rank)]
        barrier.wait()  # nobody overwrites a slot before its reader has taken it
        self.calls += 1
        return recvbuf


def run_ring(n: int = N_RANKS) -> tuple[list[tuple[int, int, int, tuple]], list[list[Part]]]:
    """Run the ring all-reduce on n threads over buffers of n parts (one per chunk).

    Returns the log of every ``sendrecv`` sorted by (call, rank), and each rank's final
    buffer. Reduce-scatter is calls 0..n−2, all-gather calls n−1..2n−3.
    """
    shared: dict = {"slots": {}, "log": [], "barrier": threading.Barrier(n, timeout=30)}
    finals: list[list[Part]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        comm = RecordingRing(rank, n, shared)
        flat = np.empty(n, dtype=object)
        flat[:] = starting_buffers(n)[rank]
        bounds, tmp = chunk_bounds(n, n), np.empty(1, dtype=object)
        try:
            ring_reduce_scatter(comm, flat, bounds, tmp)
            ring_allgather(comm, flat, bounds, tmp)
        except BaseException as exc:  # reported in the caller's thread below
            errors.append(exc)
            shared["barrier"].abort()
        finals[rank] = list(flat)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("the ring all-reduce failed on a thread") from errors[0]
    return sorted(shared["log"], key=lambda e: (e[0], e[1])), finals


def draw_chunk(c: Canvas, part: Part, x: float, y: float, w: float, n: int) -> None:
    """One chunk coloured by its letter, shaded by how many ranks are summed into it."""
    complete = len(part.ranks) == n
    c.rect(x, y, w, CELL_H, RANK_COLORS[part.chunk], rx=3,
           opacity=None if complete else round(len(part.ranks) / n, 2))
    c.text(x + w / 2, y + 15, label(part, n), size=11, anchor="middle",
           fill="#ffffff" if complete else INK)


def draw_ring_header(c: Canvas, n: int, left: float, x_steps: float, col_w: float) -> None:
    """The two phases' titles, the line between them and the column heads."""
    steps = 2 * (n - 1)
    c.text(12, 22, f"Ring all-reduce on {n} ranks: what each rank sends to rank r + 1, "
           "step by step", size=14, bold=True)
    c.text(x_steps + (n - 1) * col_w / 2, 50, "reduce-scatter: add what arrives",
           size=12, anchor="middle", bold=True)
    c.text(x_steps + (n - 1) * col_w * 1.5, 50, "all-gather: pass finished chunks on",
           size=12, anchor="middle", bold=True)
    c.line(x_steps + (n - 1) * col_w - 4, 38, x_steps + (n - 1) * col_w - 4, 82 + n * 40,
           MUTED, dash=True)
    c.text(left, 72, "start", size=11, fill=MUTED)
    for s in range(steps):
        c.text(x_steps + s * col_w + col_w / 2, 72, f"step {s + 1}", size=11, anchor="middle",
               fill=MUTED)
    c.text(x_steps + steps * col_w + 8, 72, "end: every rank", size=11, fill=MUTED)


def ring_figure(n: int = N_RANKS) -> str:
    """A rank × step table: in each step, the chunk (and partial sum) each rank sends right."""
    log, finals = run_ring(n)
    steps = 2 * (n - 1)
    col_w, left = 92, 64
    x_steps = left + n * 30 + 16
    c = Canvas(x_steps + steps * col_w + n * 30 + 30, 100 + n * 40 + 40,
               f"Ring all-reduce on {n} ranks", "ring")
    draw_ring_header(c, n, left, x_steps, col_w)
    for call, rank, dest, (part,) in log:
        x, top = x_steps + call * col_w, 82 + rank * 40
        draw_chunk(c, part, x + 2, top, 46, n)
        c.text(x + 52, top + 15, f"→ {dest}", size=11, fill=MUTED)
    for rank in range(n):
        top = 82 + rank * 40
        c.text(12, top + 15, f"rank {rank}", size=11)
        for i, part in enumerate(starting_buffers(n)[rank]):
            draw_chunk(c, part, left + i * 30, top, 27, n)
        for i, part in enumerate(finals[rank]):
            draw_chunk(c, part, x_steps + steps * col_w + 8 + i * 30, top, 27, n)
    c.text(12, 100 + n * 40 + 20,
           f"Each cell: the chunk sent, subscripts = ranks summed into it so far (shade grows "
           f"with them). {steps} sendrecv calls of B/{n} bytes: 2(n − 1)/n · B per rank.",
           size=11, fill=MUTED)
    return c.svg()
