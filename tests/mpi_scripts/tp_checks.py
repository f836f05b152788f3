"""Tensor-parallel pieces against the full, 1-process ones: ``mpirun -n T python tp_checks.py``.

The whole world is one tensor-parallel group of T ranks. Every check builds the full layer,
shards it the way a rank does, and compares the rank's outputs and gradient slices with the
full layer's. Inputs are generated from seeds that every rank knows, so each rank can compute
what the others hold without communicating.

Tolerances: integer-valued float64 inputs and weights make every product and partial sum an
exact integer, so the mappings, the linear layers and the embedding must match *exactly*
however the sums are split. Float64 random data (the loss, the head, a whole block with
dropout) is compared at 1e-12 relative: the only difference is the order of the additions.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from verdict import Checks

from mpipar import ops
from mpipar.autograd import Tensor, no_grad
from mpipar.comm import Comm
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPT, Block, GPTConfig, SerialLayers
from mpipar.nn import DropoutKey, Embedding, Linear, Module
from mpipar.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayers,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from mpipar.parallel.tensor_parallel import mappings as M
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

F64 = np.float64
RTOL = 1e-12
B, T = 2, 4  # batch and sequence length of the layer checks (T is a multiple of 4 ranks)


def ints(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Integer values in [-4, 4] as float64: sums of their products are exact."""
    return np.random.default_rng(seed).integers(-4, 5, size=shape).astype(F64)


def normal(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * scale


def exact(what: str, got, want) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.argwhere(got != want)
    assert bad.size == 0, (f"{what}: {len(bad)} elements differ, first at {tuple(bad[0])}: "
                           f"{got[tuple(bad[0])]} vs {want[tuple(bad[0])]}")


def close(what: str, got, want, rtol: float = RTOL) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.max(np.abs(want))), 1e-300)
    err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    assert err <= rtol, f"{what}: differs by {err:.2e} relative to its largest element"


def load_shards(module: Module, full: dict[str, np.ndarray]) -> None:
    """Set every parameter of ``module`` to its slice of ``full`` (padding rows zero)."""
    for name, p in module.named_parameters():
        p.data[...] = 0
        value = full[name] if p.shard_index is None else full[name][p.shard_index]
        p.data[p.local_index] = value


def leaf(a: np.ndarray) -> Tensor:
    return Tensor(a.copy(), requires_grad=True)


def piece(t: int, r: int, n: int) -> slice:
    """Rank r's block of an axis of length n split t ways."""
    return slice(r * n // t, (r + 1) * n // t)


# ---------------------------------------------------------------------------------------------
def check_mappings(checks: Checks, world: Comm) -> None:
    t, r = world.size, world.rank
    shape = (2, 2 * t, 3 * t)
    x_all = [ints(shape, 100 + k) for k in range(t)]  # rank k's input
    g_all = [ints(shape, 200 + k) for k in range(t)]  # rank k's incoming gradient
    blk = [ints((2, 2 * t, 3), 300 + k) for k in range(t)]  # a last-axis block per rank
    seq = [ints((2, 2, 3 * t), 400 + k) for k in range(t)]  # a sequence piece per rank
    last, s = piece(t, r, 3 * t), piece(t, r, 2 * t)

    def run(fn, x_in, g_in):
        x = leaf(x_in)
        y = fn(x, world)
        g = g_in.copy()
        y.backward(g)
        assert np.array_equal(g, g_in), f"{fn.__name__} modified its incoming gradient"
        return y.data, x.grad

    cases = {
        # name: (function, input, incoming gradient, expected output, expected input gradient)
        "copy_to_tensor_parallel_region": (
            M.copy_to_tensor_parallel_region, x_all[r], g_all[r], x_all[r], sum(g_all)),
        "reduce_from_tensor_parallel_region": (
            M.reduce_from_tensor_parallel_region, x_all[r], g_all[r], sum(x_all), g_all[r]),
        "scatter_to_tensor_parallel_region": (
            M.scatter_to_tensor_parallel_region, x_all[0], blk[r], x_all[0][..., last],
            np.concatenate(blk, axis=-1)),
        "gather_from_tensor_parallel_region": (
            M.gather_from_tensor_parallel_region, blk[r], g_all[0],
            np.concatenate(blk, axis=-1), g_all[0][..., piece(t, r, 3 * t)]),
        "scatter_to_sequence_parallel_region": (
            M.scatter_to_sequence_parallel_region, x_all[0], seq[r], x_all[0][:, s],
            np.concatenate(seq, axis=1)),
        "gather_from_sequence_parallel_region": (
            M.gather_from_sequence_parallel_region, seq[r], g_all[r],
            np.concatenate(seq, axis=1), sum(g_all)[:, s]),
        "reduce_scatter_to_sequence_parallel_region": (
            M.reduce_scatter_to_sequence_parallel_region, x_all[r], seq[r], sum(x_all)[:, s],
            np.concatenate(seq, axis=1)),
    }
    for name, (fn, x_in, g_in, want_y, want_gx) in cases.items():
        with checks.check(f"mapping {name}"):
            y, gx = run(fn, x_in, g_in)
            exact(f"{name} forward", y, want_y)
            exact(f"{name} backward", gx, want_gx)


# ---------------------------------------------------------------------------------------------
def check_linears(checks: Checks, world: Comm) -> None:
    t, r = world.size, world.rank
    d_in, d_out = 4 * t, 6 * t  # d_out = 3·(2t): also a valid packed qkv width
    x = ints((B, T, d_in), 1)
    s = piece(t, r, T)
    for sp in (False, True):
        layers = TensorParallelLayers(world, F64, sequence_parallel=sp)
        layout = layers.sequence_layout(T)
        tag = " (sequence parallel)" if sp else ""
        for qkv, gather in ((False, False), (True, False), (False, True)):
            if sp and gather:
                continue
            full = Linear(d_in, d_out, dtype=F64)
            weights = {"weight": ints((d_out, d_in), 2), "bias": ints((d_out,), 3)}
            load_shards(full, weights)
            col = ColumnParallelLinear(layers, d_in, d_out, 0.02, qkv=qkv, gather_output=gather)
            load_shards(col, weights)
            dy = ints((B, T, d_out), 4)
            xs = leaf(x)
            ys = full(xs)
            ys.backward(dy)
            rows = col.weight.shard_index[0]
            xr = leaf(x[:, s] if sp else x)
            y = col(xr, layout)
            y.backward(dy if gather else dy[..., rows])
            name = f"ColumnParallelLinear qkv={qkv} gather_output={gather}{tag}"
            with checks.check(name):
                exact("output", y.data, ys.data if gather else ys.data[..., rows])
                exact("weight grad", col.weight.grad, full.weight.grad[rows])
                exact("bias grad", col.bias.grad, full.bias.grad[rows])
                exact("input grad", xr.grad, xs.grad[:, s] if sp else xs.grad)
                if qkv:  # rank r holds its heads' rows of q, of k and of v, in that order
                    c, n = d_out // 3, d_out // 3 // t
                    want = np.concatenate([np.arange(j * c + r * n, j * c + (r + 1) * n)
                                           for j in range(3)])
                    exact("qkv rows", np.asarray(rows), want)

        for parallel_input in (True, False):
            if sp and not parallel_input:
                continue
            full = Linear(d_in, d_out, dtype=F64)
            weights = {"weight": ints((d_out, d_in), 5), "bias": ints((d_out,), 6)}
            load_shards(full, weights)
            row = RowParallelLinear(layers, d_in, d_out, 0.02, input_is_parallel=parallel_input)
            load_shards(row, weights)
            dy = ints((B, T, d_out), 7)
            xs = leaf(x)
            ys = full(xs)
            ys.backward(dy)
            cols = row.weight.shard_index[1]
            xr = leaf(x[..., cols] if parallel_input else x)
            y = row(xr, layout)
            y.backward(dy[:, s] if sp else dy)
            with checks.check(f"RowParallelLinear input_is_parallel={parallel_input}{tag}"):
                exact("output", y.data, ys.data[:, s] if sp else ys.data)
                exact("weight grad", row.weight.grad, full.weight.grad[:, cols])
                bias_grad = M.all_reduce(row.bias.grad, world) if sp else row.bias.grad
                exact("bias grad (summed over the sequence pieces)" if sp else "bias grad",
                      bias_grad, full.bias.grad)
                exact("input grad", xr.grad, xs.grad[..., cols] if parallel_input else xs.grad)
                assert row.bias.replicated_in_tp and row.bias.shard_index is None


# ---------------------------------------------------------------------------------------------
def check_embedding(checks: Checks, world: Comm) -> None:
    t = world.size
    d = 3
    layers = TensorParallelLayers(world, F64)
    # Never divisible by t; at t = 4, V = t + 1 = 5 leaves rank 3 no real row at all.
    for label, vocab in (("V=t+1", t + 1), ("V=4t+1", 4 * t + 1)):
        idx = np.random.default_rng(vocab).integers(0, vocab, size=(B, 2 * vocab))
        table = ints((vocab, d), 8)
        full = Embedding(vocab, d, dtype=F64)
        load_shards(full, {"weight": table})
        emb = VocabParallelEmbedding(layers, vocab, d)
        emb.initialize(11)
        w = emb.weight
        with checks.check(f"VocabParallelEmbedding {label}: initialised shard and padding"):
            per = -(-vocab // t)
            assert w.shape == (per, d), f"local table {w.shape}, expected ({per}, {d})"
            seeded = Embedding(vocab, d, dtype=F64)
            seeded.initialize(11)
            exact("initial shard", w.data[w.local_index], seeded.weight.data[w.shard_index])
            real = len(range(vocab)[w.shard_index[0]])
            exact("padding rows", w.data[real:], np.zeros((per - real, d)))
        load_shards(emb, {"weight": table})
        dy = ints((B, 2 * vocab, d), 9)
        ys = full(idx)
        ys.backward(dy)
        ws = full.weight
        y = emb(idx)
        y.backward(dy)
        with checks.check(f"VocabParallelEmbedding {label}: output and gradient"):
            exact("output", y.data, ys.data)
            exact("weight grad", w.grad[w.local_index], ws.grad[w.shard_index])
            exact("padding rows' grad", w.grad[real:], np.zeros((per - real, d)))


# ---------------------------------------------------------------------------------------------
def check_cross_entropy(checks: Checks, world: Comm) -> None:
    t, r = world.size, world.rank
    for label, vocab in (("V=4t", 4 * t), ("V=4t+3", 4 * t + 3)):
        per = -(-vocab // t)
        lo, hi = r * per, min((r + 1) * per, vocab)
        z = normal((B, T, vocab), vocab, scale=3.0)
        targets = np.random.default_rng(vocab + 1).integers(0, vocab, size=(B, T))
        targets[0, :2] = [0, vocab - 1]  # the first and last column of the vocabulary
        zs = leaf(z)
        loss_s = ops.cross_entropy(zs, targets)
        loss_s.backward()
        local = np.full((B, T, per), 1e4)  # padding columns hold a huge value: must be masked
        local[..., :hi - lo] = z[..., lo:hi]
        zr = leaf(local)
        loss = vocab_parallel_cross_entropy(zr, targets, lo, vocab, world)
        loss.backward()
        losses = world.allgather_object(float(loss.data))
        with checks.check(f"vocab_parallel_cross_entropy {label}"):
            close("loss", loss.data, loss_s.data)
            assert len(set(losses)) == 1, f"ranks disagree on the loss: {losses}"
            close("logit grad", zr.grad[..., :hi - lo], zs.grad[..., lo:hi])
            exact("padding columns' grad", zr.grad[..., hi - lo:], np.zeros((B, T, per - hi + lo)))


# ---------------------------------------------------------------------------------------------
def check_head(checks: Checks, world: Comm) -> None:
    """The tied head: lm_loss and lm_logits (with and without sequence parallelism)."""
    t, r = world.size, world.rank
    vocab, d = 4 * t + 1, 8
    h = normal((B, T, d), 20)
    table = normal((vocab, d), 21)
    targets = np.random.default_rng(22).integers(0, vocab, size=(B, T))
    serial = SerialLayers(F64)
    whole = serial.sequence_layout(T)
    hs, ws = leaf(h), leaf(table)
    loss_s = serial.lm_loss(hs, ws, targets, whole)
    loss_s.backward()
    logits_s = serial.lm_logits(Tensor(h), Tensor(table), whole).data
    s = piece(t, r, T)
    for sp in (False, True):
        layers = TensorParallelLayers(world, F64, sequence_parallel=sp)
        layout = layers.sequence_layout(T)
        emb = VocabParallelEmbedding(layers, vocab, d)
        load_shards(emb, {"weight": table})
        w = emb.weight
        hr = leaf(h[:, s] if sp else h)
        loss = layers.lm_loss(layers.exit_blocks(hr, layout), w, targets, layout)
        loss.backward()
        with no_grad():
            logits = layers.lm_logits(layers.exit_blocks(Tensor(hr.data), layout), w,
                                      layout).data
        everyone = world.allgather_object(logits)
        tag = " (sequence parallel)" if sp else ""
        with checks.check(f"tied head lm_loss{tag}"):
            close("loss", loss.data, loss_s.data)
            close("hidden-state grad", hr.grad, hs.grad[:, s] if sp else hs.grad)
            close("table grad", w.grad[w.local_index], ws.grad[w.shard_index])
        with checks.check(f"tied head lm_logits{tag}"):
            close("logits", logits, logits_s)
            assert all(np.array_equal(e, logits) for e in everyone), "ranks' logits differ"


# ---------------------------------------------------------------------------------------------
def check_block(checks: Checks, world: Comm) -> None:
    """A whole transformer block (attention and MLP) with dropout on, in float64."""
    t, r = world.size, world.rank
    cfg = GPTConfig(vocab_size=11, n_layer=2, n_head=4, d_model=4 * t, seq_len=T,
                    dropout=0.2, dtype="float64")
    serial = Block(cfg, SerialLayers(F64), 1)
    serial.initialize(5)
    x = normal((B, T, cfg.d_model), 30)
    dy = normal((B, T, cfg.d_model), 31)
    key = DropoutKey(seed=5, step=7, global_batch=B, rows=slice(0, B))
    xs = leaf(x)
    ys = serial(xs, SerialLayers(F64).sequence_layout(T), key)
    ys.backward(dy)
    grads = {n: p.grad for n, p in serial.named_parameters()}
    s = piece(t, r, T)
    for sp in (False, True):
        layers = TensorParallelLayers(world, F64, sequence_parallel=sp)
        block = Block(cfg, layers, 1)
        block.initialize(5)
        block.name_parameters()
        xr = leaf(x[:, s] if sp else x)
        y = block(xr, layers.sequence_layout(T), key)
        y.backward(dy[:, s] if sp else dy)
        layers.sync_replicated_grads(block.parameters())
        with checks.check(f"Block with dropout{' (sequence parallel)' if sp else ''}"):
            close("output", y.data, ys.data[:, s] if sp else ys.data)
            close("input grad", xr.grad, xs.grad[:, s] if sp else xs.grad)
            for name, p in block.named_parameters():
                want = grads[name] if p.shard_index is None else grads[name][p.shard_index]
                close(f"{name} grad", p.grad[p.local_index], want)


# ---------------------------------------------------------------------------------------------
def check_parameters(checks: Checks, world: Comm) -> None:
    """Metadata of a whole tensor-parallel GPT: shapes, slices, coverage, initial values."""
    t = world.size
    cfg = GPTConfig(vocab_size=4 * t + 1, n_layer=2, n_head=4, d_model=4 * t, seq_len=T,
                    dtype="float64")
    serial = GPT(cfg)
    serial.initialize(3)
    full = dict(serial.named_parameters())
    model = GPT(cfg, TensorParallelLayers(world, F64))
    model.initialize(3)
    with checks.check("parameters: full shapes, initial slices, each element on one rank"):
        assert sorted(full) == sorted(n for n, _ in model.named_parameters())
        for name, p in model.named_parameters():
            assert p.full_shape == full[name].shape, f"{name}: full_shape {p.full_shape}"
            if p.replicated_in_tp:
                assert p.shard_index is None, f"{name} is replicated but has a shard_index"
                exact(f"{name} initial value", p.data, full[name].data)
                continue
            exact(f"{name} initial slice", p.data[p.local_index], full[name].data[p.shard_index])
            owned = np.zeros(p.full_shape)
            owned[p.shard_index] += 1
            world.allreduce(owned)
            exact(f"{name}: number of ranks holding each element", owned, np.ones(p.full_shape))


# ---------------------------------------------------------------------------------------------
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n" * 30


def make_trainer(world: Comm, tp: int, sp: bool, cfg: GPTConfig, data) -> Trainer:
    tc = TrainConfig(steps=3, batch_size=4, eval_every=0, sequence_parallel=sp)
    grid = ProcessGrid.build(world, 1, tp, 1) if tp > 1 else ProcessGrid.single()
    return Trainer(cfg, tc, grid, data, world.tracer)


def check_communication(checks: Checks) -> None:
    """Per step: 2 all-reduces per layer forward and 2 backward, of B·T·d·itemsize bytes."""
    world = Comm.world(Tracer(0, enabled=True))
    t = world.size
    tok = CharTokenizer.from_text(TEXT)
    L, bt, d = 2, 4 * 8, 4 * t  # layers, B·T tokens (batch 4, seq_len 8), d_model
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=L, n_head=4, d_model=d, seq_len=8,
                    dtype="float64")
    data = make_dataset(TEXT, tok, seq_len=cfg.seq_len)
    act = bt * d * 8  # bytes of one (B, T, d) float64 activation
    expected = {
        False: {  # (phase, op): (calls, bytes of each call)
            ("forward", "allreduce"): [(2 * L + 1, act), (1, bt * 8), (1, 2 * bt * 8)],
            ("backward", "allreduce"): [(2 * L + 1, act)],
        },
        True: {
            ("forward", "allreduce"): [(1, act), (1, bt * 8), (1, 2 * bt * 8)],
            ("forward", "allgather"): [(2 * L + 1, act // t)],
            ("forward", "reduce_scatter"): [(2 * L, act)],
            ("backward", "reduce_scatter"): [(2 * L + 1, act)],
            ("backward", "allgather"): [(4 * L + 1, act // t)],
            ("backward", "allreduce"): [(1, (6 * L + 2) * d * 8)],  # LayerNorms, row biases
        },
    }
    for sp in (False, True):
        trainer = make_trainer(world, t, sp, cfg, data)
        world.tracer.records.clear()
        trainer.train_step()
        have = Counter((rec.phase, rec.op, rec.nbytes) for rec in world.tracer.records
                       if rec.group == "tp")
        want = Counter({(phase, op, nbytes): calls for (phase, op), rows in expected[sp].items()
                        for calls, nbytes in rows})
        with checks.check(f"tp communication per step{' (sequence parallel)' if sp else ''}"):
            assert have == want, ("calls per (phase, op, bytes) differ: "
                                  f"{sorted(have.items())} != {sorted(want.items())}")


def check_generation(checks: Checks) -> None:
    """Sampling under tp (and sequence parallelism, through lengths tp does not divide)."""
    world = Comm.world(Tracer(0))
    t = world.size
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=4 * t, seq_len=8,
                    dtype="float64")
    data = make_dataset(TEXT, tok, seq_len=cfg.seq_len)
    serial = make_trainer(world, 1, False, cfg, data)
    serial.train_step()
    want = serial.generate([1, 2, 3], 12, temperature=0.8, seed=4)
    idx = np.asarray([[1, 2, 3]])  # T = 3: no tp > 1 divides it
    for sp in (False, True):
        trainer = make_trainer(world, t, sp, cfg, data)
        trainer.train_step()
        got = trainer.generate([1, 2, 3], 12, temperature=0.8, seed=4)
        with no_grad():
            logits = trainer.chunks[0](idx).data
            logits_s = serial.chunks[0](idx).data
        with checks.check(f"generation{' (sequence parallel)' if sp else ''}"):
            assert got == want, f"sampled {got}, the 1-process model sampled {want}"
            close("logits of a length-3 prompt", logits, logits_s, rtol=1e-10)


def main() -> None:
    world = Comm.world(Tracer(0))
    checks = Checks(world)
    check_mappings(checks, world)
    check_linears(checks, world)
    check_embedding(checks, world)
    check_cross_entropy(checks, world)
    check_head(checks, world)
    check_block(checks, world)
    check_parameters(checks, world)
    check_communication(checks)
    check_generation(checks)
    checks.report()


if __name__ == "__main__":
    main()
