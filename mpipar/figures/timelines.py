"""Measured pipeline steps (chapter 4): GPipe, 1F1B and interleaved, from real traces.

The figure is drawn from trace files kept in the repository (``tutorials/figures/data/``), so
that redrawing it is exact and needs no MPI: each holds the forward and backward compute
spans of the last step of one ``train.py --trace`` run, as `mpipar.trace.write_jsonl` writes
records. :func:`measure` re-measures them, running the commands of :data:`RUNS` (the runs of
chapter 4, section 7) under ``mpirun``; ``make figures RETRACE=1`` calls it. The drawing
reads the spans back with `mpipar.parallel.pipeline.measure.trace_timeline`, the code behind
``python -m mpipar.viz timeline``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from mpipar.figures.charts import (
    LABEL_WIDTH,
    draw_legend,
    draw_time_axis,
    draw_timeline,
    in_ms,
)
from mpipar.parallel.pipeline.checker import theoretical_bubble
from mpipar.parallel.pipeline.measure import compute_interval, trace_steps, trace_timeline
from mpipar.parallel.pipeline.timeline import Timeline
from mpipar.svg import MUTED, Canvas
from mpipar.trace import load_jsonl, write_jsonl

PP, MICROBATCHES = 2, 8
COMMON = ["--preset", "small", "--n-layer", "4", "--steps", "3", "--eval-every", "0",
          "--quiet", "--pp", str(PP), "--microbatches", str(MICROBATCHES)]
# (schedule, extra flags, chunks per rank)
RUNS = (("gpipe", [], 1), ("1f1b", [], 1), ("interleaved", ["--virtual-stages", "2"], 2))
TITLES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "interleaved 1F1B"}


def run_command(schedule: str, extra: list[str], trace: Path) -> list[str]:
    """The ``mpirun ... train.py`` command that measures ``schedule`` into ``trace``."""
    mpirun = Path(sys.executable).with_name("mpirun")
    return [str(mpirun if mpirun.exists() else "mpirun"), "-n", str(PP), sys.executable,
            "train.py", *COMMON, "--schedule", schedule, *extra, "--trace", str(trace)]


def measure(data_dir: Path, repo: Path) -> None:
    """Run each schedule once and keep the compute spans of its last step in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for schedule, extra, _ in RUNS:
            trace = Path(tmp) / f"{schedule}.jsonl"
            cmd = run_command(schedule, extra, trace)
            print("measuring:", " ".join(cmd[3:]), flush=True)
            subprocess.run(cmd, cwd=repo, check=True, timeout=600)
            records = load_jsonl(str(trace))
            last = trace_steps(records)[-1]
            kept = [r for r in records if r.step == last and compute_interval(r) is not None]
            for r in kept:  # microseconds are plenty, and keep the files short
                r.start, r.end = round(r.start, 6), round(r.end, 6)
            write_jsonl(str(data_dir / f"{schedule}.jsonl"), kept)


def load_step(data_dir: Path, schedule: str) -> tuple[Timeline, list[int], int]:
    """The measured step kept for ``schedule``: its timeline in ms, ranks, and step number."""
    records = load_jsonl(str(data_dir / f"{schedule}.jsonl"))
    step = trace_steps(records)[-1]
    timeline, ranks = trace_timeline(records, step)
    return in_ms(timeline), ranks, step


def timelines_figure(data_dir: Path) -> str:
    """The three measured steps, one panel each, on one time scale."""
    steps = [(schedule, v, *load_step(data_dir, schedule)) for schedule, _, v in RUNS]
    span = max(tl.makespan for _, _, tl, _, _ in steps)
    width, panel_h = 860, 34 + PP * 28
    c = Canvas(width, 62 + len(steps) * panel_h + 46,
               "Measured pipeline steps: GPipe, 1F1B, interleaved", "timelines")
    c.text(12, 22, f"One measured training step on {PP} pipeline ranks, {MICROBATCHES} "
           "microbatches (small preset, 4 layers)", size=14, bold=True)
    draw_legend(c, 12, 44, chunks=True)
    y = 70.0
    for schedule, v, timeline, ranks, step in steps:
        theory = theoretical_bubble(schedule, PP, MICROBATCHES, v)
        c.text(12, y + 6, f"{TITLES[schedule]}: step {step}, {timeline.makespan:.1f} ms, "
               f"bubble measured {timeline.bubble_fraction():.1%} (theory {theory:.1%})",
               size=12, bold=True)
        y = draw_timeline(c, timeline, [f"rank {r}" for r in ranks], x=12, y=y + 12,
                          width=width - 24, span=span) + 20
    draw_time_axis(c, x=12, y=y - 16, width=width - 24, span=span, unit="ms")
    c.text(12 + LABEL_WIDTH, y + 34, "Numbers: microbatch (.chunk). Grey: idle, the bubble. "
           "Times vary from run to run; the shapes do not.", size=11, fill=MUTED)
    return c.svg()
