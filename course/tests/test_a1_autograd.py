"""A1, autograd and the GPT (tutorials/01_autograd.md, 01b_gpt.md): one process, float64.

Each task is tested on its own: backward through graphs of small Functions defined here (so
no other task's operation is needed), broadcasting and the fused backward passes called
directly on arrays and checked against central differences of their forward passes, the
optimizer's rules against the textbook formulas. The last test trains for 10 steps and must
reproduce the reference implementation's losses, pinned in ``reference_losses.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from mpipar import fused, ops
from mpipar.autograd import Context, Function, Tensor, topological_order
from mpipar.optim import adamw_update, clip_grad_norm, grad_norm_sq, lr_at

HERE = Path(__file__).resolve().parent
EPS = 1e-6  # central differences in float64: truncation ~eps², rounding ~1e-16/eps
GRAD_TOL = 1e-6  # relative; a wrong term of a backward is off by 1e-2 or more


# ---- small Functions for graphs that need no other task's ops ---------------------------------
class Scale(Function):
    """y = c·x;  dy/dx = c."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return c * x

    @staticmethod
    def backward(ctx, g):
        return (ctx.c * g,)


class Times(Function):
    """y = a ⊙ b (same shapes);  dy/da = b, dy/db = a."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        return g * b, g * a


class Square(Function):
    """y = x²;  dy/dx = 2x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        return (2.0 * x * g,)


class Total(Function):
    """y = Σ x (a scalar);  dy/dx = 1 everywhere."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return np.asarray(x.sum())

    @staticmethod
    def backward(ctx, g):
        return (np.full(ctx.shape, float(g)),)


def leaf(values) -> Tensor:
    return Tensor(np.asarray(values, dtype=np.float64), requires_grad=True)


# ---- A1.1 topological backward -----------------------------------------------------------------
@pytest.mark.a1_1
def test_topological_order_puts_every_node_after_its_inputs():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    constant = Tensor(np.array([5.0, 6.0]))  # needs no gradient: not part of the order
    c = Times.apply(a, b)
    d = Scale.apply(c, 2.0)
    e = Times.apply(d, a)
    f = Times.apply(e, constant)
    loss = Total.apply(f)
    order = topological_order(loss)
    ids = [id(t) for t in order]
    assert sorted(ids) == sorted(map(id, (a, b, c, d, e, f, loss))), "wrong set of nodes"
    position = {id(t): i for i, t in enumerate(order)}
    for node in (c, d, e, f, loss):
        for parent in node.parents:
            if parent.requires_grad:
                assert position[id(parent)] < position[id(node)], "an input comes after its user"


@pytest.mark.a1_1
def test_backward_sums_the_paths_of_a_diamond():
    x = leaf([0.5, -1.0, 2.0])
    u = Square.apply(x)  # x²
    v = Scale.apply(x, 3.0)  # 3x
    loss = Total.apply(Times.apply(u, v))  # Σ 3x³, so dL/dx = 9x²
    loss.backward()
    np.testing.assert_allclose(x.grad, 9.0 * x.data**2, rtol=1e-14)


@pytest.mark.a1_1
def test_an_input_used_twice_by_one_node_gets_both_terms():
    x = leaf([1.5, -2.0])
    Total.apply(Times.apply(x, x)).backward()  # Σ x·x: dL/dx = x + x
    np.testing.assert_allclose(x.grad, 2.0 * x.data, rtol=1e-14)


@pytest.mark.a1_1
def test_leaf_gradients_add_up_over_backward_passes():
    x = leaf([1.0, 2.0])
    Total.apply(Scale.apply(x, 3.0)).backward()
    Total.apply(Square.apply(x)).backward()
    np.testing.assert_allclose(x.grad, 3.0 + 2.0 * x.data, rtol=1e-14)


@pytest.mark.a1_1
def test_gradient_hook_runs_once_per_pass_with_the_final_gradient():
    x = leaf([2.0, 3.0])
    seen = []
    x.register_grad_hook(lambda t: seen.append(t.grad.copy()))
    y = Scale.apply(x, 5.0)
    Total.apply(Times.apply(y, x)).backward()  # Σ 5x²: dL/dx = 10x, in two terms
    assert len(seen) == 1, f"the hook ran {len(seen)} times in one backward pass"
    np.testing.assert_allclose(seen[0], 10.0 * x.data, rtol=1e-14)


@pytest.mark.a1_1
def test_backward_of_a_non_scalar_starts_from_the_given_gradient():
    x = leaf([1.0, 2.0, 3.0])
    y = Scale.apply(x, 2.0)
    y.backward(np.array([1.0, 10.0, 100.0]))
    np.testing.assert_allclose(x.grad, [2.0, 20.0, 200.0])


@pytest.mark.a1_1
def test_a_deep_graph_does_not_hit_the_recursion_limit():
    x = leaf([1.0])
    y = x
    depth = sys.getrecursionlimit() + 500
    for _ in range(depth):
        y = Scale.apply(y, 1.0001)
    Total.apply(y).backward()
    np.testing.assert_allclose(x.grad, [1.0001**depth], rtol=1e-12)


@pytest.mark.a1_1
def test_a_graph_is_freed_by_its_backward_pass():
    x = leaf([1.0, 2.0])
    loss = Total.apply(Square.apply(x))
    loss.backward()
    with pytest.raises(RuntimeError):
        loss.backward()  # the saved arrays are gone: a second pass must refuse, not guess


# ---- A1.2 broadcasting gradients ---------------------------------------------------------------
@pytest.mark.a1_2
@pytest.mark.parametrize("shape", [(3, 4), (4,), (1, 4), (2, 1, 4), (3, 1), (1,), ()])
def test_unbroadcast_sums_what_broadcasting_added_or_stretched(shape):
    g = np.random.default_rng(0).standard_normal((2, 3, 4))
    got = ops.unbroadcast(g, shape)
    # Broadcasting x of `shape` to (2, 3, 4) copies each element of x to several positions;
    # its gradient is the sum over those positions: the adjoint of np.broadcast_to.
    want = np.zeros(shape)
    for index in np.ndindex(*g.shape):
        target = tuple(i if n > 1 else 0 for i, n in
                       zip(index[len(index) - len(shape):], shape, strict=True))
        want[target] += g[index]
    assert got.shape == tuple(shape), f"shape {got.shape}, expected {shape}"
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.a1_2
def test_unbroadcast_leaves_a_matching_shape_alone():
    g = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(ops.unbroadcast(g, (3, 4)), g)


@pytest.mark.a1_2
def test_add_and_mul_backward_sum_over_broadcast_axes():
    rng = np.random.default_rng(1)
    a, b, g = rng.standard_normal((3, 1)), rng.standard_normal((1, 4)), rng.standard_normal((3, 4))
    ctx = Context((True, True))
    ops.Add.forward(ctx, a, b)
    ga, gb = ops.Add.backward(ctx, g)
    np.testing.assert_allclose(ga, g.sum(axis=1, keepdims=True), rtol=1e-13)
    np.testing.assert_allclose(gb, g.sum(axis=0, keepdims=True), rtol=1e-13)
    ctx = Context((True, True))
    ops.Mul.forward(ctx, a, b)
    ga, gb = ops.Mul.backward(ctx, g)
    np.testing.assert_allclose(ga, (g * b).sum(axis=1, keepdims=True), rtol=1e-13)
    np.testing.assert_allclose(gb, (g * a).sum(axis=0, keepdims=True), rtol=1e-13)


@pytest.mark.a1_2
def test_a_bias_added_to_every_row_gets_the_sum_of_the_rows():
    rng = np.random.default_rng(2)
    h, bias, g = rng.standard_normal((8, 5)), rng.standard_normal(5), rng.standard_normal((8, 5))
    ctx = Context((True, True))
    ops.Add.forward(ctx, h, bias)
    gh, gbias = ops.Add.backward(ctx, g)
    np.testing.assert_allclose(gh, g)
    np.testing.assert_allclose(gbias, g.sum(axis=0), rtol=1e-13)


# ---- A1.3 LayerNorm, cross-entropy and attention backward -------------------------------------
def gradcheck(fn: type[Function], inputs: list, options: dict, which: list[int]) -> None:
    """fn.backward against central differences of L = Σ forward(inputs) ⊙ R, R random.

    Calls ``forward`` and ``backward`` directly on arrays (no autograd engine involved).
    """
    needs = tuple(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in inputs)
    tensors = [a for a, n in zip(inputs, needs, strict=True) if n]
    ctx = Context(tuple(True for _ in tensors))
    y = fn.forward(ctx, *[a.copy() for a in inputs], **options)
    r = np.random.default_rng(3).standard_normal(np.shape(y))
    g = r.copy()
    analytic = fn.backward(ctx, g)
    np.testing.assert_array_equal(g, r, err_msg=f"{fn.__name__}.backward changed its argument")
    for i in which:
        x = inputs[i]
        numeric = np.zeros_like(x)
        for index in np.ndindex(*x.shape):
            values = []
            for step in (EPS, -EPS):
                moved = [a.copy() for a in inputs]
                moved[i][index] += step
                values.append(float((fn.forward(Context(ctx.needs_input_grad), *moved,
                                                **options) * r).sum()))
            numeric[index] = (values[0] - values[1]) / (2 * EPS)
        k = sum(needs[:i])  # position among the differentiable inputs
        got = np.asarray(analytic[k])
        assert got.shape == x.shape, f"{fn.__name__}: gradient {k} has shape {got.shape}"
        err = np.max(np.abs(got - numeric)) / max(np.max(np.abs(numeric)), 1e-12)
        worst = np.unravel_index(np.argmax(np.abs(got - numeric)), x.shape)
        assert err < GRAD_TOL, (f"{fn.__name__}: d/d(input {i}) relative error {err:.1e}; "
                                f"worst at {worst}: backward {got[worst]:.8f}, "
                                f"numeric {numeric[worst]:.8f}")


@pytest.mark.a1_3
def test_layer_norm_backward_matches_central_differences():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 5))
    gamma, beta = 1.0 + 0.3 * rng.standard_normal(5), 0.2 * rng.standard_normal(5)
    gradcheck(fused.LayerNorm, [x, gamma, beta], {"eps": 1e-5}, which=[0, 1, 2])


@pytest.mark.a1_3
def test_cross_entropy_backward_matches_central_differences():
    rng = np.random.default_rng(5)
    logits = 3.0 * rng.standard_normal((2, 3, 7))
    targets = rng.integers(0, 7, size=(2, 3))
    gradcheck(fused.CrossEntropy, [logits, targets], {}, which=[0])


@pytest.mark.a1_3
def test_causal_attention_backward_matches_central_differences():
    qkv = np.random.default_rng(6).standard_normal((2, 4, 3 * 6))  # B=2, T=4, 2 heads of 3
    gradcheck(fused.CausalAttention, [qkv], {"n_head": 2}, which=[0])


@pytest.mark.a1_3
def test_causal_attention_backward_with_a_dropout_mask():
    rng = np.random.default_rng(7)
    qkv = rng.standard_normal((2, 4, 3 * 6))
    mask = (rng.random((2, 2, 4, 4)) > 0.3) / 0.7  # scaled dropout mask on the probabilities
    gradcheck(fused.CausalAttention, [qkv], {"n_head": 2, "drop_mask": mask}, which=[0])


# ---- A1.4 AdamW, the schedule, clipping --------------------------------------------------------
@pytest.mark.a1_4
def test_adamw_update_follows_the_textbook_rule():
    rng = np.random.default_rng(8)
    p = rng.standard_normal(6)
    decay = np.array([0.1, 0.1, 0.1, 0.0, 0.0, 0.0])  # per-element λ (matrix vs bias elements)
    theta, m, v = p.copy(), np.zeros(6), np.zeros(6)
    want = p.copy()
    wm, wv = np.zeros(6), np.zeros(6)
    b1, b2, eps = 0.9, 0.95, 1e-8
    for t, lr in enumerate([1e-2, 3e-2, 2e-2, 5e-3], start=1):
        g = rng.standard_normal(6)
        adamw_update(theta, g, m, v, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=decay,
                     step=t)
        wm = b1 * wm + (1 - b1) * g
        wv = b2 * wv + (1 - b2) * g * g
        want = want - lr * decay * want
        want = want - lr * (wm / (1 - b1**t)) / (np.sqrt(wv / (1 - b2**t)) + eps)
        np.testing.assert_allclose(theta, want, rtol=1e-12, err_msg=f"parameters after step {t}")
        np.testing.assert_allclose(m, wm, rtol=1e-12, err_msg=f"first moment after step {t}")
        np.testing.assert_allclose(v, wv, rtol=1e-12, err_msg=f"second moment after step {t}")


@pytest.mark.a1_4
def test_learning_rate_warms_up_then_follows_the_cosine():
    got = [lr_at(s, max_lr=3e-3, warmup_steps=20, total_steps=300) for s in
           (0, 9, 19, 20, 160, 299, 300, 400)]
    last = 3e-4 + 0.5 * 2.7e-3 * (1 + math.cos(math.pi * 279 / 280))  # step S − 1
    want = [1.5e-4, 1.5e-3, 3e-3, 3e-3, 1.65e-3, last, 3e-4, 3e-4]
    np.testing.assert_allclose(got, want, rtol=1e-12)


class _P:
    def __init__(self, grad):
        self.grad = None if grad is None else np.asarray(grad, dtype=np.float64)


@pytest.mark.a1_4
def test_global_norm_clipping_scales_every_gradient_by_one_factor():
    params = [_P([3.0, 0.0]), _P(None), _P([[0.0, 4.0]])]
    assert grad_norm_sq(params) == 25.0
    norm = clip_grad_norm(params, 1.0)
    assert norm == 5.0
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(params[0].grad, [3.0 * scale, 0.0], rtol=1e-14)
    np.testing.assert_allclose(params[2].grad, [[0.0, 4.0 * scale]], rtol=1e-14)
    small = [_P([0.3, 0.4])]
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small[0].grad, [0.3, 0.4])  # below the limit: untouched
    broken = [_P([np.inf, 1.0])]
    assert not math.isfinite(clip_grad_norm(broken, 1.0))
    np.testing.assert_array_equal(broken[0].grad, [np.inf, 1.0])  # nothing to gain by scaling


def ten_step_losses() -> list[float]:
    """Losses of 10 float64 AdamW steps (warmup, cosine, clipping) of a small GPT."""
    from mpipar.data import CharTokenizer, make_dataset
    from mpipar.grid import ProcessGrid
    from mpipar.model import GPTConfig
    from mpipar.trace import Tracer
    from mpipar.training import TrainConfig, Trainer

    text = "".join(f"line {i}: the quick brown fox jumps over a lazy dog.\n" for i in range(40))
    tok = CharTokenizer.from_text(text)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=16, seq_len=16,
                    dtype="float64")
    tc = TrainConfig(steps=10, batch_size=4, lr=1e-2, warmup_steps=3, grad_clip=0.5,
                     eval_every=0, seed=7)
    trainer = Trainer(cfg, tc, ProcessGrid.single(), make_dataset(text, tok, seq_len=16),
                      Tracer(0))
    return [trainer.train_step()["loss"] for _ in range(tc.steps)]


@pytest.mark.a1_4
def test_ten_training_steps_reproduce_the_reference_losses():
    pinned = json.loads((HERE / "reference_losses.json").read_text())["a1_ten_steps"]
    got = ten_step_losses()
    for step, (g, w) in enumerate(zip(got, pinned, strict=True)):
        assert abs(g - w) <= 1e-9 * abs(w), (f"step {step}: loss {g!r}, the reference "
                                             f"implementation's is {w!r}")


if __name__ == "__main__":  # prints the values to pin, from the reference implementation
    print(json.dumps({"a1_ten_steps": ten_step_losses()}, indent=1))
