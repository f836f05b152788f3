"""``python -m mpipar.figures [NAME ...]``: draw the tutorials' figures (``make figures``).

    python -m mpipar.figures                      # every figure, into tutorials/figures/
    python -m mpipar.figures ring_allreduce       # one of them
    python -m mpipar.figures --retrace            # re-measure the pipeline traces, then draw
    python -m mpipar.figures --check              # exit 1 if a committed figure is stale

Run it from the repository root. Exit codes: 0 ok; 1 stale figures (``--check``); 2 bad
arguments or no ``tutorials/`` here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpipar.figures.catalog import DATA_DIR, FIGURE_DIR, FIGURES, draw, select, stale
from mpipar.figures.timelines import measure


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mpipar.figures",
        description="Draw the tutorials' figures as SVG from mpipar's code and the traces in "
                    f"{DATA_DIR}/. Figures: "
                    + "; ".join(f"{f.name} ({f.chapter[:2]}): {f.about}" for f in FIGURES))
    ap.add_argument("names", nargs="*", metavar="NAME", help="figures to draw (default: all)")
    ap.add_argument("--out", type=Path, default=FIGURE_DIR,
                    help=f"directory to write into (default: {FIGURE_DIR})")
    ap.add_argument("--data", type=Path, default=DATA_DIR,
                    help=f"traces of the measured figures (default: {DATA_DIR})")
    ap.add_argument("--retrace", action="store_true",
                    help="first re-measure the pipeline traces with mpirun (a few seconds)")
    ap.add_argument("--check", action="store_true",
                    help="draw nothing; list the figures in --out that differ from a fresh "
                         "drawing and exit 1 if there are any")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path("tutorials").is_dir():
        print("python -m mpipar.figures: error: run it from the repository root (no "
              "tutorials/ here)", file=sys.stderr)
        return 2
    try:
        select(args.names)
    except ValueError as exc:
        print(f"python -m mpipar.figures: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        names = stale(args.out, args.data)
        for name in names:
            print(f"stale: {args.out / name}.svg (redraw it with `make figures`)")
        return 1 if names else 0
    if args.retrace:
        measure(args.data, Path.cwd())
    for path in draw(args.out, args.data, args.names):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
