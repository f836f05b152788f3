"""Chapter 8c (``tutorials/08c_zero_bubble.md``): the numbers it states, against mpipar.

* the output block of ``tutorials/examples/split_backward.py`` is what the script prints;
* the makespans and bubbles of section 3 and the Check-yourself answers are the simulator's
  and `theoretical_bubble`'s;
* the memory arithmetic of section 5 follows from the bytes its commands print (those bytes
  are pinned by the commands' ``expect`` lines, run in ``test_tutorials.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re

import pytest
from mpi_util import REPO

from mpipar.parallel.pipeline.checker import (
    check_schedule,
    theoretical_bubble,
    zero_bubble_h1_bubble,
)
from mpipar.parallel.pipeline.schedules import build_schedule

CHAPTER = REPO / "tutorials" / "08c_zero_bubble.md"
EXAMPLE = REPO / "tutorials" / "examples" / "split_backward.py"


def chapter() -> str:
    return CHAPTER.read_text(encoding="utf-8")


def text_after(command: str) -> list[str]:
    """The lines of the ```text block that follows the ```sh block holding ``command``."""
    page = chapter()
    start = page.index(command + "\n```")
    block = re.search(r"```text\n(.*?)\n```", page[start:], re.DOTALL)
    assert block, f"no output block after {command!r}"
    return block.group(1).splitlines()


def test_split_backward_example_prints_the_chapters_block():
    spec = importlib.util.spec_from_file_location("split_backward", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()
    assert out.getvalue().splitlines() == text_after("python tutorials/examples/split_backward.py")


def test_section_3_makespans_and_bubbles():
    zb = check_schedule(build_schedule("zb-h1", 4, 8), name="zb-h1")
    one = check_schedule(build_schedule("1f1b", 4, 8), name="1f1b")
    assert (zb.makespan, one.makespan) == (27, 33)
    assert (zb.makespan - 3 * 8, one.makespan - 3 * 8) == (3, 9)  # idle units per rank
    page = chapter()
    assert "the bubble from 27.3% to 11.1%" in page
    assert f"{one.bubble_fraction:.1%}" == "27.3%" and f"{zb.bubble_fraction:.1%}" == "11.1%"


def test_check_yourself_answers():
    assert theoretical_bubble("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("zb-h1", 4, 8) == pytest.approx(3 / 27)
    # answer 2: with W = 0 ZB-H1's bubble is 1F1B's, whatever F and B are
    for f, b in ((1.0, 1.0), (1.0, 2.0), (0.7, 1.9)):
        assert zero_bubble_h1_bubble(4, 8, f, b, 0.0) == pytest.approx(3 / 11)
    # answer 4: peak in flight, rank 3 under 1F1B and ZB-H1, and 1F1B's rank 0
    zb = check_schedule(build_schedule("zb-h1", 4, 8), name="zb-h1")
    one = check_schedule(build_schedule("1f1b", 4, 8), name="1f1b")
    assert (one.peak_inflight[3], zb.peak_inflight[3], one.peak_inflight[0]) == (1, 4, 4)


def test_section_5_memory_arithmetic():
    """The chapter's W-stash and peak figures follow from the bytes its runs print."""
    page = chapter()
    one = re.search(r"per rank: (\d+\.\d\d) KiB \(2 in flight\), (\d+\.\d\d) KiB \(1 in flight\)",
                    page)
    zb = re.search(r"per rank: (\d+\.\d\d) KiB \(2 in flight\), (\d+\.\d\d) KiB \(2 in flight\)",
                   page)
    assert one and zb
    rank0, full = float(one.group(1)), float(one.group(2))
    assert float(zb.group(1)) == rank0
    both = float(zb.group(2))
    w_stash = both - full
    assert f"{both:.2f} − {full:.2f} = {w_stash:.2f} KiB, {w_stash / full:.0%} of a full one" \
        in page
    assert f"from {rank0:.2f} to {both:.2f} KiB (+{both / rank0 - 1:.0%})" in page
