"""Fit the α–β model t(B) = α + B/β to ping-pong times: latency α and bandwidth β.

    mpirun -n 2 python tutorials/examples/fit_alpha_beta.py        # measure here, then fit
    python tutorials/examples/fit_alpha_beta.py --table 8:13.6 1024:12.1 ...   # bytes:µs

Measuring repeats chapter 0's ping-pong (one-way time of messages of 8 B to 8 MiB, from
round trips). The fit is linear least squares on t = α + γ·B with γ = 1/β, each point
weighted by 1/t: the times span three orders of magnitude, and an unweighted fit would let
the largest message decide α too. Then every point's time as the model predicts it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SIZES = (8, 1024, 64 * 1024, 1024**2, 8 * 1024**2)


def measure() -> list[tuple[int, float]] | None:
    """One-way seconds per size on 2 ranks (rank 0 gets the table, rank 1 None)."""
    from mpipar.comm import Comm

    world = Comm.world()
    if world.size != 2:
        raise SystemExit("run with mpirun -n 2, or give --table")
    table = []
    for nbytes in SIZES:
        buf = np.zeros(nbytes // 8)
        world.barrier()
        start = time.perf_counter()
        for _ in range(20):
            if world.rank == 0:
                world.send(buf, dest=1)
                world.recv(buf, source=1)
            else:
                world.recv(buf, source=0)
                world.send(buf, dest=0)
        table.append((nbytes, (time.perf_counter() - start) / 40))
    return table if world.rank == 0 else None


def fit(table: list[tuple[int, float]]) -> tuple[float, float]:
    """(α seconds, β bytes/s) minimising Σ ((α + B/β − t) / t)²."""
    b = np.array([n for n, _ in table], dtype=np.float64)
    t = np.array([s for _, s in table])
    a = np.stack([np.ones_like(b), b], axis=1) / t[:, None]
    (alpha, gamma), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    return float(alpha), float(1.0 / gamma)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", nargs="+", metavar="BYTES:MICROSECONDS",
                    help="fit these one-way times instead of measuring")
    args = ap.parse_args()
    if args.table:
        table = [(int(b), float(us) * 1e-6) for b, us in (x.split(":") for x in args.table)]
    else:
        table = measure()
        if table is None:
            return
    alpha, beta = fit(table)
    print(f"{'bytes':>9} {'measured µs':>12} {'α + B/β µs':>11}")
    for nbytes, seconds in table:
        print(f"{nbytes:>9} {seconds * 1e6:>12.1f} {(alpha + nbytes / beta) * 1e6:>11.1f}")
    print(f"α = {alpha * 1e6:.1f} µs, β = {beta / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
