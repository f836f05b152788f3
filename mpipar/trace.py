"""Communication and compute tracing: who sent how many bytes to whom, when, and why.

Every call that moves data between ranks goes through :class:`mpipar.comm.Comm`, and every
such call can leave one :class:`TraceRecord` in the rank's :class:`Tracer`. A record says what
happened (op, group, peer, bytes, dtype, shape), when (``start``/``end`` from
``time.perf_counter``) and in which part of training (``phase``, ``step``, ``microbatch``),
which the training loop sets with :meth:`Tracer.context`. Compute is recorded too, as
``op="compute"`` spans, so a pipeline timeline can draw forward/backward boxes next to the
sends and receives and the idle gaps between them (the pipeline *bubble*) can be measured.

From the records we derive

* :meth:`Tracer.totals` (:func:`comm_totals`) and :func:`format_summary_table`: calls,
  bytes and seconds per (op, group), the table printed at the end of a run. The seconds are
  split in two: **exposed**, the time the rank was held up (a blocking call's whole
  duration, a non-blocking call's ``wait``), and **overlapped**, the rest of a non-blocking
  call's launch-to-completion span, hidden behind compute;
* :func:`to_chrome_trace`: a Chrome/Perfetto ``traceEvents`` file (open it at
  ``ui.perfetto.dev`` or ``chrome://tracing``): one process per rank, one thread per kind of
  activity;
* :func:`write_jsonl` / :func:`load_jsonl`: the ``--trace FILE`` format, one record per line;
* :func:`grouped_totals`: the same sums grouped by any of op, group, phase, rank and step,
  which ``python -m mpipar.trace summary FILE --by op,group,phase`` prints for a trace file.

Tracing is off by default and then costs a single attribute check per call: ``Comm`` looks at
``tracer.enabled`` before it even reads the clock.

This module imports no MPI; records are plain dataclasses, so they can be pickled, gathered to
one rank and written there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PHASES = ("forward", "backward", "optimizer", "other")
COMPUTE = "compute"  # the ``op`` of a compute span; every other op is communication


@dataclass
class TraceRecord:
    """One communication call (or compute span) on one rank.

    ``peer`` is the *global* rank on the other end of a point-to-point call (for ``sendrecv``,
    the rank sent to) and ``None`` for collectives. ``nbytes`` is the size of the buffer this
    rank handed to the call as input, its contribution, not the traffic of whatever algorithm
    MPI chose underneath. ``start``/``end`` are ``time.perf_counter()`` seconds; on one machine
    that clock is shared by all processes, so records of different ranks line up.
    ``waited`` is, for a non-blocking call, the seconds this rank spent blocked waiting for it
    to complete, and ``None`` for a blocking call, which blocks for its whole duration.
    """

    rank: int
    op: str
    group: str
    peer: int | None
    nbytes: int
    dtype: str
    shape: tuple
    phase: str
    step: int
    microbatch: int | None
    start: float
    end: float
    name: str = ""
    waited: float | None = None

    @property
    def duration(self) -> float:
        """Seconds between start and end (for a non-blocking call: launch to wait)."""
        return self.end - self.start

    @property
    def exposed(self) -> float:
        """Seconds the call held this rank up: all of a blocking call, a request's wait."""
        return self.duration if self.waited is None else self.waited


class Tracer:
    """Collects :class:`TraceRecord` s for one rank.

    The training loop keeps ``step``, ``phase`` and ``microbatch`` current (directly or with
    :meth:`context`), and every record copies them, so a record knows it was, say, the
    tensor-parallel all-reduce in the backward pass of microbatch 3 of step 10.
    """

    def __init__(self, rank: int, enabled: bool = False) -> None:
        self.rank = rank
        self.enabled = enabled
        self.step = 0
        self.phase = "other"
        self.microbatch: int | None = None
        self.records: list[TraceRecord] = []

    @contextlib.contextmanager
    def context(
        self,
        phase: str | None = None,
        microbatch: int | None = None,
        step: int | None = None,
    ) -> Iterator[Tracer]:
        """Set phase/microbatch/step (those given) for the ``with`` body, then restore them."""
        if phase is not None and phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        saved = (self.phase, self.microbatch, self.step)
        if phase is not None:
            self.phase = phase
        if microbatch is not None:
            self.microbatch = microbatch
        if step is not None:
            self.step = step
        try:
            yield self
        finally:
            self.phase, self.microbatch, self.step = saved

    def record(
        self,
        op: str,
        group: str,
        peer: int | None,
        nbytes: int,
        dtype: str,
        shape: tuple,
        start: float,
        end: float,
        *,
        name: str = "",
        phase: str | None = None,
        step: int | None = None,
        microbatch: int | None = None,
        waited: float | None = None,
    ) -> None:
        """Append a record stamped with the current phase/step/microbatch (if enabled).

        A non-blocking call is recorded when it is waited on, possibly in another phase, so
        it passes the ``phase``/``step``/``microbatch`` captured at launch explicitly, and
        the seconds it blocked in its wait as ``waited``.
        """
        if not self.enabled:
            return
        self.records.append(
            TraceRecord(
                rank=self.rank,
                op=op,
                group=group,
                peer=peer,
                nbytes=int(nbytes),
                dtype=str(dtype),
                shape=tuple(shape),
                phase=self.phase if phase is None else phase,
                step=self.step if step is None else step,
                microbatch=self.microbatch if microbatch is None else microbatch,
                start=start,
                end=end,
                name=name,
                waited=waited,
            )
        )

    def span(
        self, name: str, phase: str | None = None, microbatch: int | None = None
    ) -> contextlib.AbstractContextManager:
        """Time the ``with`` body as a compute record (``op="compute"``, ``name=name``).

        Inside the body phase/microbatch are set as by :meth:`context`, so communication
        issued there (a tensor-parallel all-reduce inside a forward) is labelled alike.
        Disabled, this is a no-op context manager.
        """
        if not self.enabled:
            return contextlib.nullcontext()
        return self._span(name, phase, microbatch)

    @contextlib.contextmanager
    def _span(self, name: str, phase: str | None, microbatch: int | None) -> Iterator[None]:
        with self.context(phase=phase, microbatch=microbatch):
            start = time.perf_counter()
            try:
                yield
            finally:
                self.record(COMPUTE, "", None, 0, "", (), start, time.perf_counter(), name=name)

    def totals(self) -> dict[tuple[str, str], dict[str, float]]:
        """``{(op, group): {"calls", "bytes", "time", "exposed"}}`` over communication
        records."""
        return comm_totals(self.records)

    def write_jsonl(self, path: str, records: Iterable[TraceRecord] | None = None) -> None:
        """Write ``records`` (default: this tracer's) to ``path``, one JSON object a line."""
        write_jsonl(path, self.records if records is None else records)

    def clear(self) -> None:
        """Forget all records (e.g. after warm-up steps)."""
        self.records.clear()


def comm_totals(records: Iterable[TraceRecord]) -> dict[tuple[str, str], dict[str, float]]:
    """Sum calls, bytes and seconds per (op, group) over communication records.

    ``time`` adds up each call's launch-to-completion span, ``exposed`` only what held the
    rank up (:attr:`TraceRecord.exposed`); ``time − exposed`` was overlapped with compute.
    Compute spans are left out: this is the communication bill. Keys come out sorted.
    """
    return grouped_totals(records, ("op", "group"))


def _add(row: dict[str, float], r: TraceRecord) -> None:
    row["calls"] += 1
    row["bytes"] += r.nbytes
    row["time"] += r.duration
    row["exposed"] += r.exposed


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.50 KiB'`` (binary prefixes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_summary_table(
    totals: dict[tuple[str, str], dict[str, float]], total_time_s: float
) -> str:
    """A fixed-width table: one row per (op, group) with calls, bytes, exposed and overlapped
    seconds, and share.

    ``exposed s`` is the time the calls held the rank up (blocking calls whole, non-blocking
    ones while waited on), ``overlapped s`` the rest of the non-blocking calls' spans, hidden
    behind compute. ``share`` is the exposed time as a fraction of ``total_time_s`` (the wall
    time of the run), so it answers "how much of the run was spent waiting in this kind of
    call", and the shares add up to at most 100%. Blocking-call time includes waiting for
    slower peers, which is often the larger part.
    """
    header = (f"{'op':<16}{'group':<8}{'calls':>9}{'bytes':>14}{'exposed s':>11}"
              f"{'overlapped s':>14}{'share':>9}")
    lines = [header, "-" * len(header)]
    total = {"calls": 0, "bytes": 0, "time": 0.0, "exposed": 0.0}
    for (op, group), row in totals.items():
        lines.append(f"{op:<16}{group:<8}" + _summary_numbers(row, total_time_s))
        for field in total:
            total[field] += row[field]
    lines.append("-" * len(header))
    lines.append(f"{'total':<24}" + _summary_numbers(total, total_time_s))
    return "\n".join(lines)


def _summary_numbers(row: dict[str, float], total_time_s: float) -> str:
    share = row["exposed"] / total_time_s if total_time_s > 0 else 0.0
    return (f"{int(row['calls']):>9}{human_bytes(row['bytes']):>14}{row['exposed']:>11.4f}"
            f"{row['time'] - row['exposed']:>14.4f}{share:>9.1%}")


def _kind(r: TraceRecord) -> str:
    """The Chrome-trace thread a record is drawn on: compute, p2p or collective."""
    if r.op == COMPUTE:
        return "compute"
    return "p2p" if r.peer is not None else "collective"


_TIDS = {"compute": 0, "p2p": 1, "collective": 2}


def to_chrome_trace(records: Iterable[TraceRecord]) -> dict:
    """Convert records to the Chrome/Perfetto JSON object format.

    Each record becomes a complete event (``"ph": "X"``) with ``pid`` = rank and ``tid`` by
    kind (0 compute, 1 point-to-point, 2 collective), ``ts``/``dur`` in microseconds measured
    from the earliest record, and every field in ``args``. Metadata events name the processes
    ("rank R") and threads, so the viewer shows one labelled swim-lane per rank and kind.
    """
    records = list(records)
    t0 = min((r.start for r in records), default=0.0)
    events: list[dict] = []
    for rank in sorted({r.rank for r in records}):
        events.append(
            {"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}
        )
        for kind, tid in _TIDS.items():
            events.append(
                {"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                 "args": {"name": kind}}
            )
    for r in records:
        label = r.name or r.op
        if r.op != COMPUTE and r.group:
            label = f"{label} [{r.group}]"
        if r.microbatch is not None:
            label = f"{label} mb{r.microbatch}"
        events.append(
            {
                "name": label,
                "cat": r.phase,
                "ph": "X",
                "pid": r.rank,
                "tid": _TIDS[_kind(r)],
                "ts": (r.start - t0) * 1e6,
                "dur": max(r.end - r.start, 0.0) * 1e6,
                "args": _as_json(r),
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _as_json(r: TraceRecord) -> dict:
    d = dataclasses.asdict(r)
    d["shape"] = list(r.shape)
    return d


def write_jsonl(path: str, records: Iterable[TraceRecord]) -> None:
    """Write records to ``path`` as JSON lines (the ``--trace FILE`` format)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_as_json(r)) + "\n")


def load_jsonl(path: str) -> list[TraceRecord]:
    """Read records written by :func:`write_jsonl` (blank lines are skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                d["shape"] = tuple(d["shape"])
                out.append(TraceRecord(**d))
    return out


# ---- the command line: python -m mpipar.trace summary FILE ---------------------------------

SUMMARY_FIELDS = ("op", "group", "phase", "rank", "step")  # what ``--by`` can group on


def _sort_key(fields: tuple[str, ...], key: tuple) -> tuple:
    """Order rows field by field: phases in training order, everything else ascending."""
    return tuple(
        (PHASES.index(value) if value in PHASES else len(PHASES), value)
        if field == "phase" else (0, value)
        for field, value in zip(fields, key, strict=True)
    )


def grouped_totals(
    records: Iterable[TraceRecord], by: tuple[str, ...] = ("op", "group"),
    step: int | None = None,
) -> dict[tuple, dict[str, float]]:
    """Sum calls, bytes and seconds of communication records per value of the fields ``by``.

    ``by`` names fields of :class:`TraceRecord` among :data:`SUMMARY_FIELDS`; the keys of the
    result are tuples of their values, in that order, and come out sorted (phases in the order
    forward, backward, optimizer, other). With ``step`` only that step's records count.
    Each row holds ``calls``, ``bytes``, ``time`` and ``exposed`` (see :func:`comm_totals`).
    Compute spans are left out.
    """
    unknown = [f for f in by if f not in SUMMARY_FIELDS]
    if unknown or not by:
        raise ValueError(f"cannot group by {unknown or 'nothing'}; choose from "
                         f"{', '.join(SUMMARY_FIELDS)}")
    acc: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r.op == COMPUTE or (step is not None and r.step != step):
            continue
        row = acc.setdefault(tuple(getattr(r, f) for f in by),
                             {"calls": 0, "bytes": 0, "time": 0.0, "exposed": 0.0})
        _add(row, r)
    return dict(sorted(acc.items(), key=lambda item: _sort_key(by, item[0])))


def format_grouped_table(totals: dict[tuple, dict[str, float]], by: tuple[str, ...]) -> str:
    """One row per key of :func:`grouped_totals`: calls, bytes (binary units and exact), time.

    The key columns are as wide as their longest value, so the table stays aligned whatever
    the names; a last row gives the totals.
    """
    widths = [max([len(f)] + [len(str(k[i])) for k in totals]) + 2 for i, f in enumerate(by)]
    keys_width = sum(widths)
    header = ("".join(f"{f:<{w}}" for f, w in zip(by, widths, strict=True))
              + f"{'calls':>8}{'bytes':>13}{'exact bytes':>16}{'time s':>11}")
    lines = [header, "-" * len(header)]
    for key, row in totals.items():
        lines.append("".join(f"{str(v):<{w}}" for v, w in zip(key, widths, strict=True))
                     + _numbers(row["calls"], row["bytes"], row["time"]))
    lines.append("-" * len(header))
    lines.append(f"{'total':<{keys_width}}" + _numbers(
        sum(r["calls"] for r in totals.values()), sum(r["bytes"] for r in totals.values()),
        sum(r["time"] for r in totals.values())))
    return "\n".join(lines)


def _numbers(calls: float, nbytes: float, seconds: float) -> str:
    return f"{int(calls):>8}{human_bytes(nbytes):>13}{int(nbytes):>16,}{seconds:>11.4f}"


def _fields(text: str) -> tuple[str, ...]:
    """``--by`` value ``"op,group"`` → ``("op", "group")``, checked (argparse type)."""
    by = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in by if f not in SUMMARY_FIELDS]
    if bad or not by or len(set(by)) != len(by):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give distinct fields, comma-separated, from "
            f"{','.join(SUMMARY_FIELDS)}")
    return by


def build_parser() -> argparse.ArgumentParser:
    """``python -m mpipar.trace summary FILE [--by FIELDS] [--step N]``."""
    ap = argparse.ArgumentParser(prog="python -m mpipar.trace",
                                 description="Read a trace written by train.py --trace.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "summary", help="calls, bytes and time of the communication, grouped",
        description="Print the communication calls of a train.py --trace FILE (JSON lines, "
                    "all ranks) as a table of calls, bytes and seconds, summed over the "
                    "records of each group. Compute spans are left out.")
    s.add_argument("file", metavar="FILE", help="JSON-lines trace written by train.py --trace")
    s.add_argument("--by", type=_fields, default=("op", "group"), metavar="FIELDS",
                   help="comma-separated fields to group on, from "
                        f"{','.join(SUMMARY_FIELDS)} (default: op,group)")
    s.add_argument("--step", type=int, metavar="N",
                   help="only the records of training step N (default: every step)")
    return ap


def summary_command(path: str, by: tuple[str, ...], step: int | None) -> int:
    """Print the table for ``path``; 2 (with a message) when the file or the step is bad."""
    records = load_jsonl(path)
    steps = sorted({r.step for r in records})
    if step is not None and step not in steps:
        listed = (f"steps {steps[0]}..{steps[-1]}" if len(steps) > 1
                  else f"only step {steps[0]}" if steps else "no records")
        print(f"python -m mpipar.trace: error: --step {step}: {path} has {listed}",
              file=sys.stderr)
        return 2
    totals = grouped_totals(records, by, step)
    ranks = len({r.rank for r in records})
    where = f"step {step}" if step is not None else "all steps"
    print(f"{path}, {where}: communication by {', '.join(by)}, summed over {ranks} rank(s)")
    print(format_grouped_table(totals, by) if totals else "no communication calls")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = summary_command(args.file, args.by, args.step)
        sys.stdout.flush()  # here, so that a closed pipe (``| head``) is caught below
    except BrokenPipeError:
        # The reader has gone: stop quietly, and keep Python's final flush from failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"python -m mpipar.trace: error: {_path_error(args.file, exc)}", file=sys.stderr)
        return 2
    return code


def _path_error(path: str, exc: BaseException) -> str:
    """One line for a trace file that cannot be read or is not a trace."""
    if isinstance(exc, OSError):
        return f"cannot read {path}: {exc.strerror or exc}"
    return f"{path} is not a trace written by train.py --trace ({type(exc).__name__}: {exc})"


if __name__ == "__main__":
    sys.exit(main())
