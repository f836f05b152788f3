"""Semantics of the autograd engine: accumulation, broadcasting, no_grad, hooks, aliasing, dtypes.

Also checks that the gradient checker itself catches a wrong gradient, so a passing check in
test_ops.py means something.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from gradcheck import check_gradients

from mpipar import ops
from mpipar.autograd import (
    Function,
    Tensor,
    graph_nbytes,
    is_grad_enabled,
    memory_root,
    no_grad,
    saved_arrays,
    topological_order,
)


def _leaf(*shape, seed=0, dtype=np.float64) -> Tensor:
    data = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return Tensor(data, requires_grad=True)


# --------------------------------------------------------------------------------------------
# A tensor used more than once receives the sum of its contributions
# --------------------------------------------------------------------------------------------
def test_x_times_x():
    x = _leaf(4)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data, rtol=1e-15)


def test_x_plus_x():
    x = _leaf(4)
    (x + x).sum().backward()
    np.testing.assert_array_equal(x.grad, np.full(4, 2.0))


def test_a_times_b_plus_a():
    a, b = _leaf(3, seed=1), _leaf(3, seed=2)
    (a * b + a).sum().backward()
    np.testing.assert_allclose(a.grad, b.data + 1.0, rtol=1e-15)
    np.testing.assert_allclose(b.grad, a.data, rtol=1e-15)


def test_diamond_graph_matches_finite_differences():
    """x feeds two branches that meet again: y = tanh(x)·exp(x) + x/2."""
    x = _leaf(2, 3, seed=3)
    check_gradients(lambda x: x.tanh() * x.exp() + x / 2.0, {"x": x}, label="diamond")


# --------------------------------------------------------------------------------------------
# Broadcasting
# --------------------------------------------------------------------------------------------
def test_broadcast_gradients_are_summed_back_to_the_input_shape():
    a = _leaf(3, 1, seed=4)  # stretched along axis 1
    b = _leaf(4, seed=5)  # broadcast with an added leading axis
    s = _leaf(seed=6)  # a 0-d scalar, broadcast everywhere
    g = np.random.default_rng(7).standard_normal((3, 4))
    (a * b + s).backward(g)
    assert a.grad.shape == (3, 1) and b.grad.shape == (4,) and s.grad.shape == ()
    np.testing.assert_allclose(a.grad, (g * b.data).sum(axis=1, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(b.grad, (g * a.data).sum(axis=0), rtol=1e-14)
    np.testing.assert_allclose(s.grad, g.sum(), rtol=1e-14)


# --------------------------------------------------------------------------------------------
# Accumulation across backward calls
# --------------------------------------------------------------------------------------------
def test_gradients_accumulate_across_backward_calls():
    w = _leaf(3, seed=8)
    x1, x2 = np.array([1.0, 2.0, 3.0]), np.array([-1.0, 0.5, 4.0])
    (w * x1).sum().backward()
    np.testing.assert_array_equal(w.grad, x1)
    (w * x2).sum().backward()  # a new graph (e.g. the next microbatch), same leaf
    np.testing.assert_array_equal(w.grad, x1 + x2)
    w.grad = None
    (w * x2).sum().backward()
    np.testing.assert_array_equal(w.grad, x2)


# --------------------------------------------------------------------------------------------
# no_grad and error messages
# --------------------------------------------------------------------------------------------
def test_no_grad_records_no_graph():
    x = _leaf(3)
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        y.backward()
    assert x.grad is None


def test_no_grad_restores_mode_after_an_exception():
    with pytest.raises(ValueError), no_grad():
        raise ValueError("boom")
    assert is_grad_enabled()


def test_operations_on_constants_record_no_graph():
    y = Tensor(np.ones(3)) * 2.0
    assert not y.requires_grad and y.is_leaf


def test_backward_on_non_scalar_needs_a_gradient():
    y = _leaf(2, 3) * 2.0
    with pytest.raises(RuntimeError, match=r"needs a scalar.*shape \(2, 3\)"):
        y.backward()


def test_backward_rejects_a_gradient_of_the_wrong_shape():
    """A pipeline stage passes a received gradient to backward; a wrong shape must not be
    silently broadcast and summed into the parameters' gradients."""
    x = _leaf(3)
    y = x * 2.0
    with pytest.raises((ValueError, RuntimeError)) as e:
        y.backward(np.ones((2, 3)))
    assert "(2, 3)" in str(e.value) and "(3,)" in str(e.value), str(e.value)


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------
def test_grad_hook_fires_once_with_the_final_gradient():
    """x is used three times; the hook must see the sum of all three contributions."""
    x = _leaf(4, seed=9)
    calls = []

    def hook(t: Tensor) -> None:
        calls.append(t.grad.copy())
        # The total of all three uses (times the number of passes: .grad accumulates).
        np.testing.assert_allclose(t.grad, len(calls) * (2 * x.data + 3.0), rtol=1e-14)

    x.register_grad_hook(hook)
    (x * x + 3.0 * x).sum().backward()
    assert len(calls) == 1
    (x * x + 3.0 * x).sum().backward()  # second pass: fires again, with the accumulated grad
    assert len(calls) == 2


def test_grad_hook_fires_before_earlier_layers_are_differentiated():
    """A leaf's hook runs as soon as its gradient is final, not at the end of backward.

    Data parallelism starts all-reducing the last layer's gradients from its hooks while the
    backward pass of the earlier layers is still running; that overlap needs w2's hook to
    fire before w1's gradient exists.
    """
    x = Tensor(np.random.default_rng(0).standard_normal((5, 3)))
    w1, w2 = _leaf(4, 3, seed=1), _leaf(2, 4, seed=2)
    b1, b2 = _leaf(4, seed=3), _leaf(2, seed=4)
    seen = {}
    w2.register_grad_hook(lambda t: seen.setdefault("w1.grad at w2's hook", w1.grad))
    b2.register_grad_hook(lambda t: seen.setdefault("b1.grad at b2's hook", b1.grad))
    h = ops.linear(x, w1, b1).tanh()  # layer 1, far from the loss
    ops.linear(h, w2, b2).sum().backward()  # layer 2
    assert len(seen) == 2
    early = [k for k, v in seen.items() if v is not None]
    assert not early, f"hooks fired only after the earlier layer was differentiated: {early}"


# --------------------------------------------------------------------------------------------
# Aliasing: no two gradients may share memory
# --------------------------------------------------------------------------------------------
def test_add_hands_independent_gradients_to_both_leaves():
    a, b = _leaf(3, seed=1), _leaf(3, seed=2)
    (a + b).sum().backward()  # Add.backward returns the very same array for a and b
    b_before = b.grad.copy()
    a.grad *= 10.0
    np.testing.assert_array_equal(b.grad, b_before)
    a_before = a.grad.copy()
    b.grad += 1.0
    np.testing.assert_array_equal(a.grad, a_before)


def test_leaf_gradient_does_not_alias_the_callers_array():
    a, b = _leaf(3, seed=1), _leaf(3, seed=2)
    g = np.ones(3)
    (a + b).backward(g)
    g[:] = 5.0
    np.testing.assert_array_equal(a.grad, np.ones(3))
    np.testing.assert_array_equal(b.grad, np.ones(3))
    a.grad += 1.0
    np.testing.assert_array_equal(g, np.full(3, 5.0))


def test_views_of_one_gradient_do_not_alias_leaves():
    """concat hands out slices of one array; reshape a view of it."""
    a, b, c = _leaf(2, seed=1), _leaf(2, seed=2), _leaf(1, 4, seed=3)
    y = ops.concat([a, b], axis=0) + c.reshape(4)
    y.backward(np.arange(4.0))
    c_before = c.grad.copy()
    a.grad[:] = -1.0
    b.grad[:] = -1.0
    np.testing.assert_array_equal(c.grad, c_before)


def test_hook_modifying_grad_in_place_does_not_leak():
    """A hook that scales its gradient in place (as an averaging all-reduce would)."""
    a, b = _leaf(3, seed=1), _leaf(3, seed=2)
    a.register_grad_hook(lambda t: t.grad.__imul__(0.5))
    b.register_grad_hook(lambda t: t.grad.__imul__(0.5))
    (a + b).sum().backward()
    np.testing.assert_array_equal(a.grad, np.full(3, 0.5))
    np.testing.assert_array_equal(b.grad, np.full(3, 0.5))


# --------------------------------------------------------------------------------------------
# dtype: float32 stays float32
# --------------------------------------------------------------------------------------------
def test_float32_stays_float32_through_every_op():
    f32 = np.float32
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 4, 6)).astype(f32), requires_grad=True)
    w = Tensor(rng.standard_normal((18, 6)).astype(f32), requires_grad=True)
    v = Tensor(rng.standard_normal((6, 6)).astype(f32), requires_grad=True)
    gamma = Tensor(np.ones(6, f32), requires_grad=True)
    beta = Tensor(np.zeros(6, f32), requires_grad=True)
    table = Tensor(rng.standard_normal((5, 6)).astype(f32), requires_grad=True)
    mask = (rng.random((2, 4, 6)) > 0.2).astype(f32) / f32(0.8)

    outputs = {}

    def keep(name: str, t: Tensor) -> Tensor:
        outputs[name] = t
        return t

    h = keep("embedding", ops.embedding(table, np.array([[0, 1, 2, 3], [4, 4, 0, 1]]))) + x
    h = keep("layer_norm", ops.layer_norm(h, gamma, beta))
    h = keep("linear", ops.linear(h, w))  # (2, 4, 18)
    h = keep("causal_attention", ops.causal_attention(h, 2))  # (2, 4, 6)
    h = keep("gelu", ops.gelu(h)) + keep("tanh", h.tanh())
    h = keep("python scalars", 2.0 * h - 1.0 + h / 3.0 - 0.5 / (h * h + 1.0))
    h = keep("dropout", ops.dropout(h, mask))
    h = keep("exp/log", (h.exp() + 1.0).log())
    h = keep("matmul", h @ v) + keep("neg", -h)
    s = keep("softmax", ops.softmax(ops.causal_mask(h[:, :, :4])))
    s = s + keep("log_softmax", ops.log_softmax(h[:, :, 2:]))
    h = keep("concat", ops.concat([s, h.transpose(0, 1, 2)[:, :, :2]], axis=-1))
    h = keep("reshape", h.reshape(8, 6).T).mean(axis=0) + h.sum(axis=(0, 1)).mean()
    loss = keep("cross_entropy", ops.cross_entropy(h.reshape(2, 4)[:, None, :],
                                                   np.array([[1], [3]])))
    loss = keep("loss", loss + h.sum() * 1e-3)
    wrong = {name: str(t.dtype) for name, t in outputs.items() if t.dtype != f32}
    assert not wrong, f"ops that changed float32 into another dtype: {wrong}"
    loss.backward()
    for name, t in {"x": x, "w": w, "v": v, "gamma": gamma, "beta": beta, "table": table}.items():
        assert t.grad is not None and t.grad.dtype == f32, f"{name}.grad is {t.grad.dtype}"


# --------------------------------------------------------------------------------------------
# Deep graphs
# --------------------------------------------------------------------------------------------
def test_a_chain_of_5000_adds_does_not_hit_the_recursion_limit():
    assert sys.getrecursionlimit() < 5000 * 2  # otherwise the test would prove nothing
    x = _leaf(3)
    y = x
    for _ in range(5000):
        y = y + x
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.full(3, 5001.0))


# --------------------------------------------------------------------------------------------
# What the graph is made of, and what backward keeps
# --------------------------------------------------------------------------------------------
def test_parents_and_fn_describe_the_graph_until_backward_frees_it():
    a, b = _leaf(2), _leaf(2, seed=1)
    c = a * b
    d = c + a
    assert d.fn.__name__ == "Add" and d.parents == (c, a)
    assert c.fn.__name__ == "Mul" and c.parents == (a, b)
    assert a.fn is None and a.parents == ()
    assert topological_order(d)[-1] is d and topological_order(d).index(c) > 0
    d.sum().backward()
    assert d.fn.__name__ == "Add" and d.parents == ()  # the graph behind it is freed


def test_memory_root_is_the_owner_of_a_view():
    base = np.zeros((4, 3))
    assert memory_root(base) is base
    assert memory_root(base[1:]) is base and memory_root(base.T[::2]) is base


def test_saved_arrays_lists_each_block_of_memory_once():
    x = Tensor(np.ones((3, 4)), requires_grad=True)  # 96 bytes
    w = Tensor(np.ones((5, 4)), requires_grad=True)  # 160 bytes
    h = ops.linear(x, w)  # saves x and w
    y = ops.tanh(h)  # saves its output, (3, 5): 120 bytes
    z = y * y  # saves y twice: one block
    saved = saved_arrays(z)
    assert sorted(a.nbytes for a in saved) == [96, 120, 160]
    assert any(a is x.data for a in saved) and any(a is w.data for a in saved)
    assert graph_nbytes(z) == 96 + 120 + 160
    assert graph_nbytes(z, exclude=[w.data]) == 96 + 120
    assert graph_nbytes(z, exclude=[w.data[1:], x.data.T]) == 120, "views exclude their base"
    z.sum().backward()
    assert saved_arrays(z) == [] and graph_nbytes(z) == 0  # backward freed what it kept


# --------------------------------------------------------------------------------------------
# The gradient checker can fail
# --------------------------------------------------------------------------------------------
class _WrongSquare(Function):
    """y = x², with the derivative deliberately off by one element."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        d = 2.0 * x
        d[1, 2] *= 1.001
        return (g * d,)


def test_gradcheck_reports_a_wrong_gradient():
    x = _leaf(2, 3, seed=1)
    with pytest.raises(AssertionError) as e:
        check_gradients(lambda x: _WrongSquare.apply(x), {"x": x}, label="wrong square")
    msg = str(e.value)
    assert "wrong square" in msg and "d/dx[1, 2]" in msg, msg
    assert "analytic" in msg and "numeric" in msg and "1 of 6 elements" in msg, msg


def test_gradcheck_refuses_float32_and_nonfinite_outputs():
    with pytest.raises(TypeError, match="float64"):
        check_gradients(lambda x: x * x, {"x": _leaf(2, dtype=np.float32)}, label="f32")
    with pytest.raises(AssertionError, match="non-finite"):
        check_gradients(lambda x: ops.causal_mask(x), {"x": _leaf(3, 3)}, label="mask")
