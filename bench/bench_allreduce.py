"""Hand-written ring all-reduce vs MPI's Allreduce, on float32 buffers of 1 to 16 MiB.

    mpirun -n 2 python bench/bench_allreduce.py [--repeats 20] [--sizes-mb 1 2 4 8 16]

For each size, each implementation is run ``--repeats`` times after a warm-up; a repeat's
time is the slowest rank's (an all-reduce is finished when the last rank has its result) and
the table shows the median. Two bandwidths are derived from a B-byte buffer and time t:

* algbw = B / t, what the caller experiences;
* busbw = algbw · 2(n − 1)/n, the bytes each rank actually had to send per second with a
  bandwidth-optimal algorithm (the ring), comparable across rank counts (the convention of
  NVIDIA's nccl-tests).

Both results are checked to be identical first (integer-valued data sums exactly).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from machine import emit, format_machine, machine_info

from mpipar.comm import Comm, install_excepthook
from mpipar.parallel.ring import ring_allreduce

NPROCS = 2  # bench/run_all.py launches this script with mpirun -n 2

MIB = 2**20


def time_allreduce(world: Comm, fn: Callable[[np.ndarray], object], template: np.ndarray,
                   repeats: int, warmup: int) -> list[float]:
    """Seconds per call (slowest rank), for ``repeats`` calls after ``warmup`` untimed ones."""
    buf = np.empty_like(template)
    slowest = np.zeros(1)
    times = []
    for i in range(warmup + repeats):
        np.copyto(buf, template)  # fresh input each time, outside the timed region
        world.barrier()
        t0 = time.perf_counter()
        fn(buf)
        slowest[0] = time.perf_counter() - t0
        world.allreduce(slowest, op="max")
        if i >= warmup:
            times.append(float(slowest[0]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    world = Comm.world()
    install_excepthook(world)
    n, rank = world.size, world.rank
    impls = {
        "ring": lambda buf: ring_allreduce(world, buf),
        "mpi": lambda buf: world.allreduce(buf),
    }

    rows = []
    for mb in args.sizes_mb:
        count = mb * MIB // 4  # float32 elements
        template = ((np.arange(count) % 7) + rank).astype(np.float32)
        ring_out, mpi_out = impls["ring"](template.copy()), impls["mpi"](template.copy())
        if not np.array_equal(ring_out, mpi_out):
            raise AssertionError(f"{mb} MiB: ring and MPI all-reduce disagree")
        medians = {
            name: statistics.median(time_allreduce(world, fn, template, args.repeats,
                                                   args.warmup))
            for name, fn in impls.items()
        }
        rows.append((mb, medians))

    if rank == 0:
        info = machine_info()
        print(format_machine(info))
        for mb, med in rows:
            emit("allreduce", f"{mb} MiB", {f"{k}_s": v for k, v in med.items()}, info)
        factor = 2 * (n - 1) / n
        print(f"all-reduce of float32 buffers on {n} ranks, median of {args.repeats} repeats")
        header = (f"{'size':>8} | {'ring ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11} | "
                  f"{'mpi ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11} | {'ring/mpi':>8}")
        print(header)
        print("-" * len(header))
        for mb, med in rows:
            nbytes = mb * MIB
            cells = []
            for name in ("ring", "mpi"):
                algbw = nbytes / med[name] / 1e9
                cells.append(f"{med[name] * 1e3:>9.3f} {algbw:>11.2f} {algbw * factor:>11.2f}")
            print(f"{mb:>4} MiB | {cells[0]} | {cells[1]} | {med['ring'] / med['mpi']:>8.2f}")


if __name__ == "__main__":
    main()
