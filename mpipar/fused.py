"""Fused operations: the GPT's hot path, each one ``Function`` with a hand-written backward.

:mod:`mpipar.ops` holds the textbook operations a reader follows to learn backpropagation. The
GPT could be built from those alone, but five of its steps are both simpler and cheaper to
differentiate written as a whole than as a chain of small ops:

* ``Linear``: y = x Wᵀ + b as one GEMM over all rows, whatever the leading shape of x;
* ``LayerNorm``: normalisation, gain and bias, with the compact backward that a chain of small
  ops would spread over many intermediate arrays;
* ``Gelu``: the tanh-form GELU, its elementwise chain run in cache-sized blocks;
* ``CrossEntropy``: log-softmax and the negative log-likelihood together, stable for huge
  logits, with the short gradient (softmax − onehot) / N;
* ``CausalAttention``: scores, causal mask, softmax, dropout and the weighted sum of values
  for every head at once, a few sequences at a time so each block of scores stays in cache.

Each docstring gives the forward formula and the gradient that ``backward`` computes; each is
checked against central differences like the textbook ops (``tests/test_ops.py``). Their
functional forms (``ops.linear``, ``ops.layer_norm``, ``ops.gelu``, ``ops.cross_entropy``,
``ops.causal_attention``) are in :mod:`mpipar.ops`, so model code calls every operation the
same way.

Cache blocking. On a CPU, an elementwise chain over a large activation reads and writes main
memory once per step of the chain. Cut into blocks of about ``CACHE_BLOCK`` elements, each
block stays in cache through the whole chain, which then reads cached data instead of main
memory. Blocking changes when an element is computed, not the formula. On a GPU there is no
such cache effect to gain, so there every array is one block.

The conventions are those of :mod:`mpipar.ops`: ``backward`` never modifies the incoming
gradient in place nor returns an array it saved in ``forward``, and arrays keep their dtype.
"""

from __future__ import annotations

import math

from mpipar.autograd import Function
from mpipar.backend import array_module

GELU_C = math.sqrt(2.0 / math.pi)
GELU_K = 0.044715

# ---------------------------------------------------------------------------------------------
# Cache blocking
# ---------------------------------------------------------------------------------------------
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


def _batch_blocks(scores) -> list[slice]:
    """Slices of the batch axis of (B, H, T, T) scores, about CACHE_BLOCK elements each."""
    per_row = scores[0].size if scores.shape[0] else 1
    if array_module(scores).__name__ != "numpy":
        return [slice(0, scores.shape[0])]
    step = max(1, CACHE_BLOCK // max(per_row, 1))
    return [slice(i, i + step) for i in range(0, scores.shape[0], step)]


# ---------------------------------------------------------------------------------------------
# Linear and LayerNorm
# ---------------------------------------------------------------------------------------------
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


class LayerNorm(Function):
    """y = γ ⊙ x̂ + β with x̂ = (x − μ)/√(σ² + ε) over the last axis.

    With N features, dx = (1/σ̂)(ĝ − mean(ĝ) − x̂ ⊙ mean(ĝ ⊙ x̂)), ĝ = g ⊙ γ;
    dγ = Σ_rows g ⊙ x̂;  dβ = Σ_rows g.

    Rows are processed in cache-sized blocks, so each block stays in cache through the whole
    chain. Every mean and sum is computed as the dot product it is: a row mean is the row
    times (1/N, ..., 1/N) (one matrix-vector product for the block), a row's Σ x̂² is
    ``einsum("ij,ij->i")`` (no squared temporary), Σ_j ĝ_j = g·γ, and a sum over rows is
    (1, ..., 1) times the rows. These run as BLAS or fused loops, several times faster than
    numpy's reductions along a short last axis; they add in another order than a plain
    ``mean``, so results differ from it in the last bits only.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps=1e-5):
        xp = array_module(x)
        n = x.shape[-1]
        x2 = x.reshape(-1, n)  # (R, N)
        xhat, y = xp.empty_like(x2), xp.empty_like(x2)
        rstd = xp.empty((x2.shape[0], 1), dtype=x.dtype)
        inv_n = xp.full(n, 1.0 / n, dtype=x.dtype)
        for rows in _row_blocks(x2):
            xb, hb, rb = x2[rows], xhat[rows], rstd[rows]
            xp.subtract(xb, (xb @ inv_n)[:, None], out=hb)  # x − μ
            rb[:, 0] = xp.einsum("ij,ij->i", hb, hb)  # N·σ²
            rb *= 1.0 / n
            rb += eps
            xp.sqrt(rb, out=rb)
            xp.divide(1.0, rb, out=rb)
            hb *= rb
            xp.multiply(hb, gamma, out=y[rows])
            y[rows] += beta
        ctx.save_for_backward(xhat.reshape(x.shape), rstd.reshape(*x.shape[:-1], 1), gamma)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, gamma = ctx.saved
        xp = array_module(g)
        need = ctx.needs_input_grad
        n = g.shape[-1]
        g2, h2, r2 = g.reshape(-1, n), xhat.reshape(-1, n), rstd.reshape(-1, 1)  # (R, N)
        gx = xp.empty_like(g2) if need[0] else None
        gg = xp.zeros(n, dtype=g.dtype) if need[1] else None
        gb = xp.zeros(n, dtype=g.dtype) if need[2] else None
        blocks = _row_blocks(g2)
        ones = xp.ones(blocks[0].stop - blocks[0].start, dtype=g.dtype)  # the largest block
        scratch = xp.empty_like(g2[blocks[0]])
        for rows in blocks:
            gb_, hb = g2[rows], h2[rows]
            sb, ob = scratch[: gb_.shape[0]], ones[: gb_.shape[0]]
            xp.multiply(gb_, hb, out=sb)  # g ⊙ x̂
            if gg is not None:
                gg += ob @ sb
            if gb is not None:
                gb += ob @ gb_
            if gx is None:
                continue
            mean_gx = (sb @ gamma)[:, None] * (1.0 / n)  # mean(ĝ ⊙ x̂)
            mean_g = (gb_ @ gamma)[:, None] * (1.0 / n)  # mean(ĝ)
            xb = gx[rows]
            xp.multiply(gb_, gamma, out=xb)  # ĝ
            xb -= mean_g
            xp.multiply(hb, mean_gx, out=sb)
            xb -= sb
            xb *= r2[rows]
        return (None if gx is None else gx.reshape(g.shape)), gg, gb


# ---------------------------------------------------------------------------------------------
# Elementwise: GELU
# ---------------------------------------------------------------------------------------------
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
# Loss and attention
# ---------------------------------------------------------------------------------------------
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


def causal_mask_bias(t: int, xp, dtype):
    """(t, t) additive mask: 0 where key ≤ query, −inf where the key lies in the future."""
    bias = xp.zeros((t, t), dtype=dtype)
    bias[xp.triu_indices(t, 1)] = -xp.inf
    return bias


class CausalAttention(Function):
    """Multi-head causal self-attention from packed projections.

    ``qkv`` is (B, T, 3·C) laid out [q | k | v], each C = H·D (H heads of size D). Per head:
    S = Q Kᵀ/√D + mask,  P = softmax(S),  Y = (P ⊙ drop) V,  output (B, T, C) heads side by side.
    Backward:  dV = P̃ᵀ dY,  dP̃ = dY Vᵀ,  dP = dP̃ ⊙ drop,  dS = P ⊙ (dP − Σ_j dP ⊙ P),
    dQ = dS K/√D,  dK = dSᵀ Q/√D  (P̃ = P ⊙ drop; drop is the scaled dropout mask or 1).

    Shaped for speed without changing the formulas: the row sums of the softmax (Σ_j e^S) are
    one matrix-vector product with (1, ..., 1) and Σ_j dP ⊙ P one ``einsum``, faster than
    numpy's reductions along a short last axis; the products write straight into the heads'
    slots of the output, so no head-ordered temporary is copied over; the 1/√D of dQ and dK
    is applied while they are written. Sums and that scaling take another order than a plain
    ``sum``, so results differ from one in the last bits only.
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
        ones = xp.ones(t, dtype=qkv.dtype)
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
            inv = sb.reshape(-1, t) @ ones  # row sums as one matrix-vector product, then 1/Σ
            xp.divide(1.0, inv, out=inv)
            sb *= inv.reshape(*sb.shape[:-1], 1)
            if drop_mask is not None:
                xp.multiply(sb, drop_mask[rows], out=pd[rows])
            xp.matmul(pd[rows], v[rows], out=y[rows].transpose(0, 2, 1, 3))
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
            dv = out[rows, :, 2].transpose(0, 2, 1, 3)  # (b', H, T, D) views of the result
            xp.matmul(pd[rows].swapaxes(-1, -2), gyb, out=dv)
            dp = gyb @ v[rows].swapaxes(-1, -2)  # (b', H, T, T)
            if drop_mask is not None:
                dp *= drop_mask[rows]
            dot = xp.einsum("ij,ij->i", dp.reshape(-1, t), pb.reshape(-1, t))  # Σ_j dP ⊙ P
            dp -= dot.reshape(*dp.shape[:-1], 1)
            dp *= pb  # dS; the 1/√D is applied to dQ and dK as they are written
            xp.multiply(dp @ k[rows], ctx.scale, out=out[rows, :, 0].transpose(0, 2, 1, 3))
            xp.multiply(dp.swapaxes(-1, -2) @ q[rows], ctx.scale,
                        out=out[rows, :, 1].transpose(0, 2, 1, 3))
        return (out.reshape(b, t, 3 * h * d),)
