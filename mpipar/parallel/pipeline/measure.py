"""Measuring a pipeline from its trace: compute spans → timelines, bubbles, the run report.

The executor records every forward and backward as a compute span (``op="compute"``) named by
:func:`span_name` (``"forward chunk c"``, ``"backward chunk c"``, and for a split backward's W
``"weight chunk c"``) with its step and microbatch;
:func:`compute_interval` parses that name back, so the writer and the reader of the name live
here together. One step's spans are the same kind of `Timeline` the simulator produces, so the
same drawing shows the real step. The measured bubble of rank r in a step is

    bubble_r = 1 − busy_r / (end − start)

where busy_r is the time rank r spent in forward, backward and W spans, and [start, end) runs
from the first span of any rank to the last one of any rank in that step. Waiting for a
message counts as idle, as in the theory: (p − 1)/(m + p − 1) for GPipe and 1F1B.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from mpipar.trace import COMPUTE, TraceRecord, human_bytes

from .checker import simulate, theoretical_bubble
from .schedules import build_schedule
from .timeline import BACKWARD, FORWARD, WEIGHT, Interval, Timeline, as_timeline


def span_name(kind: str, chunk: int) -> str:
    """Name of a compute span in the trace, e.g. ``"forward chunk 1"`` (parsed below)."""
    return f"{kind} chunk {chunk}"


_SPAN = re.compile(r"^(forward|backward|weight)(?: chunk (\d+))?$")
_KIND = {"forward": FORWARD, "backward": BACKWARD, "weight": WEIGHT}

# (start, end, busy) of one rank's forward and backward spans in one step
Extent = tuple[float, float, float]


# ---- from trace records to timelines and bubbles ------------------------------------------


def compute_interval(record: TraceRecord) -> Interval | None:
    """The forward/backward `Interval` a compute span stands for, or None for anything else
    (communication, evaluation forwards, optimizer)."""
    if record.op != COMPUTE:
        return None
    match = _SPAN.match(record.name)
    if match is None:
        return None
    chunk = int(match.group(2)) if match.group(2) is not None else 0
    mb = record.microbatch if record.microbatch is not None else 0
    return Interval(record.start, record.end, _KIND[match.group(1)], mb, chunk)


def trace_steps(records: Iterable[TraceRecord]) -> list[int]:
    """Steps that have at least one forward or backward span, in order."""
    return sorted({r.step for r in records if compute_interval(r) is not None})


def trace_timeline(records: Iterable[TraceRecord], step: int,
                   ranks: Sequence[int] | None = None) -> tuple[Timeline, list[int]]:
    """The measured timeline of ``step``: one row per rank (``ranks``, default every rank that
    computed), times from the step's first span. Returns it with the global rank of each row.
    """
    rows: dict[int, list[Interval]] = {}
    for r in records:
        iv = compute_interval(r) if r.step == step else None
        if iv is not None:
            rows.setdefault(r.rank, []).append(iv)
    order = sorted(rows) if ranks is None else list(ranks)
    missing = [r for r in order if r not in rows]
    if missing or not order:
        raise ValueError(f"step {step} has no forward/backward spans for ranks "
                         f"{missing or order}")
    return as_timeline([sorted(rows[r]) for r in order]), order


def step_extents(records: Iterable[TraceRecord]) -> dict[int, Extent]:
    """Per step, (first start, last end, busy seconds) of one rank's forward/backward spans."""
    out: dict[int, Extent] = {}
    for r in records:
        iv = compute_interval(r)
        if iv is None:
            continue
        start, end, busy = out.get(r.step, (iv.start, iv.end, 0.0))
        out[r.step] = (min(start, iv.start), max(end, iv.end), busy + iv.end - iv.start)
    return out


def measured_bubble(extents: dict[int, dict[int, Extent]],
                    steps: Iterable[int] | None = None) -> dict[int, float]:
    """Mean over steps of each rank's idle share, 1 − busy_r/(end − start) (module docstring).

    ``extents[rank][step]`` comes from `step_extents` of that rank's records. ``steps``
    defaults to every step all ranks computed in except the first, a warm-up in which memory
    is allocated, unless it is the only one.
    """
    common = set.intersection(*(set(e) for e in extents.values())) if extents else set()
    if steps is None:
        ordered = sorted(common)
        steps = ordered[1:] if len(ordered) > 1 else ordered
    steps = sorted(steps)
    if not steps:
        raise ValueError("no step in which every rank ran forward/backward spans")
    bubble = dict.fromkeys(extents, 0.0)
    for s in steps:
        start = min(extents[r][s][0] for r in extents)
        end = max(extents[r][s][1] for r in extents)
        span = end - start
        for r in extents:
            bubble[r] += (1.0 - extents[r][s][2] / span) / len(steps) if span > 0 else 0.0
    return bubble


def bubble_from_records(records: Sequence[TraceRecord],
                        steps: Iterable[int] | None = None) -> dict[int, float]:
    """`measured_bubble` of a merged trace (all ranks' records together)."""
    by_rank: dict[int, list[TraceRecord]] = {}
    for r in records:
        by_rank.setdefault(r.rank, []).append(r)
    extents = {rank: step_extents(recs) for rank, recs in sorted(by_rank.items())}
    return measured_bubble({r: e for r, e in extents.items() if e}, steps)


def mean_durations(records: Iterable[TraceRecord],
                   steps: Iterable[int] | None = None) -> dict[str, float]:
    """Mean seconds of one forward, backward (or B) and W span, over every rank's spans of
    ``steps`` (default: every step but the first, unless it is the only one). Kinds with no
    span are left out (W, for a schedule without a split backward)."""
    intervals = [(r.step, iv) for r in records if (iv := compute_interval(r)) is not None]
    if steps is None:
        ordered = sorted({step for step, _ in intervals})
        steps = ordered[1:] if len(ordered) > 1 else ordered
    wanted = set(steps)
    sums: dict[str, list[float]] = {}
    for step, iv in intervals:
        if step in wanted:
            total = sums.setdefault(iv.kind, [0.0, 0.0])
            total[0] += iv.end - iv.start
            total[1] += 1
    return {kind: t / n for kind, (t, n) in sums.items()}


def simulated_bubble(schedule: str, p: int, m: int, v: int, durations: dict[str, float]) -> float:
    """The bubble the checker's simulation predicts for ``schedule`` when every F, B and W
    takes its measured mean time (`mean_durations`), messages none: what the schedule alone
    explains, against which the measured bubble shows the cost of everything else."""
    forward = durations.get(FORWARD, 0.0)
    weight = durations.get(WEIGHT, 0.0)
    backward = durations.get(BACKWARD, 0.0) + weight
    timeline = simulate(build_schedule(schedule, p, m, v), forward_time=forward * v,
                        backward_time=backward * v, weight_time=weight * v, num_chunks=v)
    return timeline.bubble_fraction()


def pipeline_report(per_rank: Sequence[tuple[dict[int, Extent], dict[str, int]]],
                    schedule: str, p: int, m: int, v: int) -> dict:
    """What a pipelined run measured, for ``train.py``'s summary.

    ``per_rank[g]`` is global rank g's (`step_extents` of its records, its executor's
    ``memory_summary()``). Returns JSON-ready fields: the theoretical bubble, the measured one
    per rank and its mean (None without a training step), and per rank the peak activation
    bytes stashed, the peak microbatches in flight and what the checker predicted for them.
    """
    extents = {g: e for g, (e, _) in enumerate(per_rank) if e}
    bubble = measured_bubble(extents) if extents else {}
    measured = [bubble.get(g) for g in range(len(per_rank))]
    known = [b for b in measured if b is not None]
    return {
        "schedule": schedule, "pp": p, "microbatches": m, "virtual_stages": v,
        "bubble_theory": theoretical_bubble(schedule, p, m, v),
        "bubble_measured": measured,
        "bubble_measured_mean": sum(known) / len(known) if known else None,
        "peak_stash_bytes": [mem["peak_stash_bytes"] for _, mem in per_rank],
        "peak_inflight": [mem["peak_inflight"] for _, mem in per_rank],
        "predicted_inflight": [mem["predicted_inflight"] for _, mem in per_rank],
    }


def format_pipeline_report(report: dict) -> str:
    """Two lines: measured against theoretical bubble, and stashed activations per rank."""
    head = (f"pipeline {report['schedule']} (p={report['pp']}, m={report['microbatches']}, "
            f"v={report['virtual_stages']}): bubble theory {report['bubble_theory']:.1%}")
    if report["bubble_measured_mean"] is not None:
        head += (f", measured {report['bubble_measured_mean']:.1%} (per rank "
                 + " ".join(f"{b:.1%}" for b in report["bubble_measured"] if b is not None)
                 + ")")
    mem = ", ".join(f"{human_bytes(b)} ({k} in flight)" for b, k in
                    zip(report["peak_stash_bytes"], report["peak_inflight"], strict=True))
    return head + "\npeak stashed activations per rank: " + mem
