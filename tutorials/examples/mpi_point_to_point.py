"""Point to point: one rank sends an array, another receives it (blocking Send/Recv).

    mpirun -n 2 python tutorials/examples/mpi_point_to_point.py

1. Rank 0 sends ``[0, 1, ..., 7]``; rank 1 receives it into a buffer of its own, doubles it
   and sends it back. A receive needs a buffer of the right size and dtype in advance: the
   uppercase calls (``Send``/``Recv`` inside :class:`mpipar.comm.Comm`) move raw bytes.
2. Ping-pong: the same round trip for messages of 8 B to 8 MiB, timed. Half a round trip is
   the time to send one message, t(B) ≈ α + B/β: a latency α that every message pays, and a
   bandwidth β that matters only for large ones. That model is what the cost of the ring
   all-reduce (chapter 2) is reckoned in.
"""

from __future__ import annotations

import time

import numpy as np

from mpipar.comm import Comm


def main() -> None:
    world = Comm.world()
    if world.size != 2:
        raise SystemExit("run with mpirun -n 2")
    if world.rank == 0:
        x = np.arange(8, dtype=np.float64)
        world.send(x, dest=1)
        back = world.recv(np.empty(8), source=1)
        print(f"rank 0 sent     {x}")
        print(f"rank 0 received {back}")
    else:
        x = world.recv(np.empty(8), source=0)
        world.send(2 * x, dest=0)

    if world.rank == 0:
        print(f"{'bytes':>9} {'one way µs':>11} {'GB/s':>7}")
    for nbytes in (8, 1024, 64 * 1024, 1024**2, 8 * 1024**2):
        buf = np.zeros(nbytes // 8)
        repeats = 20
        world.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            if world.rank == 0:
                world.send(buf, dest=1)
                world.recv(buf, source=1)
            else:
                world.recv(buf, source=0)
                world.send(buf, dest=0)
        one_way = (time.perf_counter() - t0) / (2 * repeats)
        if world.rank == 0:
            print(f"{nbytes:>9} {one_way * 1e6:>11.1f} {nbytes / one_way / 1e9:>7.2f}")


if __name__ == "__main__":
    main()
