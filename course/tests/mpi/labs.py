"""The break-it labs' detectors, MPI side: ``mpirun -n N python labs.py <group>``.

Each check looks at one thing only, so that it catches its own lab's bug and no other lab's:
the other labs' code is either not run by it or run where their bug cannot show (a vocabulary
tp divides, one microbatch, no dropout, MPI's all-reduce instead of the ring).

* ``two`` (2 ranks): the data-parallel average (L01); g's backward, through a row-parallel
  layer (L04); f before a column-parallel layer (L05); the tied embedding's gradient after
  the trainer's gradient steps at pp 2 (L06); each microbatch's loss scaled by 1/M in the
  pipeline executor (L07); each element counted once in the gradient norm at tp 2 (L09);
  the vocabulary offsets of an embedding tp does not divide (L10); ring attention's output
  and gradient against the whole sequence's, cp 2 (L11);
  the vocabulary offsets of an embedding tp does not divide (L10); the experts' gradients under
  expert parallelism, ep 2 (L12);
* ``ring3`` (3 ranks): the ring all-reduce's sums (L02);
* ``zb3`` (3 ranks): the zero-bubble schedule's gradients equal 1F1B's at pp 3 (L13);
* ``eager`` (2 ranks): a ring all-reduce of 8 MB, far above any eager limit, finishes (L03).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from checks import (
    Checks,
    assert_close,
    config,
    main,
    pipeline_chunks,
    serial_gradients,
    tokens,
)

from mpipar import fused
from mpipar.autograd import Tensor
from mpipar.comm import Comm
from mpipar.course import flight
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import build_model
from mpipar.nn import DropoutKey, Embedding, Linear
from mpipar.parallel.context_parallel import ContextParallel
from mpipar.parallel.data_parallel import DataParallel
from mpipar.parallel.pipeline.executor import PipelineExecutor
from mpipar.parallel.ring import ring_allreduce
from mpipar.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayers,
    VocabParallelEmbedding,
)
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

BATCH = 8
TEXT = "".join(f"line {i}: the quick brown fox jumps over a lazy dog.\n" for i in range(40))


def dp_average(world: Comm, checks: Checks) -> None:
    cfg = config()
    x, y = tokens(cfg, BATCH)
    _, want = serial_gradients(cfg, x, y)
    model = build_model(cfg, 1)
    dp = DataParallel(model.parameters(), world, strategy="flat")
    dp.zero_grad()
    per = BATCH // world.size
    rows = slice(world.rank * per, (world.rank + 1) * per)
    model(x[rows], y[rows]).backward()
    dp.finish()
    with checks.check("dp_average"):
        for p in model.parameters():
            assert_close(p.grad, want[p.name], f"{p.name}: not the average of the shards")


def _linear_pair(layer, serial: Linear, x_local, x, gy_local, gy, layout):
    xt, xs = Tensor(x_local, requires_grad=True), Tensor(x, requires_grad=True)
    layer(xt, layout).backward(gy_local)
    serial(xs).backward(gy)
    return xt.grad, xs.grad


def tp_layers(world: Comm, checks: Checks) -> None:
    t, r = world.size, world.rank
    layers = TensorParallelLayers(world, np.float64)
    layout = layers.sequence_layout(4)
    rng = np.random.default_rng(0)
    x, gy = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    part = slice(r * 8 // t, (r + 1) * 8 // t)
    row, serial = RowParallelLinear(layers, 8, 8, 0.02), Linear(8, 8, dtype=np.float64)
    row.initialize(2)
    serial.initialize(2)
    dx, want = _linear_pair(row, serial, x[..., part].copy(), x, gy, gy, layout)
    with checks.check("row_backward"):
        assert_close(dx, want[..., part], "row-parallel dL/dx (g's backward)")
        assert_close(row.weight.grad, serial.weight.grad[:, part], "row-parallel dL/dW")
    col, serial = ColumnParallelLinear(layers, 8, 8, 0.02), Linear(8, 8, dtype=np.float64)
    col.initialize(3)
    serial.initialize(3)
    dx, want = _linear_pair(col, serial, x, x, gy[..., part].copy(), gy, layout)
    with checks.check("column_backward"):
        assert_close(dx, want, "column-parallel dL/dx (f's backward)")


def _trainer(grid: ProcessGrid, vocab_even: bool = False, **train) -> Trainer:
    tok = CharTokenizer.from_text(TEXT)
    vocab = tok.vocab_size + (tok.vocab_size % 2 if vocab_even else 0)
    cfg = config(vocab_size=vocab, n_layer=2)
    tc = TrainConfig(steps=2, batch_size=BATCH, lr=1e-2, warmup_steps=1, eval_every=0, **train)
    return Trainer(cfg, tc, grid, make_dataset(TEXT, tok, seq_len=cfg.seq_len),
                   Tracer(grid.world.rank))


def tied_embedding(world: Comm, checks: Checks) -> None:
    serial = _trainer(ProcessGrid.single())
    x, y = tokens(serial.cfg, BATCH)
    serial.zero_grad()
    serial.forward_backward(0, x, y)
    want = {p.name: p.grad for p in serial.params}
    trainer = _trainer(ProcessGrid.build(world, 1, 1, world.size), microbatches=1)
    trainer.zero_grad()
    trainer.forward_backward(0, x, y)
    trainer.finish_gradients()
    with checks.check("tied_embedding"):
        for p in (p for p in trainer.params if p.tied_embedding):
            assert_close(p.grad, want[p.name], "wte's gradient after the gradient steps")


def pipelined_step(world: Comm, cfg, schedule: str) -> tuple[list, np.ndarray, np.ndarray]:
    """One step of 4 microbatches at pp = world size: (this rank's chunks, the batch x, y)."""
    grid = ProcessGrid.build(world, 1, 1, world.size)
    tc = SimpleNamespace(schedule=schedule, microbatches=4, virtual_stages=1)
    chunks = pipeline_chunks(cfg, grid, 1)
    ex = PipelineExecutor(chunks, grid, tc, Tracer(world.rank))
    x, y = tokens(cfg, BATCH)
    rows = [slice(k * 2, (k + 1) * 2) for k in range(4)]
    ex.train_step([x[r] for r in rows], [y[r] for r in rows],
                  [DropoutKey(1, 0, BATCH, r) for r in rows])
    return chunks, x, y


def microbatch_scaling(world: Comm, checks: Checks) -> None:
    cfg = config(n_layer=2)
    chunks, x, y = pipelined_step(world, cfg, "naive")
    _, want = serial_gradients(cfg, x, y)
    with checks.check("microbatch_scaling"):
        for p in (p for c in chunks for p in c.parameters() if not p.tied_embedding):
            assert_close(p.grad, want[p.name], f"{p.name} over 4 microbatches")


def grad_norm_counts_once(world: Comm, checks: Checks) -> None:
    trainer = _trainer(ProcessGrid.build(world, 1, world.size, 1), vocab_even=True)
    for p in trainer.params:
        p.grad = np.zeros_like(p.data)
        p.grad[p.local_index] = 1.0
    full = sum(int(np.prod(p.full_shape)) for p in build_model(trainer.cfg, 1).parameters())
    got = trainer.global_grad_norm_sq()
    with checks.check("grad_norm_counts_once"):
        assert got == full, f"Σg² = {got:g} with every gradient element 1: the model has " \
            f"{full} elements (each must count once)"


def vocab_offset(world: Comm, checks: Checks) -> None:
    layers = TensorParallelLayers(world, np.float64)
    emb = VocabParallelEmbedding(layers, 13, 4)
    serial = Embedding(13, 4, dtype=np.float64)
    emb.initialize(5)
    serial.initialize(5)
    idx = np.arange(26).reshape(2, 13) % 13
    with checks.check("vocab_offset"):
        assert_close(emb(idx).data, serial(idx).data, "embedding rows, vocabulary 13 over tp 2")


def ring_attention_gradient(world: Comm, checks: Checks) -> None:
    context = ContextParallel(ProcessGrid.build(world, 1, 1, 1, cp=world.size).cp_comm)
    rng = np.random.default_rng(3)
    qkv, dy = rng.standard_normal((2, 16, 24)), rng.standard_normal((2, 16, 8))
    whole = Tensor(qkv, requires_grad=True)
    (fused.CausalAttention.apply(whole, n_head=2) * Tensor(dy)).sum().backward()
    mine = context.positions(16 // world.size)
    local = Tensor(np.ascontiguousarray(qkv[:, mine]), requires_grad=True)
    y = context.attention(local, 2)
    (y * Tensor(dy[:, mine])).sum().backward()
    with checks.check("ring_attention_gradient"):
        assert_close(local.grad, whole.grad[:, mine], "d(qkv) of this rank's tokens, cp 2")
def expert_gradients(world: Comm, checks: Checks) -> None:
    """The experts' gradients at dp 2 × ep 2 after the trainer's gradient steps (dense
    weights are left out: they are L01's)."""
    def moe_trainer(grid: ProcessGrid, ep: int) -> Trainer:
        tok = CharTokenizer.from_text(TEXT)
        cfg = config(vocab_size=tok.vocab_size, n_layer=1, n_expert=4, capacity_factor=1.0)
        tc = TrainConfig(steps=1, batch_size=BATCH, eval_every=0, ep=ep)
        return Trainer(cfg, tc, grid, make_dataset(TEXT, tok, seq_len=cfg.seq_len),
                       Tracer(grid.world.rank))

    serial = moe_trainer(ProcessGrid.single(), 1)
    x, y = tokens(serial.cfg, BATCH)
    serial.zero_grad()
    serial.forward_backward(0, x, y)
    want = {p.name: p.grad for p in serial.params}
    trainer = moe_trainer(ProcessGrid.build(world, world.size, 1, 1), world.size)
    trainer.zero_grad()
    trainer.forward_backward(0, x, y)
    trainer.finish_gradients()
    with checks.check("expert_gradients"):
        for p in (p for p in trainer.params if p.data_replica is not None):
            assert_close(p.grad, want[p.name], f"{p.name} at dp {world.size} × ep {world.size}")


def _executor_gradients(world: Comm, schedule: str) -> dict[str, np.ndarray]:
    """This rank's gradients after one pipelined step of 4 microbatches at pp = world size."""
    chunks, _, _ = pipelined_step(world, config(n_layer=world.size), schedule)
    return {p.name: p.grad.copy() for c in chunks for p in c.parameters()}


def zero_bubble_weights(world: Comm, checks: Checks) -> None:
    """ZB-H1 computes 1F1B's operations, only its W's later: the same gradients, whatever the
    rest of the executor does (so the other labs' bugs, shared by both, do not show here)."""
    want = _executor_gradients(world, "1f1b")
    got = _executor_gradients(world, "zb-h1")
    with checks.check("zb_weights"):
        for name, g in want.items():
            assert_close(got[name], g, f"{name} under zb-h1 against 1f1b at pp {world.size}")


def zb3(world: Comm, checks: Checks, options: dict) -> None:
    zero_bubble_weights(world, checks)


def two(world: Comm, checks: Checks, options: dict) -> None:
    dp_average(world, checks)
    tp_layers(world, checks)
    tied_embedding(world, checks)
    microbatch_scaling(world, checks)
    grad_norm_counts_once(world, checks)
    vocab_offset(world, checks)
    ring_attention_gradient(world, checks)
    expert_gradients(world, checks)


def ring3(world: Comm, checks: Checks, options: dict) -> None:
    n, r = world.size, world.rank
    for length in (5 * n, 3 * n):  # chunks of one size: a wrong chunk shows as a wrong sum
        buf = (np.arange(length) % 5 + 10 * r).astype(np.float64)
        ring_allreduce(world, buf)
        with checks.check("ring3"):
            want = sum((np.arange(length) % 5 + 10 * q).astype(np.float64) for q in range(n))
            np.testing.assert_array_equal(buf, want, err_msg=f"ring sum, length {length}")


def eager(world: Comm, checks: Checks, options: dict) -> None:
    buf = np.full(1_000_000, float(world.rank + 1))  # 8 MB: rendezvous in any MPI
    world.barrier()
    with flight.deadline(5.0, "a ring all-reduce of 8 MB on 2 ranks"):
        ring_allreduce(world, buf)
    with checks.check("ring_large"):
        assert np.all(buf == sum(range(1, world.size + 1))), "wrong sum"


if __name__ == "__main__":
    main({"two": two, "ring3": ring3, "eager": eager, "zb3": zb3})
