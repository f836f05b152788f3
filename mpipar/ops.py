"""Differentiable operations: each is a ``Function`` whose docstring gives its derivative.

Elementwise and shape operations are the textbook ones. The GPT's hot path uses a few fused
operations, each one Function because its backward is both simpler and cheaper written as a
whole than as a chain of small ops: ``linear`` (x Wᵀ + b), ``layer_norm``, ``gelu``,
``cross_entropy`` (log-softmax and the negative log-likelihood together) and
``causal_attention`` (scores, causal mask, softmax, weighted sum of values).

Conventions: ``backward`` may return the incoming gradient itself, but never modifies it in
place and never returns an array it saved in ``forward``. Arrays keep the dtype they came in
with (float32 or float64): scalars are Python floats so they never promote.
"""

from __future__ import annotations

import builtins
import math
from typing import Any

from mpipar.autograd import Function, Tensor
from mpipar.backend import array_module

GELU_C = math.sqrt(2.0 / math.pi)
GELU_K = 0.044715


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
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
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


# Elementwise chains over a large activation run faster in blocks that stay in the CPU's cache
# (each pass of the chain then reads cached data instead of main memory): about 64K elements.
CACHE_BLOCK = 1 << 16


def _row_blocks(a) -> list[slice]:
    """Slices of rows of ``a`` viewed as (rows, last axis), about CACHE_BLOCK elements each.

    On a GPU there is no such cache effect to gain, so the whole array is one block.
    """
    rows = a.size // max(a.shape[-1], 1)
    if array_module(a).__name__ != "numpy":
        return [slice(0, rows)]
    step = max(1, CACHE_BLOCK // max(a.shape[-1], 1))
    return [slice(i, i + step) for i in range(0, rows, step)]


class Gelu(Function):
    """GELU, tanh form: y = ½x(1 + tanh u), u = c(x + kx³), c = √(2/π), k = 0.044715.

    dy/dx = ½(1 + t) + ½x(1 − t²)·c(1 + 3kx²), with t = tanh u.
    """

    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        t, y = xp.empty_like(x), xp.empty_like(x)
        x2, t2, y2 = (a.reshape(-1, x.shape[-1]) for a in (x, t, y))
        for rows in _row_blocks(x2):
            xb, tb, yb = x2[rows], t2[rows], y2[rows]
            xp.multiply(xb, xb, out=tb)  # u = x(c + ck·x²), then t = tanh u, in one buffer
            tb *= GELU_C * GELU_K
            tb += GELU_C
            tb *= xb
            xp.tanh(tb, out=tb)
            xp.add(tb, 1.0, out=yb)
            yb *= xb
            yb *= 0.5
        ctx.save_for_backward(x, t)
        return y

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved
        xp = array_module(g)
        d = xp.empty_like(g)
        x2, t2, g2, d2 = (a.reshape(-1, x.shape[-1]) for a in (x, t, g, d))
        blocks = _row_blocks(x2)
        scratch = xp.empty_like(x2[blocks[0]])  # the first block is the largest
        for rows in blocks:
            xb, tb, gb, db = x2[rows], t2[rows], g2[rows], d2[rows]
            sb = scratch[: xb.shape[0]]
            xp.multiply(xb, xb, out=db)
            db *= 3.0 * GELU_K * GELU_C
            db += GELU_C  # c(1 + 3kx²)
            xp.multiply(tb, tb, out=sb)
            xp.subtract(1.0, sb, out=sb)  # 1 − t²
            db *= sb
            db *= xb
            db += tb
            db += 1.0
            db *= 0.5
            db *= gb
        return (d,)


# ---------------------------------------------------------------------------------------------
# Matrix products and reductions
# ---------------------------------------------------------------------------------------------
def _swap_last(a):
    return a.swapaxes(-1, -2)


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
        ga = unbroadcast(g @ _swap_last(b), a.shape) if ctx.needs_input_grad[0] else None
        gb = unbroadcast(_swap_last(a) @ g, b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


class Linear(Function):
    """y = x Wᵀ + b with W of shape (out, in);  dx = g W,  dW = gᵀ x,  db = Σ_rows g.

    x may have any leading shape (..., in); it is viewed as a matrix of rows, so the whole
    product is one GEMM.
    """

    @staticmethod
    def forward(ctx, x, w, b=None):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ w.T
        if b is not None:
            y += b
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved
        g2 = g.reshape(-1, g.shape[-1])
        need = ctx.needs_input_grad
        gx = (g2 @ w).reshape(x.shape) if need[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if need[1] else None
        if not ctx.has_bias:
            return gx, gw
        gb = g2.sum(axis=0) if need[2] else None
        return gx, gw, gb


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


def causal_mask_bias(t: int, xp, dtype):
    """(t, t) additive mask: 0 where key ≤ query, −inf where the key lies in the future."""
    bias = xp.zeros((t, t), dtype=dtype)
    bias[xp.triu_indices(t, 1)] = -xp.inf
    return bias


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


# ---------------------------------------------------------------------------------------------
# Fused GPT operations
# ---------------------------------------------------------------------------------------------
class LayerNorm(Function):
    """y = γ ⊙ x̂ + β with x̂ = (x − μ)/√(σ² + ε) over the last axis.

    With N features, dx = (1/σ̂)(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)), ĝ = g ⊙ γ;
    dγ = Σ_rows g ⊙ x̂;  dβ = Σ_rows g.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps=1e-5):
        xp = array_module(x)
        xhat = x - x.mean(axis=-1, keepdims=True)
        var = (xhat * xhat).mean(axis=-1, keepdims=True)
        var += eps
        rstd = xp.sqrt(var, out=var)
        xp.divide(1.0, rstd, out=rstd)
        xhat *= rstd
        y = xhat * gamma
        y += beta
        ctx.save_for_backward(xhat, rstd, gamma)
        return y

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, gamma = ctx.saved
        need = ctx.needs_input_grad
        gx = gg = gb = None
        lead = tuple(range(g.ndim - 1))
        if need[1]:
            gg = (g * xhat).sum(axis=lead)
        if need[2]:
            gb = g.sum(axis=lead)
        if need[0]:
            ghat = g * gamma
            mean_g = ghat.mean(axis=-1, keepdims=True)
            mean_gx = (ghat * xhat).mean(axis=-1, keepdims=True)
            gx = ghat
            gx -= mean_g
            gx -= xhat * mean_gx
            gx *= rstd
        return gx, gg, gb


class Embedding(Function):
    """y = W[idx] (row lookup);  dW = Σ over positions p with idx[p] = i of g[p], into row i."""

    @staticmethod
    def forward(ctx, weight, idx):
        ctx.idx, ctx.shape = idx, weight.shape
        return weight[idx]

    @staticmethod
    def backward(ctx, g):
        xp = array_module(g)
        gw = xp.zeros(ctx.shape, dtype=g.dtype)
        xp.add.at(gw, ctx.idx.reshape(-1), g.reshape(-1, ctx.shape[1]))
        return (gw,)


class CrossEntropy(Function):
    """L = −(1/N) Σ_n log softmax(zₙ)[tₙ], computed stably (log-sum-exp with the max out).

    dL/dzₙ = (softmax(zₙ) − onehot(tₙ)) / N. ``logits`` is (..., V) and ``targets`` (...)
    integer; N is the number of positions.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        xp = array_module(logits)
        v = logits.shape[-1]
        z = logits.reshape(-1, v)
        t = targets.reshape(-1)
        n = z.shape[0]
        rows = xp.arange(n)
        m = z.max(axis=1, keepdims=True)
        p = z - m
        target_z = p[rows, t].copy()
        xp.exp(p, out=p)
        s = p.sum(axis=1, keepdims=True)
        loss = (xp.log(s[:, 0]) - target_z).sum() / n
        p /= s  # softmax, kept for backward
        ctx.save_for_backward(p, t, rows)
        ctx.shape = logits.shape
        return xp.asarray(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, g):
        p, t, rows = ctx.saved
        d = p * (g / p.shape[0])
        d[rows, t] -= g / p.shape[0]
        return (d.reshape(ctx.shape),)


class CausalAttention(Function):
    """Multi-head causal self-attention from packed projections.

    ``qkv`` is (B, T, 3·C) laid out [q | k | v], each C = H·D (H heads of size D). Per head:
    S = Q Kᵀ/√D + mask,  P = softmax(S),  Y = (P ⊙ drop) V,  output (B, T, C) heads side by side.
    Backward:  dV = P̃ᵀ dY,  dP̃ = dY Vᵀ,  dP = dP̃ ⊙ drop,  dS = P ⊙ (dP − Σ_j dP ⊙ P),
    dQ = dS K/√D,  dK = dSᵀ Q/√D  (P̃ = P ⊙ drop; drop is the scaled dropout mask or 1).
    """

    @staticmethod
    def forward(ctx, qkv, n_head, drop_mask=None):
        xp = array_module(qkv)
        b, t, c3 = qkv.shape
        c = c3 // 3
        d = c // n_head
        heads = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        q, k, v = heads[0], heads[1], heads[2]
        scale = 1.0 / math.sqrt(d)
        bias = causal_mask_bias(t, xp, qkv.dtype)
        p = xp.empty((b, n_head, t, t), dtype=qkv.dtype)  # (B, H, T, T), kept for backward
        pd = p if drop_mask is None else xp.empty_like(p)
        y = xp.empty((b, t, n_head, d), dtype=qkv.dtype)  # heads side by side, as returned
        # A few sequences at a time, so each (H, T, T) block of scores stays in cache through
        # the whole softmax instead of streaming the full (B, H, T, T) array seven times.
        for rows in _batch_blocks(p):
            sb = p[rows]
            xp.matmul(q[rows], k[rows].swapaxes(-1, -2), out=sb)
            sb *= scale
            sb += bias
            sb -= sb.max(axis=-1, keepdims=True)
            xp.exp(sb, out=sb)
            sb /= sb.sum(axis=-1, keepdims=True)
            if drop_mask is not None:
                xp.multiply(sb, drop_mask[rows], out=pd[rows])
            y[rows] = (pd[rows] @ v[rows]).transpose(0, 2, 1, 3)
        ctx.save_for_backward(q, k, v, p, pd, drop_mask)
        ctx.scale = scale
        return y.reshape(b, t, c)

    @staticmethod
    def backward(ctx, g):
        q, k, v, p, pd, drop_mask = ctx.saved
        xp = array_module(g)
        b, h, t, d = q.shape
        gy = g.reshape(b, t, h, d).transpose(0, 2, 1, 3)  # (B, H, T, D)
        out = xp.empty((b, t, 3, h, d), dtype=g.dtype)
        for rows in _batch_blocks(p):
            gyb, pb = gy[rows], p[rows]
            out[rows, :, 2] = (pd[rows].swapaxes(-1, -2) @ gyb).transpose(0, 2, 1, 3)  # dV
            dp = gyb @ v[rows].swapaxes(-1, -2)  # (b', H, T, T)
            if drop_mask is not None:
                dp *= drop_mask[rows]
            dp -= (dp * pb).sum(axis=-1, keepdims=True)
            dp *= pb
            dp *= ctx.scale  # now dS/√D folded in
            out[rows, :, 0] = (dp @ k[rows]).transpose(0, 2, 1, 3)  # dQ
            out[rows, :, 1] = (dp.swapaxes(-1, -2) @ q[rows]).transpose(0, 2, 1, 3)  # dK
        return (out.reshape(b, t, 3 * h * d),)


def _batch_blocks(scores) -> list[slice]:
    """Slices of the batch axis of (B, H, T, T) scores, about CACHE_BLOCK elements each."""
    per_row = scores[0].size if scores.shape[0] else 1
    if array_module(scores).__name__ != "numpy":
        return [slice(0, scores.shape[0])]
    step = max(1, CACHE_BLOCK // max(per_row, 1))
    return [slice(i, i + step) for i in range(0, scores.shape[0], step)]


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
    return Gelu.apply(x)


def matmul(a, b) -> Tensor:
    return MatMul.apply(*_pair(a, b))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


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
    return LayerNorm.apply(x, gamma, beta, eps=eps)


def embedding(weight: Tensor, idx) -> Tensor:
    if isinstance(idx, Tensor):
        idx = idx.data
    return Embedding.apply(weight, idx=idx)


def cross_entropy(logits: Tensor, targets) -> Tensor:
    if isinstance(targets, Tensor):
        targets = targets.data
    return CrossEntropy.apply(logits, targets=targets)


def causal_attention(qkv: Tensor, n_head: int, drop_mask=None) -> Tensor:
    return CausalAttention.apply(qkv, n_head=n_head, drop_mask=drop_mask)

