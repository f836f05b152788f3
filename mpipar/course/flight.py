"""A flight recorder for graded MPI code: every rank's communication calls, on disk as they happen.

``train.py --trace`` gathers its records at the end of a run, so a job that hangs and is
killed leaves none. A student whose ring deadlocks needs exactly the records of that job:
which call each rank was in when it stopped. So the grading scripts call :func:`install`,
which wraps the public data calls of :class:`mpipar.comm.Comm` (in the graded process only;
mpipar's own code is unchanged) to append two JSON lines per call to
``$MPIPAR_COURSE_FLIGHT/rank<R>.jsonl``, flushed at once:

    {"event": "start", "seq": 7, "op": "send", "group": "world", "peer": 1, "nbytes": 4000000,
     "caller": "ring_reduce_scatter", "phase": "other", "step": 0, "t": 1234.5}
    {"event": "end", "seq": 7, "t": 1234.6}

A call with a start and no end is where that rank is stuck. :func:`rank_tails` reads a
launch's files back into one line per rank::

    rank 0: stuck in send to rank 1 (4,000,000 B, world) from ring_reduce_scatter, 5.0 s
    rank 1: stuck in send to rank 0 (4,000,000 B, world) from ring_reduce_scatter, 5.0 s

Non-blocking calls (``iallreduce``, ``isend``, ``irecv``) are recorded as launched; their
completion happens inside waits that do not show here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ENV = "MPIPAR_COURSE_FLIGHT"  # this launch's directory, one file per rank
TIMEOUT_MARK = "TIMEOUT"  # written into a launch directory whose job was killed
BLOCKING = ("allreduce", "reduce_scatter", "allgather", "broadcast", "barrier", "send", "recv",
            "sendrecv")
LAUNCHING = ("iallreduce", "isend", "irecv")


class _Recorder:
    """Appends start/end lines for one rank; every line is flushed before the call proceeds."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8", buffering=1)  # open for the process's life
        self.seq = 0
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def start(self, comm: Any, op: str, peer: int | None, buf: Any, caller: str) -> int:
        self.seq += 1
        peer_global = None if peer is None else comm.members[peer]
        self.write({"event": "start", "seq": self.seq, "op": op, "group": comm.group,
                    "peer": peer_global, "nbytes": int(getattr(buf, "nbytes", 0)),
                    "caller": caller, "phase": comm.tracer.phase, "step": comm.tracer.step,
                    "t": time.time()})
        return self.seq

    def end(self, seq: int) -> None:
        self.write({"event": "end", "seq": seq, "t": time.time()})


def _peer_of(op: str, args: tuple, kwargs: dict) -> int | None:
    """The group rank a point-to-point call talks to (the destination for a sendrecv)."""
    if op in ("send", "isend", "sendrecv"):
        return kwargs.get("dest", args[1] if len(args) > 1 else None)
    if op in ("recv", "irecv"):
        return kwargs.get("source", args[1] if len(args) > 1 else None)
    return None


def _wrap(method: Callable, op: str, recorder: _Recorder, blocking: bool) -> Callable:
    @functools.wraps(method)
    def recorded(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_name
        buf = args[0] if args else kwargs.get("buf", kwargs.get("send", kwargs.get("sendbuf")))
        seq = recorder.start(self, op, _peer_of(op, args, kwargs), buf, caller)
        result = method(self, *args, **kwargs)
        if blocking:
            recorder.end(seq)
        return result

    return recorded


def install() -> bool:
    """Record this process's calls if ``$MPIPAR_COURSE_FLIGHT`` names a directory.

    Returns whether recording is on. Call it once, before any communication.
    """
    from mpipar.comm import Comm, world_size_and_rank

    folder = os.environ.get(ENV)
    if not folder:
        return False
    rank = world_size_and_rank()[1]
    recorder = _Recorder(Path(folder) / f"rank{rank}.jsonl")
    for op in BLOCKING + LAUNCHING:
        if hasattr(Comm, op):
            setattr(Comm, op, _wrap(getattr(Comm, op), op, recorder, op in BLOCKING))
    return True


# ---- reading a launch back ---------------------------------------------------------------------


def _describe(call: dict[str, Any]) -> str:
    """"send to rank 1 (4,000,000 B, world) from ring_reduce_scatter"."""
    peer = ""
    if call.get("peer") is not None:
        peer = f" {'from' if call['op'] in ('recv', 'irecv') else 'to'} rank {call['peer']}"
    return (f"{call['op']}{peer} ({call['nbytes']:,} B, {call['group']}) "
            f"from {call['caller']}")


def _rank_calls(path: Path) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """(completed calls in order, calls started and not ended by seq) of one rank's file."""
    started: dict[int, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed process may be cut short
            continue
        if rec["event"] == "start":
            started[rec["seq"]] = rec
        elif rec["seq"] in started:
            call = started.pop(rec["seq"])
            if call["op"] in BLOCKING:
                done.append(call)
    return done, started


def rank_tails(launch: Path, now: float | None = None) -> list[str]:
    """One line per rank of the launch in ``launch``: where it is stuck, or what it did last.

    A call still open is reported with how long it had waited when the job was killed (the
    time of the launch's timeout mark), or until ``now``.
    """
    mark = launch / TIMEOUT_MARK
    if now is None:
        now = mark.stat().st_mtime if mark.is_file() else time.time()
    lines = []
    files = sorted(launch.glob("rank*.jsonl"), key=lambda p: int(p.stem[4:]))
    for path in files:
        done, pending = _rank_calls(path)
        stuck = [c for c in pending.values() if c["op"] in BLOCKING]
        last = f"; before it: {_describe(done[-1])}" if done else ""
        if stuck:
            call = stuck[-1]
            lines.append(f"{path.stem.replace('rank', 'rank ')}: stuck in {_describe(call)}, "
                         f"for {now - call['t']:.1f} s{last}")
        elif done:
            lines.append(f"{path.stem.replace('rank', 'rank ')}: not in a call; last: "
                         f"{_describe(done[-1])} ({len(done)} calls)")
        else:
            lines.append(f"{path.stem.replace('rank', 'rank ')}: no communication recorded")
    return lines


def latest_launch(root: Path) -> Path | None:
    """The most recently started launch directory under ``root`` (None if there is none)."""
    launches = [p for p in root.glob("*") if p.is_dir()] if root.is_dir() else []
    return max(launches, key=lambda p: p.stat().st_mtime_ns, default=None)


def timed_out_launches(root: Path) -> list[Path]:
    """Launch directories under ``root`` whose job a launcher killed on its timeout."""
    return sorted(p.parent for p in root.glob(f"*/{TIMEOUT_MARK}"))


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Rank side: if the body has not finished after ``seconds``, rank 0 prints every rank's
    tail (from the shared launch directory) and the processes end with exit code 3.

    For a check that is expected to hang on a broken tree (a deadlock above MPI's eager
    limit): the job ends in seconds instead of running into the launcher's timeout, and
    the output says where each rank was.
    """
    done = threading.Event()

    from mpipar.comm import world_size_and_rank

    rank = world_size_and_rank()[1]

    def watch() -> None:
        if done.wait(seconds):
            return
        if rank != 0:  # let rank 0 speak for all; the launcher ends the rest when it exits
            time.sleep(2.0)
            os._exit(3)
        folder = os.environ.get(ENV)
        tails = rank_tails(Path(folder)) if folder else ["(no flight recorder)"]
        print(f"HANG: {what} did not finish within {seconds:g} s\n" + "\n".join(tails),
              flush=True)
        os._exit(3)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
