"""``python -m mpipar.viz``: pictures of what a run does, as text, PNG or SVG.

    python -m mpipar.viz schedule --schedule 1f1b -p 4 -m 8        # a schedule, checked
    python -m mpipar.viz timeline runs/trace.jsonl --text          # a real step, as text
    python -m mpipar.viz timeline runs/trace.jsonl -o pipeline.png # ... and as a picture
    python -m mpipar.viz loss runs/metrics.jsonl --out loss.png    # the loss curves

This module is only the command line: it parses the arguments and hands them to the command,
which lives beside what it draws. ``schedule`` and ``timeline`` are pipeline pictures
(`mpipar.parallel.pipeline.pictures`): a schedule as the checker proves and simulates it, and
one measured step of a ``train.py --trace`` file with its bubble per rank
(`mpipar.parallel.pipeline.measure`). ``loss`` draws the training and validation loss of a
``--metrics`` file, the chart of the run report (`mpipar.report`).

Exit codes: 0 ok; 1 the checker rejected the schedule, or the reader of the output went away
early (``... | head``), which stops the command quietly; 2 bad arguments or an unreadable input.
"""

from __future__ import annotations

import argparse
import os
import sys

from mpipar.parallel.pipeline.pictures import cmd_schedule, cmd_timeline
from mpipar.parallel.pipeline.schedules import SCHEDULE_NAMES
from mpipar.report import cmd_loss


def build_parser() -> argparse.ArgumentParser:
    """The commands and their options; each subcommand's ``run`` is its function."""
    ap = argparse.ArgumentParser(prog="python -m mpipar.viz",
                                 description="Pipeline schedules and timelines, as text or "
                                             "PNG; loss curves of a run.")
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
    lo = sub.add_parser("loss", help="draw the training and validation loss of a metrics file")
    lo.add_argument("metrics", metavar="METRICS", help="JSON lines written by train.py --metrics")
    lo.add_argument("--out", required=True, metavar="FILE",
                    help="picture to write: SVG when FILE ends in .svg, else PNG (matplotlib)")
    lo.set_defaults(run=cmd_loss)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader stopped early. Point stdout at /dev/null so that Python's own last flush
        # does not fail again, and stop without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, ImportError) as exc:
        print(f"python -m mpipar.viz: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
