"""Mixed precision on one process: the policy, the casts, 16-bit ops, loss scaling, masters.

The parallel side (the overflow vote over ranks, halved gradient bytes, parallel runs equal
to the 1-process run, bfloat16 collectives) is ``test_precision_parallel.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpipar import ops
from mpipar.autograd import Tensor
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.master_weights import MasterWeights
from mpipar.model import GPTConfig
from mpipar.nn import Init, Parameter
from mpipar.optim import SGD
from mpipar.parallel.zero import memory_report
from mpipar.precision import (
    BFLOAT16,
    FLOAT16,
    LossScaler,
    matmul,
    resolve_precision,
    sum_rows,
)
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

HALVES = {"fp16": FLOAT16, "bf16": BFLOAT16}
# One unit in the last place, relative: 11 bits of precision in fp16, 8 in bf16.
UNIT = {"fp16": 2.0**-11, "bf16": 2.0**-8}


# --------------------------------------------------------------------------------------------
# The policy and the casts
# --------------------------------------------------------------------------------------------
def test_policy_compute_dtypes_and_the_refused_combination():
    assert resolve_precision("fp32", "float64").compute == np.float64
    assert not resolve_precision("fp32", "float32").half
    fp16, bf16 = resolve_precision("fp16", "float32"), resolve_precision("bf16", "float32")
    assert (fp16.compute, bf16.compute) == (FLOAT16, BFLOAT16)
    assert fp16.loss_scaling and not bf16.loss_scaling
    with pytest.raises(ValueError, match="--dtype float64 is the exactness mode"):
        resolve_precision("bf16", "float64")


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_matmul_accumulates_in_fp32_and_rounds_once(name):
    """A tensor core's contract: 16-bit inputs, exact fp32 products, fp32 sums, one rounding."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 300)).astype(HALVES[name])
    b = rng.standard_normal((300, 32)).astype(HALVES[name])
    out = matmul(a, b)
    assert out.dtype == HALVES[name]
    want = (a.astype(np.float32) @ b.astype(np.float32)).astype(HALVES[name])
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    x = rng.standard_normal((4, 4)).astype(np.float32)
    np.testing.assert_array_equal(matmul(x, x), x @ x)  # float32 is multiplied as it is


def test_sum_rows_does_not_stall_where_a_16_bit_sum_would():
    """4096 ones: a running bf16 sum stops at 256 (256 + 1 rounds back to 256, 8 bits);
    accumulated in fp32 and rounded once, the sum is exact."""
    ones = np.ones((4096, 3), dtype=BFLOAT16)
    running = np.zeros(3, dtype=BFLOAT16)
    for row in ones[:300]:
        running += row
    assert float(running[0]) == 256.0
    assert sum_rows(ones, axis=0).dtype == BFLOAT16
    np.testing.assert_array_equal(sum_rows(ones, axis=0).astype(np.float32), [4096.0] * 3)


# --------------------------------------------------------------------------------------------
# 16-bit operations: dtypes in and out, and values against fp32
# --------------------------------------------------------------------------------------------
def _linear(a):
    return ops.linear(a["x"], a["w"], a["b"])


def _layer_norm(a):
    return ops.layer_norm(a["x"], a["w"], a["b"])


def _attention(a):
    return ops.causal_attention(a["qkv"], 2)


def _embedding_plus_gelu(a):
    return ops.gelu(ops.embedding(a["w"], np.array([[0, 3, 3, 1], [2, 3, 0, 0]])) + a["x"])


OP_CASES = {
    "linear": (_linear, {"x": (2, 5, 8), "w": (6, 8), "b": (6,)}),
    "layer_norm": (_layer_norm, {"x": (2, 5, 8), "w": (8,), "b": (8,)}),
    "attention": (_attention, {"qkv": (2, 6, 12)}),
    "embedding, add, gelu": (_embedding_plus_gelu, {"w": (4, 8), "x": (2, 4, 8)}),
}


def _run(fn, arrays, dtype, seed=1):
    """fn on tensors of ``dtype``; (output, {name: gradient}) for a fixed random dL/dy."""
    inputs = {k: Tensor(v.astype(dtype), requires_grad=True) for k, v in arrays.items()}
    out = fn(inputs)
    g = np.random.default_rng(seed).standard_normal(out.shape).astype(dtype)
    out.backward(g)
    return out, {k: t.grad for k, t in inputs.items()}


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_16_bit_ops_keep_the_dtype_and_match_fp32(name, case):
    """Outputs and gradients stay 16-bit, and are fp32's results on the same (16-bit) inputs
    to within a few units in the last place: the ops compute in fp32 and round once or twice
    (a unit is 2⁻¹¹ in fp16, 2⁻⁸ in bf16, relative to the largest magnitude; measured: at most
    1.4 units)."""
    fn, shapes = OP_CASES[case]
    rng = np.random.default_rng(0)
    half = HALVES[name]
    arrays = {k: rng.standard_normal(s).astype(half) for k, s in shapes.items()}
    out, grads = _run(fn, arrays, half)
    ref_out, ref_grads = _run(fn, {k: v.astype(np.float32) for k, v in arrays.items()},
                              np.float32)
    pairs = [("output", out.data, ref_out.data)] + [
        (f"d/d{k}", grads[k], ref_grads[k]) for k in shapes]
    for what, got, want in pairs:
        assert got.dtype == half, f"{case} {what}: {got.dtype}, expected {half}"
        err = np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want))
        assert err <= 4 * UNIT[name], f"{case} {what}: {err:.2e} > 4 units ({name})"


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_cross_entropy_of_16_bit_logits_is_an_fp32_loss(name):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 4, 10)).astype(HALVES[name])
    targets = rng.integers(0, 10, (3, 4))
    z = Tensor(logits, requires_grad=True)
    loss = ops.cross_entropy(z, targets)
    ref = ops.cross_entropy(Tensor(logits.astype(np.float32)), targets)
    assert loss.dtype == np.float32 and float(loss.data) == float(ref.data)
    loss.backward()
    assert z.grad.dtype == HALVES[name]


# --------------------------------------------------------------------------------------------
# Loss scaling and master weights
# --------------------------------------------------------------------------------------------
def test_loss_scaler_halves_on_overflow_and_doubles_after_clean_steps():
    s = LossScaler(scale=8.0, growth_interval=3)
    trajectory = []
    for overflow in [False, False, True, False, False, False, False, True]:
        s.update(overflow)
        trajectory.append(s.scale)
    assert trajectory == [8, 8, 4, 4, 4, 8, 8, 4]
    restored = LossScaler()
    restored.load_state_dict(s.state_dict())
    assert (restored.scale, restored.good_steps) == (4.0, 0)
    low = LossScaler(scale=1.0)
    low.update(True)
    assert low.scale == 1.0  # never below 1


def test_masters_keep_the_updates_16_bit_weights_round_away():
    """100 SGD steps of 1e-4 on a weight of 1: each is below half a bf16 unit (2⁻⁹), so a
    bf16 weight never moves; the fp32 master reaches 0.99 and the model follows it."""
    direct = Parameter((1,), Init("ones"), BFLOAT16)
    direct.name, direct.data[...] = "w", 1.0
    model = Parameter((1,), Init("ones"), BFLOAT16)
    model.name = "w"
    masters = MasterWeights.build([model], seed=0, dtype=np.float32,
                                  make_inner=lambda ps: SGD(ps, lr=1e-4))
    plain = SGD([direct], lr=1e-4)
    for _ in range(100):
        direct.grad = np.ones(1, dtype=BFLOAT16)
        plain.step()
        model.grad = np.ones(1, dtype=BFLOAT16)
        masters.unscale(1.0)
        masters.step()
    assert float(direct.data[0]) == 1.0
    assert masters.masters[0].data[0] == pytest.approx(0.99, abs=1e-5)  # fp32 sums
    assert float(model.data[0]) == float(masters.masters[0].data.astype(BFLOAT16)[0]) < 1.0


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
TEXT = "the quick brown fox jumps over the lazy dog. " * 60


def _trainer(precision, steps=6, **changes):
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, seq_len=16)
    tc = TrainConfig(steps=steps, batch_size=8, warmup_steps=2, eval_every=0,
                     precision=precision, **changes)
    return Trainer(cfg, tc, ProcessGrid.single(), make_dataset(TEXT, tok, seq_len=16),
                   Tracer(0))


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_mixed_precision_tracks_fp32(name):
    """40 steps at lr 3e-3 (warmup 2): the 16-bit run's loss follows the fp32 run's.

    The first step sees the same weights (rounded to 16 bits) and data: its loss agrees
    within one 16-bit unit (measured: under 0.01 of one). The runs then drift apart as any two
    runs with different rounding do; over three seeds the mean loss of the last 10 steps
    differed by at most 3e-4 nats (bf16) and 5e-5 (fp16) while it fell by 1.5; the bound is
    0.01. `bench/bench_precision.py` measures 300 steps of the small preset.
    """
    runs = {p: [m["loss"] for m in _loop(_trainer(p, steps=40))] for p in ("fp32", name)}
    ref, got = np.array(runs["fp32"]), np.array(runs[name])
    assert abs(got[0] - ref[0]) <= UNIT[name] * ref[0], (got[0], ref[0])
    assert ref[0] - ref[-10:].mean() > 1.0, "the fp32 run did not learn"
    assert abs(got[-10:].mean() - ref[-10:].mean()) < 0.01, (got[-10:], ref[-10:])


def _loop(trainer):
    return [trainer.train_step() for _ in range(trainer.tc.steps)]


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_sixteen_bytes_per_parameter(name):
    """AdamW keeps 16 bytes per parameter either way: fp32 4 + 4 + 8 (weights, gradients,
    m and v); mixed 2 + 2 + 12 (16-bit weights and gradients; fp32 master, m, v)."""
    trainer = _trainer(name)
    trainer.train_step()
    r = memory_report(trainer.optimizer, trainer.grad_sync, trainer.params)
    n = r["params"]
    item = trainer.precision.compute.itemsize
    assert item == (4 if name == "fp32" else 2)
    assert (r["grad_bytes"], r["optimizer_state_bytes"]) == (item * n, (16 - 2 * item) * n)


def test_an_overflow_skips_the_step_and_halves_the_scale():
    trainer = _trainer("fp16", steps=4)
    finish = trainer.finish_gradients
    seen = {}

    def finish_with_inf():
        finish()
        seen[trainer.step] = [m.data.copy() for m in trainer.optimizer.masters]
        if trainer.step == 1:
            trainer.params[0].grad[0, 0] = np.inf

    trainer.finish_gradients = finish_with_inf
    records = _loop(trainer)
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert [r["loss_scale"] for r in records] == [2.0**16, 2.0**16, 2.0**15, 2.0**15]
    assert math.isnan(records[1]["grad_norm"]) and math.isfinite(records[2]["grad_norm"])
    assert all(np.array_equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))
    assert trainer.optimizer.inner.step_count == 3


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_checkpoint_holds_fp32_masters_and_resumes_exactly(name):
    """Save after 3 steps, load into a fresh trainer, run 2 more: the losses are those of 5
    uninterrupted steps, and the saved weights are the fp32 masters, not 16-bit copies."""
    whole = [m["loss"] for m in _loop(_trainer(name, steps=5))]
    first = _trainer(name, steps=5)
    for _ in range(3):
        first.train_step()
    model, optim = first.full_state()
    meta = first.checkpoint_meta()
    assert all(a.dtype == np.float32 for a in model.values())
    w = model["blocks.0.mlp.fc.weight"]
    assert not np.array_equal(w, w.astype(HALVES[name]).astype(np.float32)), "16-bit values"
    second = _trainer(name, steps=5)
    second.load_full_state(model, optim)
    second.load_checkpoint_meta(meta)
    second.step = 3
    assert [second.train_step()["loss"] for _ in range(2)] == whole[3:]
