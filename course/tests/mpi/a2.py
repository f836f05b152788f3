"""A2 data parallelism, the MPI side: ``mpirun -n N python a2.py <group> '<options>'``.

Groups (one per task):

* ``average`` (A2.1): each rank takes its shard with ``shard_rows``, backward, then
  ``allreduce_gradients``; the gradients must equal the 1-process full-batch gradients;
* ``ring`` (A2.2): ``ring_allreduce`` on integer-valued data (exact in any order) of many
  lengths must equal the sum; its trace must hold 2(n−1) ``sendrecv`` calls to the right
  neighbour of at most ⌈L/n⌉ elements and no all-reduce; real gradients averaged by the ring
  must equal the 1-process gradients;
* ``buckets`` (A2.3): ``DataParallel`` in each strategy must reproduce the 1-process
  gradients; with overlap a bucket's all-reduce must start before backward ends, without it
  none may;
* ``accumulate`` (A2.4): with sync off, backward only accumulates (no call in the trace);
  training with 4 microbatches must equal the 1-process run and communicate in the last
  microbatch only.
"""

from __future__ import annotations

import math

import numpy as np
from checks import Checks, assert_close, config, flat, main, serial_gradients, tokens

from mpipar.comm import Comm
from mpipar.data import CharTokenizer, make_dataset, shard_rows
from mpipar.grid import ProcessGrid
from mpipar.model import build_model
from mpipar.parallel.data_parallel import DataParallel, allreduce_gradients
from mpipar.parallel.ring import ring_allreduce
from mpipar.trace import COMPUTE, Tracer
from mpipar.training import TrainConfig, Trainer

BATCH = 12  # divisible by 2, 3 and 4 ranks


def traced(world: Comm) -> tuple[Comm, Tracer]:
    """A communicator over the same ranks whose calls are recorded ("dp" group)."""
    tracer = Tracer(world.rank, enabled=True)
    return Comm(world.mpi, "dp", tracer), tracer


def average(world: Comm, checks: Checks, options: dict) -> None:
    cfg = config()
    x, y = tokens(cfg, BATCH)
    _, want = serial_gradients(cfg, x, y)
    model = build_model(cfg, 1)
    xs, ys = shard_rows(x, world.rank, world.size), shard_rows(y, world.rank, world.size)
    with checks.check("shard_rows"):
        lo = world.rank * BATCH // world.size
        assert np.array_equal(xs, x[lo:lo + BATCH // world.size]), "not this rank's rows"
    model(xs, ys).backward()
    allreduce_gradients(model.parameters(), world)
    with checks.check("average"):
        for p in model.parameters():
            assert_close(p.grad, want[p.name], f"{p.name} after allreduce_gradients")


def ring(world: Comm, checks: Checks, options: dict) -> None:
    n, r = world.size, world.rank
    comm, tracer = traced(world)
    cases = []
    for dtype in (np.float64, np.float32):
        for length in (5 * n, 5 * n + 1, 6 * n - 1, n - 1, 1, 0):
            buf = (np.arange(length) % 7 + 10 * r).astype(dtype)  # integers: any order is exact
            tracer.clear()
            out = ring_allreduce(comm, buf)
            cases.append((dtype, length, buf, out, list(tracer.records)))
    sent = comm.allgather_object([sum(t.nbytes for t in recs) for *_, recs in cases])
    with checks.check("ring_sum"):
        for dtype, length, buf, out, _ in cases:
            want = sum((np.arange(length) % 7 + 10 * q).astype(dtype) for q in range(n))
            assert out is buf, "ring_allreduce must work in place and return its buffer"
            assert np.array_equal(buf, want), f"{np.dtype(dtype).name} length {length}: " \
                f"{buf[:8]} instead of {want[:8]}"
    with checks.check("ring_trace"):
        right = comm.members[(r + 1) % n]
        for i, (dtype, length, buf, _, recs) in enumerate(cases):
            what = f"{np.dtype(dtype).name} length {length}"
            ops = sorted({t.op for t in recs})
            assert ops == ["sendrecv"], f"{what}: the ring made {ops} calls (only sendrecv)"
            assert len(recs) == 2 * (n - 1), f"{what}: {len(recs)} sendrecv, not 2(n−1)"
            assert all(t.peer == right for t in recs), f"{what}: a message not sent right"
            item = np.dtype(dtype).itemsize
            largest = math.ceil(length / n) * item
            assert all(t.nbytes <= largest for t in recs), f"{what}: a message over ⌈L/n⌉"
            total = sum(per_rank[i] for per_rank in sent)
            assert total == 2 * (n - 1) * buf.nbytes, f"{what}: {total} B sent, " \
                f"not 2(n−1)·B = {2 * (n - 1) * buf.nbytes}"
    _ring_average(comm, tracer, checks)


def _ring_average(comm: Comm, tracer: Tracer, checks: Checks) -> None:
    """Real gradients of each rank's shard, summed by the ring and divided by n."""
    n, r = comm.size, comm.rank
    cfg = config()
    x, y = tokens(cfg, BATCH)
    _, want = serial_gradients(cfg, x, y)
    model = build_model(cfg, 1)
    per = BATCH // n
    model(x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]).backward()
    grads = flat(model, {p.name: p.grad for p in model.parameters()})
    tracer.clear()
    ring_allreduce(comm, grads)
    grads /= n
    with checks.check("ring_average"):
        assert_close(grads, flat(model, want), "gradients averaged by the ring")
        assert not [t for t in tracer.records if "allreduce" in t.op], "MPI all-reduce used"


def _step(dp: DataParallel, model, x, y, tracer: Tracer) -> tuple[float, float]:
    """zero_grad, forward, backward (as a traced compute span), finish; the span's extent."""
    dp.zero_grad()
    per = x.shape[0] // dp.comm.size
    rows = slice(dp.comm.rank * per, (dp.comm.rank + 1) * per)
    loss = model(x[rows], y[rows])
    with tracer.span("backward", phase="backward"):
        loss.backward()
    span = [t for t in tracer.records if t.op == COMPUTE][-1]
    dp.finish()
    return span.start, span.end


def buckets(world: Comm, checks: Checks, options: dict) -> None:
    cfg = config()
    x, y = tokens(cfg, BATCH)
    _, want = serial_gradients(cfg, x, y)
    for strategy, overlap in (("per_param", True), ("flat", True), ("bucketed", True),
                              ("bucketed", False)):
        comm, tracer = traced(world)
        model = build_model(cfg, 1)
        dp = DataParallel(model.parameters(), comm, strategy=strategy, bucket_mb=0.01,
                          overlap=overlap)
        tracer.clear()
        start, end = _step(dp, model, x, y, tracer)
        name = f"{strategy}{'' if overlap else '_no_overlap'}"
        with checks.check(name):
            for p in model.parameters():
                assert_close(p.grad, want[p.name], f"{name}: {p.name}")
        calls = [t for t in tracer.records if t.op in ("allreduce", "iallreduce")]
        with checks.check(f"{name}_trace"):
            assert len(calls) == len(dp.buckets), \
                f"{name}: {len(calls)} all-reduces for {len(dp.buckets)} buckets"
            if overlap:
                early = [t for t in calls if t.start < end]
                assert early, f"{name}: no bucket started before backward ended (overlap)"
            else:
                assert all(t.start >= end for t in calls), \
                    f"{name}: a bucket started during backward without overlap"


def accumulate(world: Comm, checks: Checks, options: dict) -> None:
    cfg = config()
    x, y = tokens(cfg, BATCH)
    _, want = serial_gradients(cfg, x, y)
    comm, tracer = traced(world)
    model = build_model(cfg, 1)
    dp = DataParallel(model.parameters(), comm, strategy="bucketed", bucket_mb=0.01)
    dp.zero_grad()
    per = BATCH // world.size
    mine = slice(world.rank * per, (world.rank + 1) * per)
    halves = (slice(mine.start, mine.start + per // 2), slice(mine.start + per // 2, mine.stop))
    tracer.clear()
    for k, rows in enumerate(halves):
        dp.set_sync(k == len(halves) - 1)
        (model(x[rows], y[rows]) * 0.5).backward()
        calls = [t for t in tracer.records if t.op != COMPUTE]
        with checks.check("set_sync"):
            if k == 0:
                assert not calls, f"{len(calls)} calls with sync off: it must only accumulate"
    dp.finish()
    with checks.check("set_sync"):
        for p in model.parameters():
            assert_close(p.grad, want[p.name], f"accumulated {p.name}")
    _train_with_microbatches(world, checks)


TEXT = "".join(f"line {i}: the quick brown fox jumps over a lazy dog.\n" for i in range(40))


def _train(grid: ProcessGrid, tracer: Tracer, microbatches: int) -> tuple[list[float], dict]:
    tok = CharTokenizer.from_text(TEXT)
    cfg = config(vocab_size=tok.vocab_size)
    tc = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=0,
                     microbatches=microbatches, bucket_mb=0.01)
    trainer = Trainer(cfg, tc, grid, make_dataset(TEXT, tok, seq_len=cfg.seq_len), tracer)
    losses = [trainer.train_step()["loss"] for _ in range(tc.steps)]
    return losses, {p.name: p.data.copy() for p in trainer.params}


def _train_with_microbatches(world: Comm, checks: Checks) -> None:
    ref_losses, ref_params = _train(ProcessGrid.single(), Tracer(world.rank), 1)
    tracer = Tracer(world.rank, enabled=True)
    grid = ProcessGrid.build(Comm(world.mpi, "world", tracer), world.size, 1, 1)
    losses, params = _train(grid, tracer, 4)
    with checks.check("microbatches"):
        assert_close(losses, ref_losses, "per-step losses with 4 microbatches")
        for name, value in params.items():
            assert_close(value, ref_params[name], f"{name} after 2 steps")
    with checks.check("microbatches_trace"):
        dp_calls = [t for t in tracer.records if t.group == "dp" and t.phase == "backward"]
        mbs = sorted({t.microbatch for t in dp_calls if t.microbatch is not None})
        assert dp_calls and mbs == [3], f"dp communication in microbatches {mbs}, not just 3"


if __name__ == "__main__":
    main({"average": average, "ring": ring, "buckets": buckets, "accumulate": accumulate})
