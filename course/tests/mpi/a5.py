"""A5 pipeline parallelism, the MPI side: ``mpirun -n P python a5.py <group> '<options>'``.

Groups (one per task):

* ``executor`` (A5.3): the executor runs the naive and the interleaved schedule on stages
  cut here (so the test needs neither A5.1 nor A5.2): the loss and every gradient but the
  tied embedding's must equal the 1-process ones, and each rank's peak of stashed
  microbatches must be what the checker predicted;
* ``tied`` (A5.4): after ``sync_tied_grads`` both copies of the tied embedding hold the
  1-process gradient; three training steps with 1F1B equal the 1-process run.
"""

from __future__ import annotations

from types import SimpleNamespace

from checks import (
    Checks,
    assert_close,
    config,
    main,
    pipeline_chunks,
    serial_gradients,
    tokens,
)

from mpipar.comm import Comm
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.nn import DropoutKey
from mpipar.parallel.pipeline.executor import PipelineExecutor
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

BATCH = 12
TEXT = "".join(f"line {i}: the quick brown fox jumps over a lazy dog.\n" for i in range(40))


def _run(world: Comm, schedule: str, m: int, v: int):
    cfg = config(n_layer=4)
    grid = ProcessGrid.build(world, 1, 1, world.size)
    chunks = pipeline_chunks(cfg, grid, v)
    tc = SimpleNamespace(schedule=schedule, microbatches=m, virtual_stages=v)
    ex = PipelineExecutor(chunks, grid, tc, Tracer(world.rank))
    x, y = tokens(cfg, BATCH)
    mb = BATCH // m
    rows = [slice(k * mb, (k + 1) * mb) for k in range(m)]
    keys = [DropoutKey(1, 0, BATCH, r) for r in rows]
    loss = ex.train_step([x[r] for r in rows], [y[r] for r in rows], keys)
    losses = world.allgather_object(loss)
    return cfg, grid, ex, chunks, losses[-1], serial_gradients(cfg, x, y)


def executor(world: Comm, checks: Checks, options: dict) -> None:
    for schedule, m, v in options["runs"]:
        cfg, grid, ex, chunks, loss, (want_loss, want) = _run(world, schedule, m, v)
        name = f"{schedule}_m{m}"
        with checks.check(name):
            assert_close(loss, want_loss, f"{name}: the mean loss over the microbatches")
            for p in (p for c in chunks for p in c.parameters() if not p.tied_embedding):
                assert_close(p.grad, want[p.name], f"{name}: gradient of {p.name}")
        with checks.check(f"{name}_stash"):
            summary = ex.memory_summary()
            assert summary["peak_inflight"] == summary["predicted_inflight"], \
                f"{name}: {summary['peak_inflight']} microbatches stashed at the peak, the " \
                f"schedule holds {summary['predicted_inflight']}"


def _trainer(grid: ProcessGrid, **train) -> Trainer:
    tok = CharTokenizer.from_text(TEXT)
    cfg = config(vocab_size=tok.vocab_size, n_layer=4)
    tc = TrainConfig(steps=3, batch_size=BATCH, lr=1e-2, warmup_steps=1, eval_every=0, **train)
    return Trainer(cfg, tc, grid, make_dataset(TEXT, tok, seq_len=cfg.seq_len),
                   Tracer(grid.world.rank))


def tied(world: Comm, checks: Checks, options: dict) -> None:
    _, grid, ex, chunks, _, (_, want) = _run(world, "naive", 2, 1)
    ex.sync_tied_grads()
    copies = [p for c in chunks for p in c.parameters() if p.tied_embedding]
    with checks.check("tied_grads"):
        on_an_end = grid.is_first_stage or grid.is_last_stage
        assert len(copies) == (1 if on_an_end else 0), f"{len(copies)} copies of wte here"
        for p in copies:
            assert_close(p.grad, want[p.name], "wte's gradient (embedding + head terms)")
    serial = _trainer(ProcessGrid.single())
    ref = [serial.train_step()["loss"] for _ in range(3)]
    ref_params = {p.name: p.data for p in serial.params}
    trainer = _trainer(ProcessGrid.build(world, 1, 1, world.size), schedule="1f1b",
                       microbatches=world.size)
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    with checks.check("training"):
        assert_close(losses, ref, f"per-step losses at pp {world.size}")
        for p in trainer.params:
            assert_close(p.data, ref_params[p.name], f"{p.name} after 3 steps")


if __name__ == "__main__":
    main({"executor": executor, "tied": tied})
