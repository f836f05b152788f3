"""The four collectives data parallelism is built from, on small integer arrays.

    mpirun -n 4 python tutorials/examples/mpi_collectives.py

Rank r starts with x_r = 10·r + [0, 1, ..., 7]. Every rank calls the same collective; each
prints what it ends up with (gathered to rank 0, printed in rank order):

* allreduce:      every rank gets Σ_r x_r;
* reduce_scatter: rank r gets block r (a 1/n slice) of Σ_r x_r;
* allgather:      every rank gets [y_0, y_1, ...], the concatenation of everyone's y_r;
* broadcast:      every rank gets rank 0's array.

Last, the communication trace of this rank: one record per call, with the bytes it handed in.
"""

from __future__ import annotations

import time

import numpy as np

from mpipar.comm import Comm
from mpipar.trace import Tracer, format_summary_table


def show(world: Comm, what: str, value: np.ndarray) -> None:
    rows = world.gather_object(value.astype(int).tolist())
    if world.rank == 0:
        print(what)
        for r, row in enumerate(rows):
            print(f"  rank {r}: {row}")


def main() -> None:
    tracer = Tracer(0, enabled=True)
    world = Comm.world(tracer)
    n, r = world.size, world.rank
    t0 = time.perf_counter()
    x = 10.0 * r + np.arange(8)
    show(world, "start", x)

    total = world.allreduce(x.copy())
    show(world, "allreduce (sum)", total)

    if 8 % n == 0:
        block = world.reduce_scatter(x, np.empty(8 // n))
        show(world, "reduce_scatter (sum): rank r keeps block r", block)
        whole = world.allgather(block, np.empty(8))
        show(world, "allgather of those blocks: the sum again, on every rank", whole)

    y = x.copy() if r == 0 else np.zeros(8)
    world.broadcast(y, root=0)
    show(world, "broadcast from rank 0", y)

    if r == 0:
        print(f"rank 0's trace ({len(tracer.records)} records):")
        print(format_summary_table(tracer.totals(), time.perf_counter() - t0))


if __name__ == "__main__":
    main()
