"""The fast paths the profiler pointed at compute what the plain ones do, bit for bit.

* AdamW over one flat buffer (``flat=True``) against the per-parameter loop: the same
  parameters and state after several steps with changing learning rates, in float32 and
  float64, with gradients held in other arrays (a data-parallel buffer, say) and with a
  parameter that has no gradient (the per-parameter rule then runs on the flat views);
* the embedding's backward, :func:`mpipar.ops.scatter_add_rows` (also the backward of a
  tensor-parallel vocabulary shard), against ``numpy.add.at``, and with no rows at all;
* the flat layout: parameters become views of one buffer and keep their values.

* the attention softmax and the cross-entropy without the row maximum
  (`mpipar.fused.attention_probs`, `mpipar.fused.CrossEntropy`) against the textbook ones,
  with scores that overflow e^s or underflow a whole row, where they must fall back to the
  maximum, without a warning.

LayerNorm and attention are checked against central differences in ``tests/test_ops.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mpipar.flat_layout import FlatLayout
from mpipar.ops import scatter_add_rows
from mpipar.optim import AdamW


@dataclass
class P:
    data: np.ndarray
    grad: np.ndarray | None
    name: str


SHAPES = {"wte": (65, 8), "ln.weight": (8,), "fc.weight": (32, 8), "fc.bias": (32,),
          "proj.weight": (8, 32), "proj.bias": (8,)}


def params(dtype, seed: int = 0) -> list[P]:
    rng = np.random.default_rng(seed)
    return [P(rng.standard_normal(s).astype(dtype), None, n) for n, s in SHAPES.items()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_adamw_is_bitwise_the_per_parameter_loop(dtype):
    a, b = params(dtype), params(dtype)
    loop = AdamW(a, lr=1.0, weight_decay=0.1)
    flat = AdamW(b, lr=1.0, weight_decay=0.1, flat=True)
    rng = np.random.default_rng(1)
    for step, lr in enumerate([1e-2, 3e-2, 2e-2, 5e-3]):
        for pa, pb in zip(a, b, strict=True):
            pa.grad = rng.standard_normal(pa.data.shape).astype(dtype)
            pb.grad = pa.grad.copy()
        if step == 2:  # a parameter without a gradient: both skip it
            a[1].grad = b[1].grad = None
        loop.step(lr)
        flat.step(lr)
        for pa, pb in zip(a, b, strict=True):
            np.testing.assert_array_equal(pb.data, pa.data, err_msg=f"step {step}: {pa.name}")
    sa, sb = loop.state_dict(), flat.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        np.testing.assert_array_equal(sb[k], sa[k], err_msg=k)


def test_flat_layout_views_keep_values():
    ps = params(np.float32)
    before = [p.data.copy() for p in ps]
    layout = FlatLayout(ps)
    for p, old in zip(ps, before, strict=True):
        np.testing.assert_array_equal(p.data, old)
        assert np.shares_memory(p.data, layout.params), p.name
    decaying = layout.runs(lambda p: p.data.ndim >= 2)
    # wte and fc.weight are separated by ln.weight; proj.weight stands alone
    assert [(r.start, r.stop) for r in decaying] == [(0, 520), (528, 784), (816, 1072)]
    assert all(b.stop - b.start <= FlatLayout.BLOCK for b in layout.blocks())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_rows_is_add_at(dtype):
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((500, 16)).astype(dtype)
    for idx in (rng.integers(0, 40, size=500), rng.permutation(500)):
        expected = np.zeros((500, 16), dtype)
        np.add.at(expected, idx, rows)
        np.testing.assert_array_equal(scatter_add_rows((500, 16), idx, rows), expected)


def test_scatter_add_rows_of_no_rows_is_zero():
    # A vocabulary shard that none of the batch's tokens falls in gets a zero gradient.
    out = scatter_add_rows((7, 3), np.zeros(0, dtype=np.int64), np.zeros((0, 3), np.float32))
    np.testing.assert_array_equal(out, np.zeros((7, 3), np.float32))
    assert out.dtype == np.float32


def _textbook_softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1.0, 60.0, -1e4],
                         ids=["ordinary", "overflowing", "underflowing"])
def test_attention_probs_is_the_textbook_softmax(dtype, size):
    import warnings

    from mpipar.fused import attention_probs, causal_mask_bias

    rng = np.random.default_rng(3)
    b, h, t, d = 2, 3, 16, 8
    q = rng.standard_normal((b, h, t, d)).astype(dtype)
    k = rng.standard_normal((b, h, t, d)).astype(dtype)
    if size < 0:  # every score of a row far below zero: e^s is 0 for all of them
        q, k = np.abs(q) * np.sqrt(-size), -np.abs(k) * np.sqrt(-size)
    else:  # scores of up to about size² · d: e^s overflows above 88 (float32) or 709 (float64)
        q, k = q * size, k * size
    bias = causal_mask_bias(t, np, dtype)
    expected = _textbook_softmax(q @ k.swapaxes(-1, -2) / np.sqrt(d) + bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = attention_probs(q, k, 1 / np.sqrt(d), bias, np.empty((b, h, t, t), dtype))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=10 * np.finfo(dtype).eps)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [0.0, 1e3, -1e3], ids=["ordinary", "overflowing", "underflowing"])
def test_cross_entropy_is_the_textbook_one(dtype, shift):
    import warnings

    from mpipar.autograd import Context
    from mpipar.fused import CrossEntropy

    rng = np.random.default_rng(4)
    z = (3 * rng.standard_normal((40, 11)) + shift).astype(dtype)
    targets = rng.integers(0, 11, size=40)
    p = _textbook_softmax(z)
    expected = -np.log(p[np.arange(40), targets]).mean()
    ctx = Context((True, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = CrossEntropy.forward(ctx, z, targets)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(loss, expected, rtol=100 * eps)
    np.testing.assert_allclose(ctx.saved[0], p, rtol=0, atol=10 * eps)
