"""Every Function in mpipar.ops and mpipar.fused: forward against numpy, gradients by central
differences.

The table ``CASES`` lists one or more gradient checks per Function. A Function added to ops.py
or fused.py that no case exercises fails ``test_every_function_is_checked``, and each case
verifies that the Function it claims to check really is in the graph it builds.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from gradcheck import check_gradients

from mpipar import fused, ops
from mpipar.autograd import Function, Tensor

GELU_C = math.sqrt(2.0 / math.pi)


def _np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x**3)))


def _np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _np_layer_norm(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def _np_cross_entropy(logits, targets):
    """Naive: log of an explicitly normalised softmax, then the mean negative log-likelihood."""
    z = logits.reshape(-1, logits.shape[-1])
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    t = targets.reshape(-1)
    return -np.mean(np.log(p[np.arange(len(t)), t]))


def _np_attention(qkv, n_head, drop=None):
    """Causal multi-head attention written with explicit loops over batch, head and query."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    d = c // n_head
    out = np.zeros((b, t, c))
    for bi in range(b):
        for h in range(n_head):
            q = qkv[bi, :, h * d:(h + 1) * d]
            k = qkv[bi, :, c + h * d:c + (h + 1) * d]
            v = qkv[bi, :, 2 * c + h * d:2 * c + (h + 1) * d]
            for i in range(t):
                s = q[i] @ k[: i + 1].T / math.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                if drop is not None:
                    p = p * drop[bi, h, i, : i + 1]
                out[bi, i, h * d:(h + 1) * d] = p @ v[: i + 1]
    return out


def _scaled_mask(shape, p, seed):
    keep = np.random.default_rng(seed).random(shape) >= p
    return keep / (1.0 - p)


def _normal(*shape):
    return lambda rng: rng.standard_normal(shape)


def _away_from_zero(*shape):
    """Values in ±[0.5, 2]: a denominator with no pole nearby."""
    return lambda rng: rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


@dataclass(frozen=True)
class Case:
    """One gradient check: ``fn(**tensors)`` with tensors made from ``inputs`` (float64).

    ``op`` is the Function under test (it must appear in the graph); ``reference``, if given,
    is a numpy formula for the same forward value; names in ``frozen`` do not require grad.
    """

    label: str
    op: type[Function]
    fn: Callable[..., Tensor]
    inputs: dict[str, Callable[[np.random.Generator], np.ndarray]]
    reference: Callable[..., np.ndarray] | None = None
    frozen: tuple[str, ...] = field(default=())


IDS = np.array([[1, 3, 1, 1], [6, 0, 3, 6]])  # repeated ids: gradient rows must add up
TARGETS = np.array([[2, 2, 0], [6, 1, 2]])
ATT_MASK = _scaled_mask((2, 2, 4, 4), 0.3, seed=5)
DROP_MASK = _scaled_mask((3, 5), 0.4, seed=6)

CASES = [
    # -- elementwise arithmetic, broadcasting both ways --------------------------------------
    Case("add same shape", ops.Add, lambda a, b: a + b,
         {"a": _normal(3, 4), "b": _normal(3, 4)}, lambda a, b: a + b),
    Case("add broadcast b (2,3,4)+(4,)", ops.Add, lambda a, b: a + b,
         {"a": _normal(2, 3, 4), "b": _normal(4)}, lambda a, b: a + b),
    Case("add broadcast a (3,1)+(2,3,4)", ops.Add, lambda a, b: a + b,
         {"a": _normal(3, 1), "b": _normal(2, 3, 4)}, lambda a, b: a + b),
    Case("add both stretched (3,1)+(1,4)", ops.Add, lambda a, b: a + b,
         {"a": _normal(3, 1), "b": _normal(1, 4)}, lambda a, b: a + b),
    Case("add python scalar", ops.Add, lambda a: 2.5 + a, {"a": _normal(3)}, lambda a: a + 2.5),
    Case("sub broadcast b", ops.Sub, lambda a, b: a - b,
         {"a": _normal(2, 3, 4), "b": _normal(3, 1)}, lambda a, b: a - b),
    Case("sub broadcast a", ops.Sub, lambda a, b: a - b,
         {"a": _normal(4), "b": _normal(2, 3, 4)}, lambda a, b: a - b),
    Case("rsub python scalar", ops.Sub, lambda a: 1.5 - a, {"a": _normal(3)}, lambda a: 1.5 - a),
    Case("sub frozen a", ops.Sub, lambda a, b: a - b,
         {"a": _normal(3), "b": _normal(2, 3)}, lambda a, b: a - b, frozen=("a",)),
    Case("mul broadcast b", ops.Mul, lambda a, b: a * b,
         {"a": _normal(2, 3, 4), "b": _normal(3, 1)}, lambda a, b: a * b),
    Case("mul broadcast a", ops.Mul, lambda a, b: a * b,
         {"a": _normal(1, 4), "b": _normal(2, 3, 1)}, lambda a, b: a * b),
    Case("mul by scalar tensor", ops.Mul, lambda a, b: a * b,
         {"a": _normal(2, 3), "b": _normal()}, lambda a, b: a * b),
    Case("div broadcast b", ops.Div, lambda a, b: a / b,
         {"a": _normal(2, 3, 4), "b": _away_from_zero(4)}, lambda a, b: a / b),
    Case("div broadcast a", ops.Div, lambda a, b: a / b,
         {"a": _normal(3, 1), "b": _away_from_zero(2, 3, 4)}, lambda a, b: a / b),
    Case("rdiv python scalar", ops.Div, lambda b: 2.0 / b,
         {"b": _away_from_zero(5)}, lambda b: 2.0 / b),
    Case("neg", ops.Neg, lambda x: -x, {"x": _normal(2, 3)}, lambda x: -x),
    Case("exp", ops.Exp, lambda x: x.exp(), {"x": _normal(2, 3)}, lambda x: np.exp(x)),
    Case("log (positive inputs)", ops.Log, lambda x: x.log(),
         {"x": lambda rng: rng.uniform(0.2, 3.0, (2, 3))}, lambda x: np.log(x)),
    Case("tanh", ops.Tanh, lambda x: x.tanh(), {"x": _normal(2, 3)}, lambda x: np.tanh(x)),
    Case("gelu", fused.Gelu, ops.gelu, {"x": lambda rng: 2.0 * rng.standard_normal((3, 5))},
         _np_gelu),
    # -- matrix products ----------------------------------------------------------------------
    Case("matmul 2-D", ops.MatMul, lambda a, b: a @ b,
         {"a": _normal(3, 4), "b": _normal(4, 5)}, lambda a, b: a @ b),
    Case("matmul batched", ops.MatMul, lambda a, b: a @ b,
         {"a": _normal(2, 3, 4), "b": _normal(2, 4, 5)}, lambda a, b: a @ b),
    Case("matmul batched, b broadcast (2,1,3,4)@(3,4,5)", ops.MatMul, lambda a, b: a @ b,
         {"a": _normal(2, 1, 3, 4), "b": _normal(3, 4, 5)}, lambda a, b: a @ b),
    Case("matmul 2-D @ batched", ops.MatMul, lambda a, b: a @ b,
         {"a": _normal(3, 4), "b": _normal(2, 4, 5)}, lambda a, b: a @ b),
    Case("linear 3-D input with bias", fused.Linear, ops.linear,
         {"x": _normal(2, 3, 4), "weight": _normal(5, 4), "bias": _normal(5)},
         lambda x, weight, bias: x @ weight.T + bias),
    Case("linear 3-D input, no bias", fused.Linear, ops.linear,
         {"x": _normal(2, 3, 4), "weight": _normal(5, 4)}, lambda x, weight: x @ weight.T),
    Case("linear 2-D input, frozen x", fused.Linear, ops.linear,
         {"x": _normal(3, 4), "weight": _normal(2, 4), "bias": _normal(2)},
         lambda x, weight, bias: x @ weight.T + bias, frozen=("x",)),
    # -- reductions ---------------------------------------------------------------------------
    *[
        Case(f"{name} axis={axis} keepdims={keep}", op,
             lambda x, f=f, axis=axis, keep=keep: f(x, axis=axis, keepdims=keep),
             {"x": _normal(2, 3, 4)},
             lambda x, r=r, axis=axis, keep=keep: r(x, axis=axis, keepdims=keep))
        for name, op, f, r in [("sum", ops.Sum, ops.sum, np.sum),
                               ("mean", ops.Mean, ops.mean, np.mean)]
        for axis, keep in [(None, False), (None, True), (1, False), (-2, False), (-1, True),
                           ((0, 2), False), ((-1, 0), False), ((0, -1), True)]
    ],
    # -- shape operations ---------------------------------------------------------------------
    Case("reshape", ops.Reshape, lambda x: x.reshape(4, 6), {"x": _normal(2, 3, 4)},
         lambda x: x.reshape(4, 6)),
    Case("reshape with -1", ops.Reshape, lambda x: x.reshape((3, -1, 2)),
         {"x": _normal(2, 3, 4)}, lambda x: x.reshape(3, -1, 2)),
    Case("transpose .T", ops.Transpose, lambda x: x.T, {"x": _normal(2, 3, 4)}, lambda x: x.T),
    Case("transpose axes (1,2,0)", ops.Transpose, lambda x: x.transpose(1, 2, 0),
         {"x": _normal(2, 3, 4)}, lambda x: x.transpose(1, 2, 0)),
    Case("transpose axes (0,2,1,3)", ops.Transpose, lambda x: ops.transpose(x, (0, 2, 1, 3)),
         {"x": _normal(2, 3, 4, 2)}, lambda x: x.transpose(0, 2, 1, 3)),
    Case("transpose negative axes (0,-1,1)", ops.Transpose, lambda x: x.transpose(0, -1, 1),
         {"x": _normal(2, 3, 4)}, lambda x: x.transpose(0, -1, 1)),
    Case("getitem slices", ops.GetItem, lambda x: x[1:, ::2], {"x": _normal(3, 5)},
         lambda x: x[1:, ::2]),
    Case("getitem integer", ops.GetItem, lambda x: x[1], {"x": _normal(3, 5)}, lambda x: x[1]),
    Case("getitem repeated integer array", ops.GetItem,
         lambda x: x[np.array([0, 2, 0, 0, -1])], {"x": _normal(3, 4)},
         lambda x: x[np.array([0, 2, 0, 0, -1])]),
    Case("getitem repeated pairs with a slice", ops.GetItem,
         lambda x: x[[0, 0, 1], :, [2, 2, 2]], {"x": _normal(2, 3, 4)},
         lambda x: x[[0, 0, 1], :, [2, 2, 2]]),
    Case("getitem with a Tensor index", ops.GetItem,
         lambda x: x[Tensor(np.array([1, 1, 0]))], {"x": _normal(2, 3)},
         lambda x: x[np.array([1, 1, 0])]),
    Case("concat axis 1", ops.Concat, lambda a, b, c: ops.concat([a, b, c], axis=1),
         {"a": _normal(2, 1, 3), "b": _normal(2, 4, 3), "c": _normal(2, 2, 3)},
         lambda a, b, c: np.concatenate([a, b, c], axis=1)),
    Case("concat axis -1", ops.Concat, lambda a, b: ops.concat([a, b], axis=-1),
         {"a": _normal(3, 2), "b": _normal(3, 3)}, lambda a, b: np.concatenate([a, b], -1)),
    Case("split sizes [1,3,2], reordered", ops.GetItem,
         lambda x: ops.concat([(p := ops.split(x, [1, 3, 2]))[2], p[0], p[1]], axis=-1),
         {"x": _normal(2, 6)}, lambda x: np.concatenate([x[:, 4:], x[:, :1], x[:, 1:4]], -1)),
    Case("split into 3 equal parts on axis 0", ops.GetItem,
         lambda x: ops.concat(ops.split(x, 3, axis=0)[::-1], axis=0),
         {"x": _normal(6, 2)}, lambda x: np.concatenate([x[4:], x[2:4], x[:2]], 0)),
    # -- softmax family, masking, dropout -----------------------------------------------------
    Case("softmax last axis", ops.Softmax, ops.softmax, {"x": _normal(3, 5)}, _np_softmax),
    Case("softmax axis 0", ops.Softmax, lambda x: ops.softmax(x, axis=0),
         {"x": _normal(3, 5)}, lambda x: _np_softmax(x, 0)),
    Case("log_softmax last axis", ops.LogSoftmax, ops.log_softmax, {"x": _normal(2, 3, 5)},
         _np_log_softmax),
    Case("log_softmax axis 1", ops.LogSoftmax, lambda x: ops.log_softmax(x, axis=1),
         {"x": _normal(2, 3, 5)}, lambda x: _np_log_softmax(x, 1)),
    Case("softmax(causal_mask(x))", ops.CausalMask, lambda x: ops.softmax(ops.causal_mask(x)),
         {"x": _normal(2, 3, 5, 5)},
         lambda x: _np_softmax(np.where(np.tril(np.ones((5, 5))) > 0, x, -np.inf))),
    Case("dropout with a fixed scaled mask", ops.Dropout, lambda x: ops.dropout(x, DROP_MASK),
         {"x": _normal(3, 5)}, lambda x: x * DROP_MASK),
    # -- fused GPT operations -----------------------------------------------------------------
    Case("layer_norm x, gamma, beta", fused.LayerNorm, ops.layer_norm,
         {"x": _normal(2, 3, 8), "gamma": _normal(8), "beta": _normal(8)}, _np_layer_norm),
    Case("layer_norm 2-D, frozen gamma and beta", fused.LayerNorm, ops.layer_norm,
         {"x": _normal(4, 6), "gamma": _normal(6), "beta": _normal(6)}, _np_layer_norm,
         frozen=("gamma", "beta")),
    Case("embedding with repeated ids", ops.Embedding, lambda weight: ops.embedding(weight, IDS),
         {"weight": _normal(7, 3)}, lambda weight: weight[IDS]),
    Case("cross_entropy (B,T,V)", fused.CrossEntropy,
         lambda logits: ops.cross_entropy(logits, TARGETS), {"logits": _normal(2, 3, 7)},
         lambda logits: _np_cross_entropy(logits, TARGETS)),
    Case("cross_entropy (N,V), Tensor targets", fused.CrossEntropy,
         lambda logits: ops.cross_entropy(logits, Tensor(np.array([0, 3, 3, 1]))),
         {"logits": lambda rng: 3.0 * rng.standard_normal((4, 5))},
         lambda logits: _np_cross_entropy(logits, np.array([0, 3, 3, 1]))),
    Case("causal_attention, 2 heads", fused.CausalAttention,
         lambda qkv: ops.causal_attention(qkv, 2), {"qkv": _normal(2, 4, 18)},
         lambda qkv: _np_attention(qkv, 2)),
    Case("causal_attention, 3 heads, T=5", fused.CausalAttention,
         lambda qkv: ops.causal_attention(qkv, 3), {"qkv": _normal(1, 5, 18)},
         lambda qkv: _np_attention(qkv, 3)),
    Case("causal_attention with dropout mask", fused.CausalAttention,
         lambda qkv: ops.causal_attention(qkv, 2, ATT_MASK), {"qkv": _normal(2, 4, 12)},
         lambda qkv: _np_attention(qkv, 2, ATT_MASK)),
]


def _functions_in_graph(out: Tensor) -> set[type]:
    """The Function classes that produced ``out`` and everything upstream of it."""
    found, stack, seen = set(), [out], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.fn is not None:
            found.add(t.fn)
        stack.extend(t.parents)
    return found


def _tensors(case: Case, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Tensor]]:
    rng = np.random.default_rng(seed)
    arrays = {name: np.asarray(make(rng), dtype=np.float64) for name, make in case.inputs.items()}
    tensors = {name: Tensor(a.copy(), requires_grad=name not in case.frozen)
               for name, a in arrays.items()}
    return arrays, tensors


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_op_forward_and_gradients(case: Case):
    arrays, tensors = _tensors(case, seed=len(case.label))
    out = case.fn(**tensors)
    assert case.op in _functions_in_graph(out), (
        f"{case.label}: {case.op.__name__} does not appear in the graph this case builds"
    )
    if case.reference is not None:
        expected = case.reference(**arrays)
        assert out.shape == np.shape(expected), f"{case.label}: shape {out.shape}"
        np.testing.assert_allclose(out.data, expected, rtol=1e-10, atol=1e-12,
                                   err_msg=f"{case.label}: forward value")
    check_gradients(case.fn, tensors, label=case.label)
    for name in case.frozen:
        assert tensors[name].grad is None, f"{case.label}: frozen {name} received a gradient"


def test_every_function_is_checked():
    """A Function added to ops.py or fused.py without a row in CASES fails here."""
    defined = {cls for module in (ops, fused)
               for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, Function) and cls is not Function
               and cls.__module__ == module.__name__}
    covered = {c.op for c in CASES}
    missing = sorted(f"{cls.__module__}.{cls.__name__}" for cls in defined - covered)
    assert not missing, f"Functions without a gradient check: {missing}"
    assert len(defined) >= 25  # the discovery itself works (ops.py and fused.py have 25 today)


# --------------------------------------------------------------------------------------------
# Properties the table cannot express
# --------------------------------------------------------------------------------------------
def test_causal_mask_values():
    x = np.random.default_rng(0).standard_normal((2, 4, 4))
    y = ops.causal_mask(Tensor(x)).data
    future = np.triu(np.ones((4, 4), dtype=bool), 1)
    assert np.all(np.isneginf(y[:, future])), "future positions must be exactly -inf"
    np.testing.assert_array_equal(y[:, ~future], x[:, ~future])
    p = ops.softmax(ops.causal_mask(Tensor(x))).data
    assert np.all(p[:, future] == 0.0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-14)


def test_causal_mask_gradient_is_zero_in_the_future():
    x = Tensor(np.random.default_rng(1).standard_normal((3, 3)), requires_grad=True)
    g = np.arange(9.0).reshape(3, 3) + 1.0
    ops.causal_mask(x).backward(g)
    np.testing.assert_array_equal(x.grad, np.tril(g))


def test_cross_entropy_huge_logits_are_stable():
    """Logits of size 1e4 overflow exp() unless the max is subtracted first."""
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        logits = (1e4 * rng.standard_normal((4, 6))).astype(dtype)
        targets = np.array([0, 5, 2, 2])
        z = Tensor(logits, requires_grad=True)
        loss = ops.cross_entropy(z, targets)
        loss.backward()
        assert np.isfinite(loss.item()) and np.all(np.isfinite(z.grad)), dtype
        l64 = logits.astype(np.float64)
        expected = -np.mean(_np_log_softmax(l64)[np.arange(4), targets])
        np.testing.assert_allclose(loss.item(), expected, rtol=1e-6, err_msg=str(dtype))
        grad = (_np_softmax(l64) - np.eye(6)[targets]) / 4
        np.testing.assert_allclose(z.grad, grad, atol=1e-6, err_msg=str(dtype))
    # The target holds the huge logit: loss 0. Another class does: loss = the gap, 1e4.
    big = np.array([[1e4, 0.0, 0.0], [0.0, 1e4, 0.0]])
    loss = ops.cross_entropy(Tensor(big), np.array([0, 0])).item()
    np.testing.assert_allclose(loss, 0.5 * (0.0 + 1e4), rtol=1e-12)


def test_cross_entropy_matches_naive_log_softmax_nll():
    rng = np.random.default_rng(3)
    logits = Tensor(rng.standard_normal((3, 4, 9)), requires_grad=True)
    targets = rng.integers(0, 9, (3, 4))
    composed = -ops.log_softmax(logits)[np.arange(3)[:, None], np.arange(4), targets].mean()
    fused = ops.cross_entropy(logits, targets)
    np.testing.assert_allclose(fused.item(), _np_cross_entropy(logits.data, targets),
                               rtol=1e-12)
    np.testing.assert_allclose(fused.item(), composed.item(), rtol=1e-12)
    composed.backward()
    g_composed = logits.grad
    logits.grad = None
    fused.backward()
    np.testing.assert_allclose(logits.grad, g_composed, rtol=1e-10, atol=1e-14)


def _unfused_attention(qkv: Tensor, n_head: int, drop=None) -> Tensor:
    """The same attention as a chain of small ops: split, matmul, mask, softmax, matmul."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    d = c // n_head
    heads = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    q, k, v = heads[0], heads[1], heads[2]
    s = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(d))  # (B, H, T, T)
    p = ops.softmax(ops.causal_mask(s))
    if drop is not None:
        p = ops.dropout(p, drop)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, t, c)  # (B, T, C)


@pytest.mark.parametrize("with_mask", [False, True])
def test_causal_attention_matches_unfused_composition(with_mask):
    rng = np.random.default_rng(11)
    qkv = Tensor(rng.standard_normal((2, 5, 24)), requires_grad=True)
    mask = _scaled_mask((2, 4, 5, 5), 0.25, seed=2) if with_mask else None
    g = rng.standard_normal((2, 5, 8))
    fused = ops.causal_attention(qkv, 4, mask)
    fused.backward(g)
    g_fused = qkv.grad
    qkv.grad = None
    unfused = _unfused_attention(qkv, 4, mask)
    np.testing.assert_allclose(fused.data, unfused.data, rtol=1e-12, atol=1e-14)
    unfused.backward(g)
    np.testing.assert_allclose(g_fused, qkv.grad, rtol=1e-10, atol=1e-13)


def test_dropout_mask_zeroes_gradient():
    x = Tensor(np.ones((3, 5)), requires_grad=True)
    ops.dropout(x, DROP_MASK).sum().backward()
    np.testing.assert_array_equal(x.grad, DROP_MASK)
    assert np.any(DROP_MASK == 0.0) and np.any(DROP_MASK > 1.0)  # the mask is not trivial


def test_split_and_matmul_reject_bad_arguments():
    x = Tensor(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="6 into 4 equal parts"):
        ops.split(x, 4)
    with pytest.raises(ValueError, match=r"\[2, 2\] do not add up to the axis length 6"):
        ops.split(x, [2, 2])
    with pytest.raises(ValueError, match="at least 2 dims"):
        ops.matmul(Tensor(np.zeros(3)), Tensor(np.zeros((3, 2))))
