"""Differentiable operations: each is a ``Function`` whose docstring gives its derivative.

These are the textbook operations a reader follows to learn backpropagation: elementwise
arithmetic with broadcasting (whose gradients :func:`unbroadcast` sums back to the input's
shape), matrix products, reductions, shape operations, softmax and log-softmax, the causal
mask, dropout and the embedding lookup. Each ``forward`` computes the value and saves what
``backward`` needs; each ``backward`` turns the gradient of the output into the gradients of
the inputs by the chain rule.

The GPT's hot path uses five fused operations instead, each one Function whose backward is
simpler and cheaper written as a whole than as a chain of these: linear, LayerNorm, GELU,
cross-entropy and causal attention, in :mod:`mpipar.fused`. The functional interface at the
end of this file covers both, so model code calls ``ops.linear`` as it calls ``ops.add``.

Conventions: ``backward`` may return the incoming gradient itself, but never modifies it in
place and never returns an array it saved in ``forward``. Arrays keep the dtype they came in
with (float32 or float64, or a 16-bit type under mixed precision): scalars are Python floats
so they never promote. Sums that reduce a gradient (over broadcast axes, into embedding rows)
accumulate in fp32 for 16-bit gradients (:mod:`mpipar.precision`).
"""

from __future__ import annotations

import builtins
from typing import Any

# fused imports Function from autograd, which imports this module at its end: a reference to
# the module (not names from it) works whichever of the three is imported first.
from mpipar import fused
from mpipar.autograd import Function, Tensor
from mpipar.backend import array_module
from mpipar.precision import narrow, sum_rows, upcast


def _as_tensor(x: Any, like: Tensor | None) -> Tensor:
    if isinstance(x, Tensor):
        return x
    xp = array_module(like.data) if like is not None else array_module(x)
    dtype = like.dtype if like is not None else None
    return Tensor(xp.asarray(x, dtype=dtype))


def _pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    like = a if isinstance(a, Tensor) else b
    return _as_tensor(a, like), _as_tensor(b, like)


def unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``grad`` over the axes that broadcasting added or stretched, back to ``shape``.

    If y = x + z with x of shape (3, 1) broadcast to (3, 4), then dL/dx[i, 0] = Σ_j dL/dy[i, j].
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = sum_rows(grad, axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = sum_rows(grad, axis=stretched, keepdims=True)
    return grad


# ---------------------------------------------------------------------------------------------
# Elementwise arithmetic (with broadcasting)
# ---------------------------------------------------------------------------------------------
class Add(Function):
    """y = a + b;  dy/da = 1, dy/db = 1 (summed over broadcast axes)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, g):
        return unbroadcast(g, ctx.shapes[0]), unbroadcast(g, ctx.shapes[1])


class Sub(Function):
    """y = a − b;  dy/da = 1, dy/db = −1."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, g):
        gb = -unbroadcast(g, ctx.shapes[1]) if ctx.needs_input_grad[1] else None
        return unbroadcast(g, ctx.shapes[0]), gb


class Mul(Function):
    """y = a · b;  dy/da = b, dy/db = a."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        ga = unbroadcast(g * b, a.shape) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(g * a, b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    """y = a / b;  dy/da = 1/b, dy/db = −a/b²."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        ga = unbroadcast(g / b, a.shape) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(-g * a / (b * b), b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    """y = −x;  dy/dx = −1."""

    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, g):
        return (-g,)


class Exp(Function):
    """y = eˣ;  dy/dx = y."""

    @staticmethod
    def forward(ctx, x):
        y = array_module(x).exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.saved[0],)


class Log(Function):
    """y = ln x;  dy/dx = 1/x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return array_module(x).log(x)

    @staticmethod
    def backward(ctx, g):
        return (g / ctx.saved[0],)


class Tanh(Function):
    """y = tanh x;  dy/dx = 1 − y²."""

    @staticmethod
    def forward(ctx, x):
        y = array_module(x).tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return (g * (1.0 - y * y),)


# ---------------------------------------------------------------------------------------------
# Matrix products and reductions
# ---------------------------------------------------------------------------------------------
class MatMul(Function):
    """Y = A @ B (batched over leading axes, with broadcasting);  dA = G Bᵀ, dB = Aᵀ G."""

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs arrays of at least 2 dims, got {a.shape} @ {b.shape}")
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        ga = unbroadcast(g @ b.swapaxes(-1, -2), a.shape) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(a.swapaxes(-1, -2) @ g, b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Sum(Function):
    """y = Σ x over ``axis``;  dy/dx = 1 (the gradient is broadcast back)."""

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        return array_module(x).asarray(x.sum(axis=axis, keepdims=keepdims))

    @staticmethod
    def backward(ctx, g):
        return (_expand(g, ctx.shape, ctx.axis, ctx.keepdims),)


class Mean(Function):
    """y = (1/n) Σ x over ``axis``;  dy/dx = 1/n."""

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        y = x.mean(axis=axis, keepdims=keepdims)
        ctx.n = x.size // max(y.size, 1)
        return array_module(x).asarray(y)

    @staticmethod
    def backward(ctx, g):
        out = _expand(g, ctx.shape, ctx.axis, ctx.keepdims)
        out *= 1.0 / ctx.n
        return (out,)


def _expand(g, shape, axis, keepdims):
    """Broadcast a reduced gradient back to ``shape`` as a fresh, writable array."""
    xp = array_module(g)
    if axis is not None and not keepdims:
        axes = (axis,) if isinstance(axis, int) else axis
        g = xp.expand_dims(g, tuple(a % len(shape) for a in axes))
    out = xp.empty(shape, dtype=g.dtype)
    out[...] = g
    return out


# ---------------------------------------------------------------------------------------------
# Shape operations
# ---------------------------------------------------------------------------------------------
class Reshape(Function):
    """y = x viewed with a new shape;  the gradient is reshaped back."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, g):
        return (g.reshape(ctx.shape),)


class Transpose(Function):
    """y = x with axes permuted;  the gradient is permuted by the inverse permutation."""

    @staticmethod
    def forward(ctx, x, axes=None):
        axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
        ctx.inverse = tuple(sorted(range(len(axes)), key=axes.__getitem__))
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, g):
        return (g.transpose(ctx.inverse),)


def _has_array_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(hasattr(i, "shape") or isinstance(i, list) for i in items)


class GetItem(Function):
    """y = x[index];  dx = zeros with g added at ``index`` (repeated indices add up)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape, ctx.dtype, ctx.index = x.shape, x.dtype, index
        return x[index]

    @staticmethod
    def backward(ctx, g):
        xp = array_module(g)
        out = xp.zeros(ctx.shape, dtype=ctx.dtype)
        if _has_array_index(ctx.index):
            xp.add.at(out, ctx.index, g)
        else:
            out[ctx.index] = g
        return (out,)


class Concat(Function):
    """y = [x₁, x₂, ...] joined along ``axis``;  each xᵢ gets its slice of the gradient."""

    @staticmethod
    def forward(ctx, *xs, axis=0):
        ctx.axis = axis
        ctx.sizes = [x.shape[axis] for x in xs]
        return array_module(xs[0]).concatenate(xs, axis=axis)

    @staticmethod
    def backward(ctx, g):
        bounds, start = [], 0
        for n in ctx.sizes:
            bounds.append((start, start + n))
            start += n
        index = [slice(None)] * g.ndim
        grads = []
        for lo, hi in bounds:
            index[ctx.axis] = slice(lo, hi)
            grads.append(g[tuple(index)])
        return tuple(grads)


# ---------------------------------------------------------------------------------------------
# Softmax family, masking, dropout
# ---------------------------------------------------------------------------------------------
class Softmax(Function):
    """y = eˣ / Σ eˣ along ``axis`` (max subtracted for stability);  dx = y ⊙ (g − Σ g⊙y)."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = array_module(x)
        y = x - x.max(axis=axis, keepdims=True)
        xp.exp(y, out=y)
        y /= y.sum(axis=axis, keepdims=True)
        ctx.axis = axis
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        dx = g - (g * y).sum(axis=ctx.axis, keepdims=True)
        dx *= y
        return (dx,)


class LogSoftmax(Function):
    """y = x − log Σ eˣ along ``axis``;  dx = g − softmax(x) · Σ g."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = array_module(x)
        m = x.max(axis=axis, keepdims=True)
        z = x - m
        lse = xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
        z -= lse
        ctx.axis = axis
        ctx.save_for_backward(z)
        return z

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        dx = array_module(y).exp(y)
        dx *= -g.sum(axis=ctx.axis, keepdims=True)
        dx += g
        return (dx,)


class CausalMask(Function):
    """y = x with future positions (key j > query i in the last two axes) set to −inf.

    Softmax then gives them weight 0. dy/dx = 1 where kept, 0 where masked.
    """

    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        t = x.shape[-1]
        keep = xp.tril(xp.ones((x.shape[-2], t), dtype=bool))
        ctx.save_for_backward(keep)
        return xp.where(keep, x, -xp.inf)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved
        return (g * keep,)


class Dropout(Function):
    """y = x ⊙ mask / (1 − p), the mask drawn by the caller;  dx = g ⊙ mask / (1 − p).

    ``scaled_mask`` already holds mask/(1 − p) so that the expectation of y equals x.
    """

    @staticmethod
    def forward(ctx, x, scaled_mask):
        ctx.save_for_backward(scaled_mask)
        return x * scaled_mask

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.saved[0],)


class Embedding(Function):
    """y = W[idx] (row lookup);  dW = Σ over positions p with idx[p] = i of g[p], into row i."""

    @staticmethod
    def forward(ctx, weight, idx):
        ctx.idx, ctx.shape = idx, weight.shape
        return weight[idx]

    @staticmethod
    def backward(ctx, g):
        rows = upcast(g).reshape(-1, ctx.shape[1])  # fp32 sums for 16-bit gradients
        return (narrow(scatter_add_rows(ctx.shape, ctx.idx.reshape(-1), rows), g.dtype),)


def scatter_add_rows(shape: tuple[int, int], idx: Any, rows: Any) -> Any:
    """out = zeros(shape) with out[idx[p]] += rows[p] for every p, in the order of p.

    That is ``add.at(out, idx, rows)``, computed faster: the rows are grouped by index with a
    stable sort, and each group is summed by one reduction over its rows, which adds them in
    their original order, so every element is the same sum in the same order as ``add.at``'s
    (bit for bit). An index that occurs once is a plain copy.
    """
    xp = array_module(rows)
    out = xp.zeros(shape, dtype=rows.dtype)
    if idx.size == 0:  # no rows to add (a vocabulary shard none of the tokens falls in)
        return out
    order = xp.argsort(idx, kind="stable")
    keys, grouped = idx[order], rows[order]
    starts = xp.flatnonzero(xp.concatenate([xp.ones(1, dtype=bool), keys[1:] != keys[:-1]]))
    if len(starts) == len(keys):  # no index repeats
        out[keys] = grouped
        return out
    bounds = [*starts.tolist(), len(keys)]
    targets = keys[starts].tolist()  # one device-to-host copy, not one per group
    for lo, hi, k in zip(bounds[:-1], bounds[1:], targets, strict=True):
        grouped[lo:hi].sum(axis=0, out=out[k])  # = add.reduce (cupy 12 has no ufunc.reduce)
    return out


# ---------------------------------------------------------------------------------------------
# Functional interface
# ---------------------------------------------------------------------------------------------
def add(a, b) -> Tensor:
    return Add.apply(*_pair(a, b))


def sub(a, b) -> Tensor:
    return Sub.apply(*_pair(a, b))


def mul(a, b) -> Tensor:
    return Mul.apply(*_pair(a, b))


def div(a, b) -> Tensor:
    return Div.apply(*_pair(a, b))


def neg(x: Tensor) -> Tensor:
    return Neg.apply(x)


def exp(x: Tensor) -> Tensor:
    return Exp.apply(x)


def log(x: Tensor) -> Tensor:
    return Log.apply(x)


def tanh(x: Tensor) -> Tensor:
    return Tanh.apply(x)


def gelu(x: Tensor) -> Tensor:
    return fused.Gelu.apply(x)


def matmul(a, b) -> Tensor:
    return MatMul.apply(*_pair(a, b))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if bias is None:
        return fused.Linear.apply(x, weight)
    return fused.Linear.apply(x, weight, bias)


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def reshape(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x: Tensor, axes=None) -> Tensor:
    return Transpose.apply(x, axes=axes)


def getitem(x: Tensor, index) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    return GetItem.apply(x, index=index)


def concat(xs: list[Tensor], axis: int = 0) -> Tensor:
    return Concat.apply(*xs, axis=axis)


def split(x: Tensor, sizes: int | list[int], axis: int = -1) -> list[Tensor]:
    """Split ``x`` along ``axis`` into ``sizes`` equal parts (an int) or parts of given sizes."""
    n = x.shape[axis]
    if isinstance(sizes, int):
        if n % sizes:
            raise ValueError(f"cannot split an axis of length {n} into {sizes} equal parts")
        sizes = [n // sizes] * sizes
    if builtins.sum(sizes) != n:
        raise ValueError(f"split sizes {sizes} do not add up to the axis length {n}")
    parts, start = [], 0
    for size in sizes:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, start + size)
        parts.append(getitem(x, tuple(index)))
        start += size
    return parts


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(x, axis=axis)


def causal_mask(x: Tensor) -> Tensor:
    return CausalMask.apply(x)


def dropout(x: Tensor, scaled_mask) -> Tensor:
    return Dropout.apply(x, scaled_mask=scaled_mask)


def layer_norm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    return fused.LayerNorm.apply(x, gamma, beta, eps=eps)


def embedding(weight: Tensor, idx) -> Tensor:
    if isinstance(idx, Tensor):
        idx = idx.data
    return Embedding.apply(weight, idx=idx)


def cross_entropy(logits: Tensor, targets) -> Tensor:
    if isinstance(targets, Tensor):
        targets = targets.data
    return fused.CrossEntropy.apply(logits, targets=targets)


def causal_attention(qkv: Tensor, n_head: int, drop_mask=None, recompute: bool = False) -> Tensor:
    return fused.CausalAttention.apply(qkv, n_head=n_head, drop_mask=drop_mask,
                                       recompute=recompute)

