"""Pictures and measurements of pipeline schedules, predicted and real.

    python -m mpipar.viz schedule --schedule 1f1b -p 4 -m 8        # a schedule, checked
    python -m mpipar.viz timeline runs/trace.jsonl --text          # a real step, as text
    python -m mpipar.viz timeline runs/trace.jsonl -o pipeline.png # ... and as a picture

``schedule`` prints each rank's compute order (or, with ``--instructions``, every
instruction), the checker's report (simulated bubble against theory, peak microbatches in
flight) and the simulated timeline. ``--split-sendrecv`` first rewrites every ``SendRecv`` as
a blocking send followed by a receive, the version a first attempt usually has, and shows the
checker rejecting it.

``timeline`` reads a ``--trace`` file of ``train.py``. The executor records every forward and
backward as a compute span (``op="compute"``, names ``"forward chunk c"`` and
``"backward chunk c"``, with the step and microbatch); one step's spans are the same kind of
`Timeline` the simulator produces, so the same drawing shows the real step. The measured
bubble of rank r in a step is

    bubble_r = 1 − busy_r / (end − start)

where busy_r is the time rank r spent in forward and backward spans, and [start, end) runs
from the first span of any rank to the last one of any rank in that step. Waiting for a
message counts as idle, as in the theory: (p − 1)/(m + p − 1) for GPipe and 1F1B.

Pictures need matplotlib (``pip install -e '.[viz]'``); it is imported only to draw one.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence

from mpipar.parallel.pipeline.checker import (
    ScheduleError,
    check_schedule,
    theoretical_bubble,
)
from mpipar.parallel.pipeline.instructions import Instruction, Schedule, SendRecv
from mpipar.parallel.pipeline.schedules import SCHEDULE_NAMES, build_schedule, format_schedule
from mpipar.parallel.pipeline.timeline import (
    BACKWARD,
    FORWARD,
    Interval,
    Timeline,
    as_timeline,
    render_text,
)
from mpipar.trace import COMPUTE, TraceRecord, human_bytes, load_jsonl

_SPAN = re.compile(r"^(forward|backward)(?: chunk (\d+))?$")
_KIND = {"forward": FORWARD, "backward": BACKWARD}

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


# ---- pictures -----------------------------------------------------------------------------

_COLORS = {FORWARD: "#4c72b0", BACKWARD: "#dd8452"}


def render_png(timeline: Timeline, path: str, title: str = "",
               labels: Sequence[str] | None = None, xlabel: str = "time") -> None:
    """Draw ``timeline`` to ``path`` (PNG): one row per rank, forward boxes blue and backward
    boxes orange, each with its microbatch (and chunk, when ranks hold several); idle time is
    the white between them. Raises ImportError with a hint if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("drawing a PNG needs matplotlib: pip install -e '.[viz]' "
                          "(or use --text for a drawing in the terminal)") from exc
    n = timeline.num_ranks
    labels = list(labels) if labels is not None else [f"rank {r}" for r in range(n)]
    chunks = any(iv.chunk > 0 for row in timeline.intervals for iv in row)
    fig, ax = plt.subplots(figsize=(12, 0.6 * n + 1.2))
    span = timeline.makespan or 1.0
    for row, intervals in enumerate(timeline.intervals):
        y = n - 1 - row  # rank 0 on top
        for iv in intervals:
            if iv.kind not in _COLORS:
                continue
            ax.broken_barh([(iv.start, iv.end - iv.start)], (y - 0.4, 0.8),
                           facecolors=_COLORS[iv.kind], edgecolor="black", linewidth=0.5,
                           alpha=1.0 if iv.chunk % 2 == 0 else 0.6)
            if (iv.end - iv.start) / span > 0.012:
                text = f"{iv.mb}" + (f".{iv.chunk}" if chunks else "")
                ax.text((iv.start + iv.end) / 2, y, text, ha="center", va="center",
                        fontsize=7, color="white")
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(labels)))
    ax.set_xlim(0, span)
    ax.set_xlabel(xlabel)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, ["forward", "backward"], loc="lower right", bbox_to_anchor=(1.0, 1.0),
              ncol=2, fontsize=8, frameon=False)
    ax.set_title(title or f"bubble {timeline.bubble_fraction():.1%}", loc="left", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scaled(timeline: Timeline, factor: float) -> Timeline:
    """The same timeline with times multiplied by ``factor`` (seconds → milliseconds)."""
    rows = [[Interval(iv.start * factor, iv.end * factor, iv.kind, iv.mb, iv.chunk)
             for iv in row] for row in timeline.intervals]
    return Timeline(rows, timeline.makespan * factor)


# ---- command line ---------------------------------------------------------------------------


def split_sendrecvs(schedule: Schedule) -> Schedule:
    """Every `SendRecv` replaced by its send, then its receive, as two blocking calls.

    A neighbour doing the same sends to us at that moment, so both wait in their send for a
    receive that comes only after it: the checker finds the cycle of waits.
    """
    out: Schedule = []
    for program in schedule:
        flat: list[Instruction] = []
        for instr in program:
            flat += [instr.send, instr.recv] if isinstance(instr, SendRecv) else [instr]
        out.append(flat)
    return out


def cmd_schedule(args: argparse.Namespace) -> int:
    schedule = build_schedule(args.schedule, args.p, args.m, args.v)
    if args.split_sendrecv:
        schedule = split_sendrecvs(schedule)
    print(f"schedule {args.schedule}: p={args.p} ranks, m={args.m} microbatches, "
          f"v={args.v} chunk(s) per rank")
    print(format_schedule(schedule, compute_only=not args.instructions))
    try:
        report = check_schedule(schedule, name=args.schedule, num_microbatches=args.m,
                                num_chunks=args.v)
    except ScheduleError as exc:
        print(f"REJECTED by the checker: {exc}")
        return 1
    print(f"checker: OK — every send meets its receive, no cycle of waits; "
          f"makespan {report.makespan:g} (forward 1, backward 2 per microbatch and rank)")
    print(f"bubble: simulated {report.bubble_fraction:.4f}, theory "
          f"{report.theoretical_bubble:.4f}")
    print("peak microbatches in flight per rank: "
          + " ".join(str(k) for k in report.peak_inflight))
    print(render_text(report.timeline, width=args.width))
    if args.output:
        render_png(report.timeline, args.output, xlabel="time (a forward of all layers = 1)",
                   title=f"{args.schedule}, p={args.p}, m={args.m}, v={args.v}: simulated, "
                         f"bubble {report.bubble_fraction:.1%}")
        print(f"wrote {args.output}")
    return 0


def cmd_timeline(args: argparse.Namespace) -> int:
    records = load_jsonl(args.trace)
    steps = trace_steps(records)
    if not steps:
        print(f"{args.trace}: no forward/backward spans (was it written with --trace?)",
              file=sys.stderr)
        return 2
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        print(f"--step {step}: the trace has steps {steps[0]}..{steps[-1]}", file=sys.stderr)
        return 2
    timeline, ranks = trace_timeline(records, step)
    timeline = _scaled(timeline, 1e3)
    p = len(ranks)
    m = 1 + max(iv.mb for row in timeline.intervals for iv in row)
    v = 1 + max(iv.chunk for row in timeline.intervals for iv in row)
    print(f"{args.trace}: step {step}, {p} ranks, {m} microbatches, {v} chunk(s) per rank, "
          f"makespan {timeline.makespan:.1f} ms")
    if ranks != list(range(p)):
        print("rows are global ranks " + ", ".join(str(r) for r in ranks))
    if args.text or not args.output:
        print(render_text(timeline, width=args.width))
    bubble = bubble_from_records(records)
    print("measured bubble per rank (mean over steps after the first): "
          + ", ".join(f"rank {r} {b:.1%}" for r, b in bubble.items()))
    mean = sum(bubble.values()) / len(bubble)
    line = f"measured bubble, mean over ranks: {mean:.1%}"
    if args.schedule:
        pp = args.pp or p
        line += f"; theory ({args.schedule}, p={pp}, m={m}, v={v}): " \
                f"{theoretical_bubble(args.schedule, pp, m, v):.1%}"
    print(line)
    if args.output:
        labels = [f"rank {r}" for r in ranks]
        render_png(timeline, args.output, labels=labels, xlabel="time (ms)",
                   title=f"{args.trace}: step {step}, measured bubble {mean:.1%}")
        print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mpipar.viz",
                                 description="Pipeline schedules and timelines, as text or PNG.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("schedule", help="print, check and simulate a schedule")
    s.add_argument("--schedule", choices=SCHEDULE_NAMES, default="1f1b")
    s.add_argument("-p", type=int, default=4, help="pipeline ranks")
    s.add_argument("-m", type=int, default=8, help="microbatches")
    s.add_argument("-v", type=int, default=1, help="chunks per rank (interleaved)")
    s.add_argument("--instructions", action="store_true",
                   help="every instruction, numbered, instead of the compute order")
    s.add_argument("--split-sendrecv", action="store_true",
                   help="replace each SendRecv by a blocking send then a receive")
    s.add_argument("--width", type=int, default=100, help="columns of the text timeline")
    s.add_argument("-o", "--output", help="also draw the simulated timeline to this PNG")
    s.set_defaults(run=cmd_schedule)
    t = sub.add_parser("timeline", help="draw a measured step from a train.py --trace file")
    t.add_argument("trace", help="JSON-lines trace written by train.py --trace")
    t.add_argument("-o", "--output", help="PNG to write")
    t.add_argument("--text", action="store_true", help="draw in the terminal (default "
                                                       "when no -o is given)")
    t.add_argument("--step", type=int, help="which step (default: the last)")
    t.add_argument("--width", type=int, default=100, help="columns of the text timeline")
    t.add_argument("--schedule", choices=SCHEDULE_NAMES,
                   help="print the theoretical bubble of this schedule next to the measured")
    t.add_argument("--pp", type=int, help="pipeline size for the theory (default: the number "
                                          "of ranks in the trace)")
    t.set_defaults(run=cmd_timeline)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, ImportError) as exc:
        print(f"python -m mpipar.viz: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
