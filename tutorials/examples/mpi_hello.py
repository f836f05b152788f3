"""Who am I? Every process of an MPI job runs this same file; only its rank differs.

    mpirun -n 4 python tutorials/examples/mpi_hello.py

Each rank describes itself; rank 0 collects the descriptions (a small control message) and
prints them in rank order, because lines printed by different processes reach the terminal
in no particular order.
"""

from __future__ import annotations

import os
import socket

from mpipar.comm import Comm


def main() -> None:
    world = Comm.world()
    me = f"rank {world.rank} of {world.size}: pid {os.getpid()} on {socket.gethostname()}"
    everyone = world.gather_object(me)  # rank 0 gets the list, the others None
    if world.rank == 0:
        print("\n".join(everyone))


if __name__ == "__main__":
    main()
