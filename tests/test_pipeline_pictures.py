"""Pipeline measurement and pictures without MPI: the bubble and timelines read back from
trace records whose answer is known, and the ``python -m mpipar.viz`` commands (a checked
schedule, the checker rejecting blocking sends, PNGs, a reader that goes away early).
The same commands on a real ``train.py --trace`` file are tested in test_pipeline.py.
"""

from __future__ import annotations

import re
import sys

import pytest
from conftest import describe_run
from mpi_util import run_killable

from mpipar.parallel.pipeline import build_schedule, render_text
from mpipar.parallel.pipeline.measure import (
    bubble_from_records,
    compute_interval,
    measured_bubble,
    step_extents,
    trace_timeline,
)
from mpipar.parallel.pipeline.pictures import split_sendrecvs
from mpipar.trace import COMPUTE, TraceRecord
from mpipar.viz import main as viz_main

# ---- measured bubble and timelines from trace records ------------------------------------


def span(rank: int, step: int, name: str, mb: int, start: float, end: float) -> TraceRecord:
    return TraceRecord(rank=rank, op=COMPUTE, group="", peer=None, nbytes=0, dtype="", shape=(),
                       phase=name.split(" ")[0], step=step, microbatch=mb, start=start, end=end,
                       name=name)


def two_rank_records() -> list[TraceRecord]:
    """Two steps of p = 2, m = 1 with forward 1 s and backward 2 s (the textbook pipeline):
    rank 0 F [0,1) B [4,6); rank 1 F [1,2) B [2,4). Step 1 repeats it 10 s later, with a
    communication record and an evaluation span that must not count."""
    out = []
    for step, t0 in ((0, 0.0), (1, 10.0)):
        out += [span(0, step, "forward chunk 0", 0, t0, t0 + 1),
                span(1, step, "forward chunk 0", 0, t0 + 1, t0 + 2),
                span(1, step, "backward chunk 0", 0, t0 + 2, t0 + 4),
                span(0, step, "backward chunk 0", 0, t0 + 4, t0 + 6)]
    out.append(TraceRecord(0, "send", "pp", 1, 64, "float32", (4, 4), "forward", 1, 0,
                           11.0, 11.5))
    out.append(span(0, 1, "eval chunk 0", 0, 20.0, 30.0))
    return out


def test_compute_interval_reads_span_names():
    assert compute_interval(span(0, 0, "backward chunk 3", 5, 1.0, 2.0)) == (1.0, 2.0, "B", 5, 3)
    assert compute_interval(span(0, 0, "forward", 2, 1.0, 2.0)) == (1.0, 2.0, "F", 2, 0)
    assert compute_interval(span(0, 0, "eval chunk 0", 0, 1.0, 2.0)) is None


def test_measured_bubble_matches_the_textbook_pipeline():
    """Each rank computes 3 of the 6 seconds: bubble 1/2 = (p−1)/(m+p−1) for p = 2, m = 1."""
    records = two_rank_records()
    assert bubble_from_records(records) == {0: 0.5, 1: 0.5}
    extents = {r: step_extents([x for x in records if x.rank == r]) for r in (0, 1)}
    assert extents[0] == {0: (0.0, 6.0, 3.0), 1: (10.0, 16.0, 3.0)}
    # A slow step 0 (rank 1 starts late) is left out by default and counted when asked for.
    extents[1][0] = (1.0, 9.0, 3.0)
    assert measured_bubble(extents) == {0: 0.5, 1: 0.5}
    assert measured_bubble(extents, steps=[0]) == {0: 1 - 3 / 9, 1: 1 - 3 / 9}


def test_trace_timeline_draws_a_measured_step():
    timeline, ranks = trace_timeline(two_rank_records(), step=1)
    assert ranks == [0, 1] and timeline.makespan == 6.0
    assert timeline.bubble_fraction() == 0.5
    assert render_text(timeline, width=6).splitlines()[:2] == ["rank 0 |A...aa|",
                                                              "rank 1 |.Aaa..|"]


# ---- mpipar.viz commands ------------------------------------------------------------------


def test_viz_schedule_prints_the_checked_schedule(capsys):
    assert viz_main(["schedule", "--schedule", "1f1b", "-p", "4", "-m", "8"]) == 0
    out = capsys.readouterr().out
    assert "rank 3: F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7" in out
    assert "bubble: simulated 0.2727, theory 0.2727" in out
    assert "peak microbatches in flight per rank: 4 3 2 1" in out
    assert re.search(r"^rank 0 \|AAA", out, re.MULTILINE), out


def test_viz_schedule_shows_the_checker_rejecting_blocking_sends(capsys):
    assert viz_main(["schedule", "--schedule", "1f1b", "-p", "2", "-m", "4",
                     "--split-sendrecv"]) == 1
    out = capsys.readouterr().out
    assert "REJECTED by the checker: rank 0, instruction" in out
    assert "cycle of waits: rank 0 -> rank 1 -> rank 0" in out, out
    split = split_sendrecvs(build_schedule("1f1b", 2, 4))
    assert not any(type(x).__name__ == "SendRecv" for program in split for x in program)


def test_png_needs_matplotlib_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    code = viz_main(["schedule", "-p", "2", "-m", "2", "-o", str(tmp_path / "s.png")])
    assert code == 2
    assert "pip install -e '.[viz]'" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


def test_viz_schedule_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "interleaved.png"
    assert viz_main(["schedule", "--schedule", "interleaved", "-p", "2", "-m", "4", "-v", "2",
                     "-o", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_viz_stops_quietly_when_its_reader_goes_away():
    """``python -m mpipar.viz schedule ... | head -3``: the 220 kB listing fills the pipe, head
    exits, and the command's next write fails; it must end with exit code 1, no traceback."""
    viz = f"{sys.executable} -m mpipar.viz schedule -p 16 -m 64 --instructions"
    proc = run_killable(["sh", "-c", f'{{ {viz}; echo "viz exited $?" >&2; }} | head -3'],
                        timeout=60)
    assert proc.stderr == "viz exited 1\n", describe_run(proc)
    assert proc.stdout.startswith("schedule 1f1b: p=16 ranks") and proc.stdout.count("\n") == 3
