"""Ways a job can fail, one per ``mode``: ``mpirun -n N python failures.py MODE [ARG]``.

``raise_in_collective``  rank 1 raises while the others wait in an all-reduce; the excepthook
                         must end the whole job (``MPI_Abort``) with rank 1's traceback.
``config_error``         every rank finds the same bad layout and exits 2, as ``train.py``
                         does: rank 0 prints the message, every rank raises ``SystemExit(2)``.
``config_differs``       rank 1 has another learning rate; ``check_same_config`` raises on
                         every rank, and every rank exits 2.
``abort_code``           rank 1 calls ``Abort(7)`` while the others wait: which exit code
                         does the launcher report?
``exit_alone``           rank 1 exits 2 by itself while the others wait in an all-reduce: the
                         job hangs (this is why exit 2 must be raised on every rank). ARG is a
                         file where each rank appends its pid, so the test can check that
                         its timeout killed them all.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from mpipar.comm import Comm, install_excepthook
from mpipar.grid import ConfigError, check_same_config, validate_layout


def exit_on_config_error(world: Comm, exc: ConfigError) -> None:
    """What ``train.py`` does: one message (from rank 0), then exit 2 on every rank."""
    if world.rank == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    print(f"rank {world.rank} exits 2", flush=True)
    raise SystemExit(2)


def main() -> None:
    mode = sys.argv[1]
    world = Comm.world()
    install_excepthook(world)
    waiting = np.ones(3)

    if mode == "raise_in_collective":
        if world.rank == 1:
            time.sleep(0.5)  # let the others enter the all-reduce first
            raise RuntimeError("rank 1 failed on purpose")
        world.allreduce(waiting)
    elif mode == "config_error":
        try:
            validate_layout(world.size, 2, 1, 1, batch_size=6, microbatches=2, n_layer=4,
                            n_head=4, d_model=64)
        except ConfigError as exc:
            exit_on_config_error(world, exc)
    elif mode == "config_differs":
        config = {"lr": 0.3 if world.rank == 1 else 0.1, "steps": 10}
        try:
            check_same_config(world, config)
        except ConfigError as exc:
            exit_on_config_error(world, exc)
    elif mode == "abort_code":
        if world.rank == 1:
            time.sleep(0.5)
            world.mpi.Abort(7)
        world.allreduce(waiting)
    elif mode == "exit_alone":
        with open(sys.argv[2], "a") as f:
            f.write(f"{os.getpid()}\n")
        world.barrier()  # every pid is written before anyone exits
        if world.rank == 1:
            raise SystemExit(2)
        world.allreduce(waiting)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"rank {world.rank} finished normally", flush=True)


if __name__ == "__main__":
    main()
