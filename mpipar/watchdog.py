"""A watchdog: end the whole job when a rank stops making progress.

A rank that stops (SIGSTOP, two ranks each waiting for the other, a lost node) does not fail:
its peers wait in their next collective, forever, and nothing is printed. So every rank runs
a watchdog thread that watches a progress stamp, renewed

* by the training loop at each finished step, evaluation and checkpoint (:meth:`Watchdog.beat`);
* by the communication layer whenever a blocking call returns (:class:`mpipar.comm.Activity`).

When the stamp is older than the limit, the watchdog writes one line to stderr, in one write
so that the ranks' lines do not interleave: the step, the part of the run and the training
phase the rank is in, and the communication call it is blocked in (or made last) with its
group, peer and bytes. It waits a moment, so that the other stalled ranks can print their
line too, then ends the whole job with exit code 1 (:func:`mpipar.comm.abort`). mpi4py releases
the Python lock while the main thread is blocked inside MPI, so the watchdog thread runs
meanwhile; a stopped rank's own watchdog is stopped with it, and its peers' watchdogs report.

The limit is ``--timeout SECONDS`` when given (0 turns the watchdog off). By default it is
:data:`STARTUP_LIMIT_S` until :data:`TIMED_STEPS` steps have run (start-up, reading data and
the first, slower steps), then ``max(FLOOR_S, FACTOR × the slowest of those steps)``: far
longer than any wait in a healthy run, which never goes a whole step without a returned call.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from mpipar.comm import Activity, abort
from mpipar.trace import Tracer

STARTUP_LIMIT_S = 600.0
FLOOR_S = 120.0
FACTOR = 20.0
TIMED_STEPS = 3


def default_limit(step_times: list[float]) -> float:
    """The limit without ``--timeout``: see the module docstring."""
    if len(step_times) < TIMED_STEPS:
        return STARTUP_LIMIT_S
    return max(FLOOR_S, FACTOR * max(step_times[:TIMED_STEPS]))


def _stderr(line: str) -> None:
    os.write(2, line.encode())  # one system call: the line arrives whole


class Watchdog:
    """This rank's watchdog; ``timeout`` None uses :func:`default_limit`, 0 disables it.

    Use as a context manager (the thread runs inside the block). ``abort`` and ``write`` are
    what it calls when it fires (the defaults end the job and write to stderr).
    """

    def __init__(self, timeout: float | None, rank: int, tracer: Tracer,
                 activity: Activity | None = None, *,
                 abort: Callable[[int], None] = abort,
                 write: Callable[[str], None] = _stderr) -> None:
        self.timeout = timeout
        self.rank, self.tracer, self.activity = rank, tracer, activity
        self.part = "start-up"  # the part of the run: training, evaluation, saving, ...
        self._abort, self._write = abort, write
        self._step_times: list[float] = []
        self._stamp = time.perf_counter()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def limit(self) -> float:
        """Seconds without progress after which the job is ended."""
        return self.timeout if self.timeout else default_limit(self._step_times)

    def beat(self, part: str | None = None) -> None:
        """Progress: renew the stamp (and say which part of the run is under way)."""
        self._stamp = time.perf_counter()
        if part is not None:
            self.part = part

    def step_done(self, seconds: float) -> None:
        """A training step finished in ``seconds`` (the first few set the default limit)."""
        if len(self._step_times) < TIMED_STEPS:
            self._step_times.append(seconds)
        self.beat()

    def idle(self) -> float:
        """Seconds since the last progress of the loop or of the communication layer."""
        last = self._stamp
        if self.activity is not None:
            last = max(last, self.activity.last_return)
        return time.perf_counter() - last

    def __enter__(self) -> Watchdog:
        if self.timeout != 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # it wakes at once, unless it is firing

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.limit / 10)):
            if self.idle() > self.limit:
                self._fire()
                return

    def _fire(self) -> None:
        self._write(self.describe() + "\n")
        time.sleep(min(1.0, self.limit / 4))  # let the other stalled ranks say where they are
        self._abort(1)

    def describe(self) -> str:
        """The line written when the watchdog fires."""
        now, tr = time.perf_counter(), self.tracer
        where = f"step {tr.step}, {self.part}, {tr.phase} phase"
        if tr.microbatch is not None:
            where += f", microbatch {tr.microbatch}"
        call = self.activity.call if self.activity is not None else None
        comm = call.describe(now) if call is not None else "no communication call yet"
        return (f"[rank {self.rank}] watchdog: no progress for {self.idle():.1f} s (limit "
                f"{self.limit:g} s): {where}; {comm}; ending the job (exit 1)")
