"""``train.py`` with a fault on one rank: ``[mpirun -n N] python faulty_train.py [flags]``.

The fault comes from the environment, ``MPIPAR_TEST_FAULT=RANK:STEP:KIND``: when global rank
RANK runs the forward and backward pass of training step STEP it

``sleep``  stops making progress (sleeps an hour, as a hung rank would; the watchdog's case),
``raise``  raises ``RuntimeError`` (the excepthook's case),
``kill``   SIGKILLs itself (the launcher's case).

Everything else is ``train.py`` itself, flags and all, so the tests see what a user sees.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import train
from mpipar.training import Trainer


def fail(kind: str, rank: int, step: int) -> None:
    # The wall-clock time of the fault, so that the time the job takes to end can be measured.
    print(f"[rank {rank}] fault: {kind} at step {step}, time {time.time():.3f}", file=sys.stderr,
          flush=True)
    if kind == "sleep":
        time.sleep(3600)
    elif kind == "raise":
        raise RuntimeError(f"rank {rank} failed on purpose at step {step}")
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise SystemExit(f"unknown fault {kind!r}")


def inject(rank: int, step: int, kind: str) -> None:
    """Make global rank ``rank`` fail in the forward/backward pass of step ``step``."""
    original = Trainer.forward_backward

    def forward_backward(self: Trainer, at: int, x, y) -> float:
        if self.grid.world.rank == rank and at == step:
            fail(kind, rank, step)
        return original(self, at, x, y)

    Trainer.forward_backward = forward_backward


if __name__ == "__main__":
    rank, step, kind = os.environ["MPIPAR_TEST_FAULT"].split(":")
    inject(int(rank), int(step), kind)
    sys.exit(train.main(sys.argv[1:]))
