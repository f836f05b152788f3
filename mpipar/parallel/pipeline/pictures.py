"""Pictures of pipeline schedules, predicted and real, and the ``python -m mpipar.viz``
commands that print and draw them (`cmd_schedule`, `cmd_timeline`).

``schedule`` prints each rank's compute order (or, with ``--instructions``, every
instruction), the checker's report (simulated bubble against theory, peak microbatches in
flight) and the simulated timeline. ``--split-sendrecv`` first rewrites every ``SendRecv`` as
a blocking send followed by a receive, the version a first attempt usually has, and shows the
checker rejecting it.

``timeline`` reads a ``--trace`` file of ``train.py``: the executor's forward and backward
compute spans of one step are the same kind of `Timeline` the simulator produces (see
`measure`), so the same drawing shows the real step, next to the bubble measured per rank.

Text drawings come from `timeline.render_text`; PNGs (`render_png`) need matplotlib
(``pip install -e '.[viz]'``), imported only to draw one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mpipar.trace import load_jsonl

from .checker import ScheduleError, check_schedule, theoretical_bubble
from .instructions import Instruction, Schedule, SendRecv
from .measure import (
    bubble_from_records,
    mean_durations,
    simulated_bubble,
    trace_steps,
    trace_timeline,
)
from .schedules import build_schedule, format_schedule
from .timeline import BACKWARD, FORWARD, WEIGHT, Interval, Timeline, render_text

_COLORS = {FORWARD: "#4c72b0", BACKWARD: "#dd8452", WEIGHT: "#55a868"}
_LEGEND = {FORWARD: "forward", BACKWARD: "backward (B)", WEIGHT: "W (weight gradients)"}


def render_png(timeline: Timeline, path: str, title: str = "",
               labels: Sequence[str] | None = None, xlabel: str = "time") -> None:
    """Draw ``timeline`` to ``path`` (PNG): one row per rank, forward boxes blue, backward
    (or B) boxes orange and W boxes green, each with its microbatch (and chunk, when ranks
    hold several); idle time is the white between them. Raises ImportError with a hint if
    matplotlib is missing."""
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
    kinds = [k for k in _COLORS if any(iv.kind == k for row in timeline.intervals for iv in row)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS[k]) for k in kinds]
    ax.legend(handles, [_LEGEND[k] for k in kinds], loc="lower right",
              bbox_to_anchor=(1.0, 1.0), ncol=len(kinds), fontsize=8, frameon=False)
    ax.set_title(title or f"bubble {timeline.bubble_fraction():.1%}", loc="left", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scaled(timeline: Timeline, factor: float) -> Timeline:
    """The same timeline with times multiplied by ``factor`` (seconds → milliseconds)."""
    rows = [[Interval(iv.start * factor, iv.end * factor, iv.kind, iv.mb, iv.chunk)
             for iv in row] for row in timeline.intervals]
    return Timeline(rows, timeline.makespan * factor)


# ---- the commands of ``python -m mpipar.viz`` ---------------------------------------------


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
    """``schedule``: print, check and simulate a schedule (and draw it with ``-o``)."""
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
    split = " = B 1 + W 1" if args.schedule == "zb-h1" else ""
    print(f"checker: OK — every send meets its receive, no cycle of waits; "
          f"makespan {report.makespan:g} (forward 1, backward 2{split} per microbatch and rank)")
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
    """``timeline``: one measured step of a ``--trace`` file, as text or PNG, and its bubble."""
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
    if args.schedule:
        durations = mean_durations(records)
        pp = args.pp or p
        shown = ", ".join(f"{kind} {durations[kind] * 1e3:.2f} ms" for kind in
                          (FORWARD, BACKWARD, WEIGHT) if kind in durations)
        print(f"simulated with the measured mean spans ({shown}): bubble "
              f"{simulated_bubble(args.schedule, pp, m, v, durations):.1%}")
    if args.output:
        labels = [f"rank {r}" for r in ranks]
        render_png(timeline, args.output, labels=labels, xlabel="time (ms)",
                   title=f"{args.trace}: step {step}, measured bubble {mean:.1%}")
        print(f"wrote {args.output}")
    return 0


__all__ = ["cmd_schedule", "cmd_timeline", "render_png", "split_sendrecvs"]
