"""A3 ZeRO, the MPI side: ``mpirun -n N python a3.py <group> '<options>'``.

Groups (one per task), each over ZeRO-1 and -2 with MPI's collectives and with the ring:

* ``reduce_scatter`` (A3.1): after backward, ``ZeroGradients.finish`` must leave each rank
  the 1-process gradient on its shard of the flat buffer, through a reduce-scatter (or the
  ring's first half) and no all-reduce;
* ``adamw`` (A3.2): three training steps must give the 1-process losses and parameters, each
  rank's moments must be its slice of the 1-process AdamW's, and the optimizer state must
  take 1/dp of the bytes;
* ``state`` (A3.3): ``state_dict`` must return plain AdamW's state, and ``load_state_dict``
  must give each rank its slice of it.
"""

from __future__ import annotations

import numpy as np
from checks import Checks, assert_close, config, flat, main, serial_gradients, tokens

from mpipar.comm import Comm
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import build_model
from mpipar.parallel.zero import ZeroAdamW, ZeroGradients
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

BATCH = 12
VARIANTS = ((1, "mpi"), (2, "mpi"), (1, "ring"), (2, "ring"))
TEXT = "".join(f"line {i}: the quick brown fox jumps over a lazy dog.\n" for i in range(40))


def reduce_scatter(world: Comm, checks: Checks, options: dict) -> None:
    cfg = config()
    x, y = tokens(cfg, BATCH)
    _, want = serial_gradients(cfg, x, y)
    per = BATCH // world.size
    rows = slice(world.rank * per, (world.rank + 1) * per)
    for zero, allreduce in VARIANTS:
        tracer = Tracer(world.rank, enabled=True)
        model = build_model(cfg, 1)
        sync = ZeroGradients(model.parameters(), Comm(world.mpi, "dp", tracer), zero=zero,
                             allreduce=allreduce)
        sync.zero_grad()
        model(x[rows], y[rows]).backward()
        tracer.clear()
        sync.finish()
        full = np.zeros(sync.padded)
        full[:sync.numel] = flat(model, want)
        name = f"zero{zero}_{allreduce}"
        with checks.check(name):
            assert sync.grad_shard is not None, "no gradient shard after finish()"
            assert_close(sync.grad_shard, full[sync.shard_lo:sync.shard_hi],
                         f"{name}: rank {world.rank}'s gradient shard")
        with checks.check(f"{name}_trace"):
            ops = sorted({t.op for t in tracer.records})
            want_ops = ["reduce_scatter"] if allreduce == "mpi" else ["sendrecv"]
            assert ops == want_ops, f"{name}: finish() made {ops} calls, expected {want_ops}"


def _trainer(grid: ProcessGrid, **train) -> Trainer:
    tok = CharTokenizer.from_text(TEXT)
    cfg = config(vocab_size=tok.vocab_size)
    tc = TrainConfig(steps=3, batch_size=BATCH, lr=1e-2, warmup_steps=1, eval_every=0, **train)
    return Trainer(cfg, tc, grid, make_dataset(TEXT, tok, seq_len=cfg.seq_len),
                   Tracer(grid.world.rank))


def _flat_state(trainer: Trainer, slot: str, padded: int) -> np.ndarray:
    """The 1-process AdamW's moment ``slot`` ("m" or "v") as one flat, padded vector."""
    moments = getattr(trainer.optimizer, slot)
    out = np.zeros(padded)
    values = np.concatenate([moments[p.name].reshape(-1) for p in trainer.params])
    out[:values.size] = values
    return out


def adamw(world: Comm, checks: Checks, options: dict) -> None:
    serial = _trainer(ProcessGrid.single())
    ref_losses = [serial.train_step()["loss"] for _ in range(3)]
    for zero, allreduce in ((1, "mpi"), (2, "mpi"), (2, "ring")):
        trainer = _trainer(ProcessGrid.build(world, world.size, 1, 1), zero=zero,
                           allreduce=allreduce)
        losses = [trainer.train_step()["loss"] for _ in range(3)]
        opt = trainer.optimizer
        name = f"zero{zero}_{allreduce}"
        with checks.check(name):
            assert isinstance(opt, ZeroAdamW), f"the trainer made a {type(opt).__name__}"
            assert_close(losses, ref_losses, f"{name}: per-step losses")
            for p, q in zip(trainer.params, serial.params, strict=True):
                assert_close(p.data, q.data, f"{name}: {p.name} after 3 steps")
        with checks.check(f"{name}_moments"):
            for slot in ("m", "v"):
                want = _flat_state(serial, slot, opt.sync.padded)[opt.lo:opt.hi]
                assert_close(getattr(opt, slot), want, f"{name}: this rank's slice of {slot}")
        with checks.check(f"{name}_bytes"):
            report = opt.memory_report()
            shard = (opt.sync.padded // world.size) * 8
            assert report["optimizer_state_bytes"] == 2 * shard, \
                f"{name}: optimizer state {report['optimizer_state_bytes']} B, not 2 × {shard}"
            ratio = report["optimizer_state_bytes"] / report["baseline_optimizer_state_bytes"]
            assert abs(ratio - 1 / world.size) < 1e-3, f"{name}: state ratio {ratio:.4f}"
            if zero == 2:
                assert report["grad_bytes"] == shard, f"{name}: ZeRO-2 keeps all gradients"


def state(world: Comm, checks: Checks, options: dict) -> None:
    serial = _trainer(ProcessGrid.single())
    for _ in range(2):
        serial.train_step()
    want = serial.optimizer.state_dict()
    for zero, allreduce in ((1, "mpi"), (2, "ring")):
        trainer = _trainer(ProcessGrid.build(world, world.size, 1, 1), zero=zero,
                           allreduce=allreduce)
        for _ in range(2):
            trainer.train_step()
        got = trainer.optimizer.state_dict()
        name = f"zero{zero}_{allreduce}"
        with checks.check(f"{name}_state_dict"):
            assert sorted(got) == sorted(want), f"{name}: keys {sorted(set(got) ^ set(want))}"
            for key, value in want.items():
                assert got[key].shape == value.shape, f"{name}: {key} shape {got[key].shape}"
                assert_close(got[key], value, f"{name}: {key}")
        fresh = _trainer(ProcessGrid.build(world, world.size, 1, 1), zero=zero,
                         allreduce=allreduce).optimizer
        fresh.load_state_dict(want)
        with checks.check(f"{name}_load"):
            assert fresh.step_count == 2, f"{name}: step count {fresh.step_count} after load"
            for slot in ("m", "v"):
                full = _flat_state(serial, slot, fresh.sync.padded)
                assert_close(getattr(fresh, slot), full[fresh.lo:fresh.hi],
                             f"{name}: loaded slice of {slot}")


if __name__ == "__main__":
    main({"reduce_scatter": reduce_scatter, "adamw": adamw, "state": state})
