"""Communicators: split the ranks of a job into groups that talk among themselves.

    mpirun -n 4 python tutorials/examples/mpi_split.py [--width 2]

The ranks are laid out as a grid ``--width`` ranks wide: rank r sits in row r // width and
column r % width. ``Comm.split(color, key, name)`` (MPI's ``Comm.Split``) is called by every
rank of a group together: ranks that pass the same ``color`` end up in one new communicator,
numbered in the order of their ``key``. Splitting once by row and once by column gives every
rank two groups; a collective in one of them involves only that group's ranks. Each rank here
all-reduces its world rank in both groups, and rank 0 prints what every rank saw.

This is how mpipar's ``ProcessGrid`` builds its tensor-, data- and pipeline-parallel groups
(docs/design.md §4): a collective of the tensor-parallel group never waits for ranks outside
it.
"""

from __future__ import annotations

import argparse

import numpy as np

from mpipar.comm import Comm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2, help="ranks per row of the grid")
    width = ap.parse_args().width
    world = Comm.world()
    row, col = divmod(world.rank, width)
    rows = world.split(color=row, key=col, group="row")  # same row: the same color
    cols = world.split(color=col, key=row, group="col")
    lines = []
    for name, index, group in (("row", row, rows), ("column", col, cols)):
        total = group.allreduce(np.array([float(world.rank)]))  # only this group's ranks
        lines.append(f"{name} {index} {list(group.members)} as {group.rank} of {group.size}, "
                     f"sum of world ranks {total[0]:g}")
    report = world.gather_object(f"rank {world.rank}: " + "; ".join(lines))
    if world.rank == 0:
        print("\n".join(report))


if __name__ == "__main__":
    main()
