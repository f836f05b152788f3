"""Script side of the ``VERDICT`` protocol: many named checks in one ``mpirun`` launch.

Each rank runs the same checks; a failing assertion is recorded (rank, check, message)
instead of ending the process, so one launch reports every wrong result. Any other exception
(an MPI error, a bug in the check) leaves the ranks' communication out of step, so it is
not caught: the excepthook prints it and aborts the job at once. At the end rank 0
gathers all ranks' results and prints ``VERDICT {"check name": [failure, ...], ...}``, which
``tests/mpi_util.parse_verdict`` reads; a check passed when its list is empty.

A check must make the same communication calls on every rank and assert only afterwards:
a rank that skips a collective because it failed early would leave the others waiting
(the test harness's timeout would then end the job).
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from mpipar.comm import Comm, install_excepthook

HERE = Path(__file__).resolve().parent


class Checks:
    """Named checks of one launch; ``report()`` prints the merged verdict on rank 0."""

    def __init__(self, world: Comm) -> None:
        install_excepthook(world)  # any other exception ends the whole launch at once
        self.world = world
        self.failures: dict[str, list[str]] = {}

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        """Run the ``with`` body as check ``name``; an ``AssertionError`` in it is recorded."""
        self.failures.setdefault(name, [])
        try:
            yield
        except AssertionError as exc:  # a wrong result: report it and go on to the next check
            # Point at the failing line of the check script, not inside numpy's asserts.
            frames = traceback.extract_tb(exc.__traceback__)
            ours = [f for f in frames if Path(f.filename).parent == HERE] or frames
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}"
            self.failures[name].append(
                f"rank {self.world.rank} ({where}): {type(exc).__name__}: {exc}"
            )

    def report(self) -> None:
        """Gather every rank's failures to rank 0 and print the ``VERDICT`` line there."""
        gathered = self.world.gather_object(self.failures)
        if self.world.rank == 0:
            merged: dict[str, list[str]] = {}
            for failures in gathered:
                for name, msgs in failures.items():
                    merged.setdefault(name, []).extend(msgs)
            print("VERDICT " + json.dumps(merged), flush=True)
        sys.stdout.flush()
