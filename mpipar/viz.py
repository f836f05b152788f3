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
import sys
from collections.abc import Sequence

from mpipar.parallel.pipeline.checker import (
    ScheduleError,
    check_schedule,
    theoretical_bubble,
)
from mpipar.parallel.pipeline.instructions import Instruction, Schedule, SendRecv
from mpipar.parallel.pipeline.measure import bubble_from_records, trace_steps, trace_timeline
from mpipar.parallel.pipeline.schedules import SCHEDULE_NAMES, build_schedule, format_schedule
from mpipar.parallel.pipeline.timeline import (
    BACKWARD,
    FORWARD,
    Interval,
    Timeline,
    render_text,
)
from mpipar.trace import load_jsonl

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
