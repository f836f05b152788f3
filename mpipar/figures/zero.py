"""ZeRO's partitions (chapter 2): which slice of the parameters, gradients and optimizer state
each data-parallel rank keeps under plain data parallelism and ZeRO stages 1, 2 and 3.

With Ψ parameters in fp32 and AdamW, a rank's model state is parameters 4Ψ bytes, gradients
4Ψ and the moments m and v 8Ψ. A stage shards some of them over the dp ranks: rank r keeps
the slice `mpipar.parallel.zero.owned_chunk` names, cut by `mpipar.parallel.ring.chunk_bounds`
as the optimizer cuts the flat buffer. The bytes per rank are added up from the drawing's
own data, so the totals printed beside each row are what the bars show.
"""

from __future__ import annotations

from fractions import Fraction

from mpipar.parallel.ring import chunk_bounds
from mpipar.parallel.zero import owned_chunk
from mpipar.svg import MUTED, RANK_COLORS, Canvas

DP = 4
# (name, bytes per parameter, colour) of the three parts of a rank's model state
PARTS = (("parameters", 4, RANK_COLORS[0]), ("gradients", 4, RANK_COLORS[1]),
         ("AdamW m and v", 8, RANK_COLORS[2]))
# (row label, which parts are sharded over dp)
STAGES = (("plain data parallel", set()), ("ZeRO-1", {"AdamW m and v"}),
          ("ZeRO-2", {"gradients", "AdamW m and v"}),
          ("ZeRO-3", {"parameters", "gradients", "AdamW m and v"}))


def held_slice(part: str, sharded: set[str], rank: int, dp: int) -> tuple[Fraction, Fraction]:
    """The fraction [lo, hi) of ``part`` that ``rank`` keeps: all of it, or its 1/dp shard."""
    if part not in sharded:
        return Fraction(0), Fraction(1)
    lo, hi = chunk_bounds(dp, dp)[owned_chunk(rank, dp, "mpi")]
    return Fraction(lo, dp), Fraction(hi, dp)


def bytes_per_rank(sharded: set[str], dp: int) -> Fraction:
    """Bytes of model state per rank, in units of Ψ (rank 0's; every rank's is the same)."""
    total = Fraction(0)
    for part, size, _ in PARTS:
        lo, hi = held_slice(part, sharded, 0, dp)
        total += size * (hi - lo)
    return total


def psi(x: Fraction) -> str:
    """``Fraction(10)`` → ``'10Ψ'``, ``Fraction(5, 2)`` → ``'2.5Ψ'``."""
    return f"{float(x):g}Ψ"


def zero_figure(dp: int = DP) -> str:
    unit, left, cell_gap = 9.0, 170, 16
    bar_w = sum(size for _, size, _ in PARTS) * unit
    width = left + dp * (bar_w + cell_gap) + 110
    c = Canvas(width, 96 + len(STAGES) * 46 + 30,
               f"ZeRO partitions over {dp} data-parallel ranks", "zero")
    c.text(12, 22, f"What each of {dp} data-parallel ranks keeps: plain data parallelism "
           "and ZeRO-1, 2, 3", size=14, bold=True)
    x = 12.0
    for name, size, color in PARTS:
        c.rect(x, 36, 12, 12, color)
        c.text(x + 16, 46, f"{name} ({size}Ψ bytes)", size=11)
        x += 40 + len(name) * 7 + 60
    c.rect(x, 36, 12, 12, "#e8e8e8")
    c.text(x + 16, 46, "kept by another rank", size=11)
    for rank in range(dp):
        c.text(left + rank * (bar_w + cell_gap) + bar_w / 2, 76, f"dp rank {rank}", size=11,
               anchor="middle", fill=MUTED)
    c.text(left + dp * (bar_w + cell_gap), 76, "bytes per rank", size=11, fill=MUTED)
    for row, (stage, sharded) in enumerate(STAGES):
        top = 86 + row * 46
        c.text(12, top + 16, stage, size=12, bold=True)
        for rank in range(dp):
            x = left + rank * (bar_w + cell_gap)
            for part, size, color in PARTS:
                c.rect(x, top, size * unit, 22, "#e8e8e8", "#ffffff", stroke_width=0.5)
                lo, hi = held_slice(part, sharded, rank, dp)
                c.rect(x + float(lo) * size * unit, top, float(hi - lo) * size * unit, 22,
                       color, "#ffffff", stroke_width=0.5)
                x += size * unit
        c.text(left + dp * (bar_w + cell_gap), top + 16, psi(bytes_per_rank(sharded, dp)),
               size=12, bold=True)
    c.text(12, 96 + len(STAGES) * 46 + 14,
           "Sharded state is cut into dp equal slices of the flat buffer; rank r keeps slice r. "
           "Ψ = number of parameters, fp32.", size=11, fill=MUTED)
    return c.svg()
