"""What every grading script shares: start MPI, record calls, collect named checks, compare.

A script runs check groups: ``mpirun -n N python <script> <group> '<json options>'``. Every
rank runs the same checks; a wrong result (an ``AssertionError``) is recorded against its
check and the script goes on, so one launch reports every check. Any other exception (a
``NotImplementedError`` of a stub, an MPI error) leaves the ranks out of step: it is not
caught, and the exception hook prints it and aborts the whole job at once. At the end rank 0
prints ``VERDICT {json}`` (read by ``course_mpi.launch``).

A check makes the same communication calls on every rank and asserts only afterwards.

The reference every parallel result is compared with is the 1-process computation, done on
every rank in the same script, in float64: the parallel result must equal it to 1e-10
relative (docs/design.md §5), the tolerance of additions taken in another order.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mpipar.comm import Comm, install_excepthook
from mpipar.course import flight
from mpipar.grid import ProcessGrid
from mpipar.model import GPT, GPTConfig, SerialLayers, build_model

HERE = Path(__file__).resolve().parent
TOL = 1e-10  # relative, float64: the same sums in another order


class Checks:
    """Named checks of one launch; :meth:`report` prints the merged verdict on rank 0."""

    def __init__(self, world: Comm) -> None:
        self.world = world
        self.failures: dict[str, list[str]] = {}

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        self.failures.setdefault(name, [])
        try:
            yield
        except AssertionError as exc:
            frames = [f for f in traceback.extract_tb(exc.__traceback__)
                      if Path(f.filename).parent == HERE]
            where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
            self.failures[name].append(f"rank {self.world.rank}{where}: {exc}")

    def report(self) -> None:
        gathered = self.world.gather_object(self.failures)
        if self.world.rank == 0:
            merged: dict[str, list[str]] = {}
            for failures in gathered:
                for name, msgs in failures.items():
                    merged.setdefault(name, []).extend(msgs)
            print("VERDICT " + json.dumps(merged), flush=True)


def main(groups: dict[str, Callable[[Comm, Checks, dict], None]]) -> None:
    """Run the check group named by ``argv[1]`` with the options of ``argv[2]``."""
    flight.install()
    world = Comm.world()
    install_excepthook(world)
    group = sys.argv[1]
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if group not in groups:
        raise SystemExit(f"unknown check group {group!r}; known: {', '.join(sorted(groups))}")
    checks = Checks(world)
    groups[group](world, checks, options)
    checks.report()


# ---- comparing with the 1-process computation ------------------------------------------------


def rel_diff(a, b) -> float:
    """max |a − b| / max |b| (0 for empty arrays)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} where {b.shape} was expected")
    if not a.size:
        return 0.0
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-300)


def assert_close(got, want, what: str, tol: float = TOL) -> None:
    d = rel_diff(got, want)
    assert d <= tol, f"{what}: relative difference {d:.2e} from the 1-process value (> {tol:g})"


def config(**changes) -> GPTConfig:
    """A small float64 GPT: 2 layers, 2 heads, d_model 16, 8 positions, 13 characters."""
    base = dict(vocab_size=13, n_layer=2, n_head=2, d_model=16, seq_len=8, dtype="float64")
    base.update(changes)
    return GPTConfig(**base)


def tokens(cfg: GPTConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A batch of random token ids and targets, (batch, seq_len) each, the same on every rank."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, size=(batch, cfg.seq_len))
    y = rng.integers(0, cfg.vocab_size, size=(batch, cfg.seq_len))
    return x, y


def serial_gradients(cfg: GPTConfig, x, y, seed: int = 1) -> tuple[float, dict[str, np.ndarray]]:
    """The 1-process model's mean loss on (x, y) and the gradient of every parameter by name."""
    model = build_model(cfg, seed)
    loss = model(x, y)
    loss.backward()
    return float(loss.data), {p.name: p.grad.copy() for p in model.parameters()}


def flat(model: GPT, grads: dict[str, np.ndarray]) -> np.ndarray:
    """The gradients of ``model``'s parameters, in its parameter order, as one vector."""
    return np.concatenate([grads[p.name].reshape(-1) for p in model.parameters()])


def pipeline_chunks(cfg: GPTConfig, grid: ProcessGrid, v: int) -> list[GPT]:
    """This rank's chunks, chunk c = virtual stage c·p + r, blocks split as evenly as
    possible (cut here, not by the student's stage_bounds)."""
    s = grid.pp * v
    edges = [len(a) for a in np.array_split(np.arange(cfg.n_layer), s)]
    starts = np.concatenate([[0], np.cumsum(edges)])
    chunks = []
    for c in range(v):
        stage = c * grid.pp + grid.pp_rank
        chunk = GPT(cfg, SerialLayers(np.float64), first_layer=int(starts[stage]),
                    last_layer=int(starts[stage + 1]), pre=stage == 0, post=stage == s - 1)
        chunk.initialize(1)
        chunks.append(chunk)
    return chunks
