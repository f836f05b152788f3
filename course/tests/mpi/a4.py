"""A4 tensor parallelism, the MPI side: ``mpirun -n N python a4.py <group> '<options>'``.

Groups (one per task); every result is compared with the 1-process layer or model, whose
parameters are the same seeded full arrays of which each rank holds its shard:

* ``mappings`` (A4.1): f and g on integer-valued arrays (sums exact in any order), and
  which direction of each made an all-reduce;
* ``layers`` (A4.2): column- and row-parallel linear layers (outputs, dx, dW, db), the packed
  qkv layout, the MLP pair; a whole GPT step, whose trace must hold 2L + 1 all-reduces of a
  (B, T, d) activation in forward and 2L + 1 in backward;
* ``vocab_loss`` (A4.3): the vocab-parallel cross-entropy's loss and gradient, padding
  columns included, and no message anywhere near the size of the logits;
* ``sequence`` (A4.4): the sequence-parallel all-gather / reduce-scatter pair and a whole
  GPT step with sequence parallelism.
"""

from __future__ import annotations

import numpy as np
from checks import Checks, assert_close, config, main, tokens

from mpipar import ops
from mpipar.autograd import Tensor
from mpipar.comm import Comm
from mpipar.model import GPT, build_model
from mpipar.nn import Linear
from mpipar.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mpipar.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayers,
)
from mpipar.parallel.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from mpipar.trace import Tracer

B, T = 2, 8


def traced(world: Comm) -> tuple[Comm, Tracer]:
    tracer = Tracer(world.rank, enabled=True)
    return Comm(world.mpi, "tp", tracer), tracer


def calls(tracer: Tracer, phase: str, op: str | None = None) -> list:
    return [t for t in tracer.records if t.phase == phase and (op is None or t.op == op)]


def ints(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-5, 6, size=shape).astype(np.float64)


def mappings(world: Comm, checks: Checks, options: dict) -> None:
    comm, tracer = traced(world)
    n, r = world.size, world.rank
    shape = (B, T, 4)
    for name, fn, forward_sum in (("f", copy_to_tensor_parallel_region, False),
                                  ("g", reduce_from_tensor_parallel_region, True)):
        tracer.clear()
        x = Tensor(ints(shape, 10 + r), requires_grad=True)
        with tracer.context(phase="forward"):
            y = fn(x, comm)
        grad = ints(shape, 20 + r)
        with tracer.context(phase="backward"):
            y.backward(grad)
        x_sum = sum(ints(shape, 10 + q) for q in range(n))
        g_sum = sum(ints(shape, 20 + q) for q in range(n))
        with checks.check(name):
            np.testing.assert_array_equal(y.data, x_sum if forward_sum else ints(shape, 10 + r),
                                          err_msg=f"{name} forward")
            np.testing.assert_array_equal(x.grad, grad if forward_sum else g_sum,
                                          err_msg=f"{name} backward")
        with checks.check(f"{name}_trace"):
            fwd, bwd = len(calls(tracer, "forward")), len(calls(tracer, "backward"))
            want = (1, 0) if forward_sum else (0, 1)
            assert (fwd, bwd) == want, f"{name}: {fwd} calls forward and {bwd} backward, " \
                f"expected {want[0]} and {want[1]} all-reduce"


def _column_rows(d_out: int, t: int, r: int, qkv: bool) -> np.ndarray:
    if not qkv:
        return np.arange(r * d_out // t, (r + 1) * d_out // t)
    c = d_out // 3
    return np.concatenate([j * c + np.arange(r * c // t, (r + 1) * c // t) for j in range(3)])


def layers_group(world: Comm, checks: Checks, options: dict) -> None:
    comm, tracer = traced(world)
    t, r = world.size, world.rank
    layers = TensorParallelLayers(comm, np.float64)
    rng = np.random.default_rng(0)
    for qkv in (False, True):
        d_in, d_out = 6, 24
        col = ColumnParallelLinear(layers, d_in, d_out, 0.02, qkv=qkv)
        serial = Linear(d_in, d_out, dtype=np.float64)
        for m in (col, serial):
            m.initialize(3)
        rows = _column_rows(d_out, t, r, qkv)
        x, gy = rng.standard_normal((B, T, d_in)), rng.standard_normal((B, T, d_out))
        xt, xs = Tensor(x, requires_grad=True), Tensor(x, requires_grad=True)
        tracer.clear()
        with tracer.context(phase="forward"):
            y = col(xt, layers.sequence_layout(T))
        with tracer.context(phase="backward"):
            y.backward(gy[..., rows])
        ys = serial(xs)
        ys.backward(gy)
        name = "column_qkv" if qkv else "column"
        with checks.check(name):
            assert_close(y.data, ys.data[..., rows], f"{name}: this rank's output features")
            assert_close(xt.grad, xs.grad, f"{name}: dL/dx (complete, on every rank)")
            assert_close(col.weight.grad, serial.weight.grad[rows], f"{name}: dW rows")
            assert_close(col.bias.grad, serial.bias.grad[rows], f"{name}: db")
        with checks.check(f"{name}_trace"):
            counts = (len(calls(tracer, "forward")), len(calls(tracer, "backward")))
            assert counts == (0, 1), f"{name}: {counts} calls (forward, backward), not (0, 1)"
    _row(comm, tracer, layers, checks, rng)
    _gpt_step(world, checks, sequence_parallel=False)


def _row(comm: Comm, tracer: Tracer, layers, checks: Checks, rng) -> None:
    t, r = comm.size, comm.rank
    d_in, d_out = 8, 6
    row = RowParallelLinear(layers, d_in, d_out, 0.02)
    serial = Linear(d_in, d_out, dtype=np.float64)
    for m in (row, serial):
        m.initialize(4)
    cols = slice(r * d_in // t, (r + 1) * d_in // t)
    x, gy = rng.standard_normal((B, T, d_in)), rng.standard_normal((B, T, d_out))
    xt, xs = Tensor(x[..., cols].copy(), requires_grad=True), Tensor(x, requires_grad=True)
    tracer.clear()
    with tracer.context(phase="forward"):
        y = row(xt, layers.sequence_layout(T))
    with tracer.context(phase="backward"):
        y.backward(gy)
    ys = serial(xs)
    ys.backward(gy)
    with checks.check("row"):
        assert_close(y.data, ys.data, "row: the output (complete, on every rank)")
        assert_close(xt.grad, xs.grad[..., cols], "row: dL/dx of this rank's input block")
        assert_close(row.weight.grad, serial.weight.grad[:, cols], "row: dW columns")
        assert_close(row.bias.grad, serial.bias.grad, "row: db")
    with checks.check("row_trace"):
        counts = (len(calls(tracer, "forward")), len(calls(tracer, "backward")))
        assert counts == (1, 0), f"row: {counts} calls (forward, backward), not (1, 0)"


def _gpt_step(world: Comm, checks: Checks, sequence_parallel: bool) -> None:
    """One forward and backward of a GPT, logits gathered and the loss computed whole."""
    comm, tracer = traced(world)
    cfg = config(n_head=4, vocab_size=12)
    layers = TensorParallelLayers(comm, np.float64, sequence_parallel=sequence_parallel)
    model = GPT(cfg, layers)
    model.initialize(1)
    serial = build_model(cfg, 1)
    x, y = tokens(cfg, B)
    with tracer.context(phase="forward"):
        loss = ops.cross_entropy(model(x), y)
    with tracer.context(phase="backward"):
        loss.backward()
        layers.sync_replicated_grads(model.parameters())
    want = ops.cross_entropy(serial(x), y)
    want.backward()
    reference = {p.name: p.grad for p in serial.parameters()}
    name = "gpt_sequence_parallel" if sequence_parallel else "gpt"
    with checks.check(name):
        assert_close(loss.data, want.data, f"{name}: loss")
        for p in model.parameters():
            full = reference[p.name] if p.shard_index is None else reference[p.name][
                p.shard_index]
            assert_close(p.grad[p.local_index], full, f"{name}: gradient of {p.name}")
    if sequence_parallel:
        return
    with checks.check("gpt_trace"):
        act = (B, T, cfg.d_model)
        for phase in ("forward", "backward"):
            n = len([c for c in calls(tracer, phase, "allreduce") if c.shape == act])
            assert n == 2 * cfg.n_layer + 1, f"{n} all-reduces of a {act} activation in " \
                f"{phase}, not 2L + 1 = {2 * cfg.n_layer + 1}"


def vocab_loss(world: Comm, checks: Checks, options: dict) -> None:
    comm, tracer = traced(world)
    t, r = world.size, world.rank
    vocab = 11
    per = -(-vocab // t)
    lo = r * per
    real = max(0, min(per, vocab - lo))
    rng = np.random.default_rng(5)
    logits = 3.0 * rng.standard_normal((B, T, vocab))
    targets = rng.integers(0, vocab, size=(B, T))
    local = np.full((B, T, per), 50.0)  # padding columns: large, so only masking hides them
    local[..., :real] = logits[..., lo:lo + real]
    z = Tensor(local, requires_grad=True)
    tracer.clear()
    with tracer.context(phase="forward"):
        loss = vocab_parallel_cross_entropy(z, targets, lo, vocab, comm)
    with tracer.context(phase="backward"):
        loss.backward()
    zs = Tensor(logits, requires_grad=True)
    want = ops.cross_entropy(zs, targets)
    want.backward()
    with checks.check("vocab_loss"):
        assert_close(loss.data, want.data, "loss over the split vocabulary")
        assert_close(z.grad[..., :real], zs.grad[..., lo:lo + real], "dL/dz of this rank's "
                     "columns")
        assert np.all(z.grad[..., real:] == 0), "padding columns got a gradient"
    with checks.check("vocab_loss_trace"):
        records = tracer.records
        n_pos = B * T
        assert not [c for c in records if c.op == "allgather"], "the logits were gathered"
        assert not calls(tracer, "backward"), "backward communicated (it needs nothing)"
        biggest = max((c.nbytes for c in records), default=0)
        assert biggest <= 2 * n_pos * 8, f"a message of {biggest} B; the loss needs at " \
            f"most 2 numbers per position ({2 * n_pos * 8} B)"
        total = sum(c.nbytes for c in records)
        assert total <= 3 * n_pos * 8, f"{total} B sent, more than 3 numbers per position"


def sequence(world: Comm, checks: Checks, options: dict) -> None:
    comm, _ = traced(world)
    n, r = world.size, world.rank
    piece = slice(r * T // n, (r + 1) * T // n)
    x = Tensor(ints((B, T // n, 4), 30 + r), requires_grad=True)
    y = gather_from_sequence_parallel_region(x, comm)
    g = ints((B, T, 4), 40 + r)
    y.backward(g)
    with checks.check("sequence_gather"):
        whole = np.concatenate([ints((B, T // n, 4), 30 + q) for q in range(n)], axis=1)
        np.testing.assert_array_equal(y.data, whole, err_msg="all-gather along the sequence")
        g_sum = sum(ints((B, T, 4), 40 + q) for q in range(n))
        np.testing.assert_array_equal(x.grad, g_sum[:, piece], err_msg="backward: "
                                      "reduce-scatter along the sequence")
    x = Tensor(ints((B, T, 4), 50 + r), requires_grad=True)
    y = reduce_scatter_to_sequence_parallel_region(x, comm)
    g = ints((B, T // n, 4), 60 + r)
    y.backward(g)
    with checks.check("sequence_reduce_scatter"):
        x_sum = sum(ints((B, T, 4), 50 + q) for q in range(n))
        np.testing.assert_array_equal(y.data, x_sum[:, piece], err_msg="reduce-scatter")
        whole = np.concatenate([ints((B, T // n, 4), 60 + q) for q in range(n)], axis=1)
        np.testing.assert_array_equal(x.grad, whole, err_msg="backward: all-gather")
    _gpt_step(world, checks, sequence_parallel=True)


if __name__ == "__main__":
    main({"mappings": mappings, "layers": layers_group, "vocab_loss": vocab_loss,
          "sequence": sequence})
