"""The tutorials' figures: up to date with the code that draws them, embedded with a caption
that names the command, well-formed SVG, and drawn from the real algorithms.

A committed figure that differs from what ``python -m mpipar.figures`` draws now fails
``test_committed_figure_is_up_to_date`` with the command that refreshes it. The measured
pipeline figure is redrawn from the traces committed in ``tutorials/figures/data/``, so the
comparison is exact and needs no MPI.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mpipar.figures import catalog
from mpipar.figures.__main__ import main as figures_main
from mpipar.figures.collectives import (
    allreduce,
    collective_examples,
    label,
    reduce_scatter,
    run_ring,
    starting_buffers,
)
from mpipar.figures.timelines import MICROBATCHES, PP, RUNS
from mpipar.parallel.pipeline.measure import compute_interval
from mpipar.svg import num
from mpipar.trace import load_jsonl

REPO = Path(__file__).resolve().parent.parent
FIGURE_DIR = REPO / catalog.FIGURE_DIR
DATA_DIR = REPO / catalog.DATA_DIR
NAMES = [f.name for f in catalog.FIGURES]


@pytest.mark.parametrize("name", NAMES)
def test_committed_figure_is_up_to_date(name: str, tmp_path: Path):
    [fresh] = catalog.draw(tmp_path, DATA_DIR, [name])
    committed = FIGURE_DIR / fresh.name
    assert committed.exists(), (f"{committed.relative_to(REPO)} is missing: draw it with "
                                f"`python -m mpipar.figures {name}` (or `make figures`) and "
                                "commit it")
    assert committed.read_bytes() == fresh.read_bytes(), (
        f"{committed.relative_to(REPO)} is stale: the code now draws it differently. Redraw "
        f"it with `python -m mpipar.figures {name}` (or `make figures`) and commit it")


def test_no_figure_file_without_a_drawing():
    files = sorted(p.stem for p in FIGURE_DIR.glob("*.svg"))
    assert files == sorted(NAMES), f"figure files {files} vs figures drawn {sorted(NAMES)}"


@pytest.mark.parametrize("figure", catalog.FIGURES, ids=NAMES)
def test_figure_is_embedded_with_a_caption_naming_its_command(figure: catalog.Figure):
    text = (REPO / "tutorials" / figure.chapter).read_text(encoding="utf-8")
    match = re.search(r"^!\[[^\]]+\]\(figures/" + re.escape(figure.file)
                      + r"\)\n\n((?:.+\n)+)", text, re.MULTILINE)
    assert match, (f"{figure.chapter} does not embed figures/{figure.file} as ![alt](...) "
                   "followed by a blank line and a caption")
    caption = match.group(1)
    assert f"`{figure.command}`" in caption, (
        f"the caption under figures/{figure.file} in {figure.chapter} should name "
        f"`{figure.command}`; it reads: {caption!r}")


@pytest.mark.parametrize("name", NAMES)
def test_figure_is_well_formed_svg(name: str):
    root = ET.parse(FIGURE_DIR / f"{name}.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg" and root.find(f"{ns}title").text, name
    width, height = float(root.get("width")), float(root.get("height"))
    assert root.get("viewBox") == f"0 0 {num(width)} {num(height)}"


def test_ring_figure_runs_the_ring_all_reduce():
    """The threads run mpipar's ring: in reduce-scatter step s rank r sends chunk (r − s) mod n
    holding s + 1 ranks' contributions, in all-gather finished chunks, and every rank ends
    with every chunk summed over all ranks."""
    n = 4
    log, finals = run_ring(n)
    assert len(log) == 2 * (n - 1) * n
    for call, rank, dest, (part,) in log:
        assert dest == (rank + 1) % n
        if call < n - 1:
            assert (part.chunk, len(part.ranks)) == ((rank - call) % n, call + 1)
        else:
            assert part.chunk == (rank + 1 - (call - n + 1)) % n and len(part.ranks) == n
    assert all([label(p, n) for p in final] == ["Σa", "Σb", "Σc", "Σd"] for final in finals)


def test_collective_definitions():
    bufs = starting_buffers(4)
    assert [label(p, 4) for p in allreduce(bufs)[3]] == ["Σa", "Σb", "Σc", "Σd"]
    assert [[label(p, 4) for p in cells] for cells in reduce_scatter(bufs)] == [
        ["Σa"], ["Σb"], ["Σc"], ["Σd"]]
    _, _, before, after = collective_examples(4)[2]  # allgather
    assert [label(p, 4) for p in before[1]] == ["b₁"]
    assert [label(p, 4) for p in after[0]] == ["a₀", "b₁", "c₂", "d₃"]


@pytest.mark.parametrize("schedule, chunks", [(s, v) for s, _, v in RUNS])
def test_measured_traces_hold_one_step_of_compute_spans(schedule: str, chunks: int):
    records = load_jsonl(str(DATA_DIR / f"{schedule}.jsonl"))
    intervals = [compute_interval(r) for r in records]
    assert None not in intervals, f"{schedule}: only forward/backward spans belong here"
    assert len({r.step for r in records}) == 1 and {r.rank for r in records} == set(range(PP))
    for rank in range(PP):
        kinds = sorted((iv.kind, iv.mb, iv.chunk)
                       for r, iv in zip(records, intervals, strict=True) if r.rank == rank)
        assert kinds == sorted((k, mb, c) for k in "BF" for mb in range(MICROBATCHES)
                               for c in range(chunks)), f"{schedule}, rank {rank}"


def test_command_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert figures_main(["--check"]) == 0
    assert figures_main(["rank_grid", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'rank_grid.svg'}\n"
    (tmp_path / "ring_allreduce.svg").write_text("<svg/>")
    assert figures_main(["--check", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"stale: {tmp_path / 'ring_allreduce.svg'} (redraw it with `make figures`)" in out
    assert figures_main(["no_such_figure"]) == 2
    assert "no figure called no_such_figure" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert figures_main([]) == 2  # not at the repository root


def test_numbers_are_written_the_same_way_everywhere():
    assert [num(x) for x in (3, 2.5, 2.504, -0.001, 1e-9, 120.0)] == [
        "3", "2.5", "2.5", "0", "0", "120"]
