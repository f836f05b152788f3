"""Every figure of the tutorials: its file, the chapter that shows it, and what draws it.

`draw` writes figures into a directory; `stale` says which committed figures differ from what
the code draws now (the test suite calls it, and ``python -m mpipar.figures --check``).
A figure's file is ``<name>.svg``; its caption in the chapter names the command that drew
it, ``python -m mpipar.figures <name>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mpipar.figures.collectives import collectives_figure, ring_figure
from mpipar.figures.layout import grid_figure
from mpipar.figures.tensor import tp_block_figure, tp_linear_figure
from mpipar.figures.timelines import timelines_figure
from mpipar.figures.zero import zero_figure

FIGURE_DIR = Path("tutorials/figures")  # from the repository root
DATA_DIR = FIGURE_DIR / "data"  # the traces the measured figures are drawn from


@dataclass(frozen=True)
class Figure:
    """One figure: ``draw(data_dir)`` returns its SVG."""

    name: str
    chapter: str
    about: str
    draw: Callable[[Path], str]

    @property
    def file(self) -> str:
        return f"{self.name}.svg"

    @property
    def command(self) -> str:
        return f"python -m mpipar.figures {self.name}"


FIGURES = (
    Figure("collectives", "00_mpi_basics.md", "all-reduce, reduce-scatter, all-gather and "
           "broadcast: each rank's buffer before and after", lambda _: collectives_figure()),
    Figure("ring_allreduce", "02_data_parallel.md", "the ring all-reduce run on 4 ranks: "
           "which chunk every rank sends in every step", lambda _: ring_figure()),
    Figure("zero_partitions", "02_data_parallel.md", "parameters, gradients and optimizer "
           "state each rank keeps under ZeRO-1, 2 and 3", lambda _: zero_figure()),
    Figure("tp_linear", "03_tensor_parallel.md", "a linear layer split by columns and by "
           "rows over 2 ranks", lambda _: tp_linear_figure()),
    Figure("tp_block", "03_tensor_parallel.md", "where f and g sit in a transformer block",
           lambda _: tp_block_figure()),
    Figure("rank_grid", "03_tensor_parallel.md", "8 ranks as dp 2 × tp 2 × pp 2, coloured by "
           "their tp, dp and pp groups", lambda _: grid_figure()),
    Figure("pipeline_timelines", "04_pipeline_parallel.md", "measured GPipe, 1F1B and "
           "interleaved steps, from the traces in tutorials/figures/data", timelines_figure),
)


def select(names: Iterable[str] | None) -> list[Figure]:
    """The figures called ``names`` (all for None); ValueError naming an unknown one."""
    if not names:
        return list(FIGURES)
    known = {f.name: f for f in FIGURES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no figure called {', '.join(unknown)}; the figures are "
                         f"{', '.join(known)}")
    return [known[n] for n in names]


def draw(out_dir: Path, data_dir: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Write the figures (all, or those named) into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in select(names):
        path = out_dir / figure.file
        path.write_text(figure.draw(data_dir), encoding="utf-8")
        written.append(path)
    return written


def stale(figure_dir: Path, data_dir: Path) -> list[str]:
    """The figures whose file in ``figure_dir`` is missing or differs from a fresh drawing."""
    out = []
    for figure in FIGURES:
        path = figure_dir / figure.file
        if not path.exists() or path.read_bytes() != figure.draw(data_dir).encode("utf-8"):
            out.append(figure.name)
    return out
