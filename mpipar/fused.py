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

16-bit inputs (mixed precision, :mod:`mpipar.precision`). Each operation takes and returns
arrays of the compute dtype and saves 16-bit arrays for backward, but computes inside in
fp32, as a fused GPU kernel does: products through :func:`~mpipar.precision.matmul` (fp32
accumulation, one rounding), LayerNorm's statistics, GELU, the attention softmax and the
cross-entropy on fp32 copies (:func:`~mpipar.precision.upcast`), rounded once on the way out
(:func:`~mpipar.precision.narrow`). The loss stays fp32. For float32 and float64 inputs every
one of those calls returns its argument unchanged: no cast, and the formulas above computed
in that dtype alone.
"""

from __future__ import annotations

import math

from mpipar.autograd import Function
from mpipar.backend import array_module
from mpipar.precision import accumulate_dtype, finfo, matmul, narrow, sum_rows, upcast

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
    return _sequence_blocks(scores.shape[0], scores[0].size if scores.shape[0] else 1,
                            array_module(scores))


def _sequence_blocks(b: int, per_row: int, xp) -> list[slice]:
    """`_batch_blocks` of B = ``b`` sequences whose scores take ``per_row`` elements each."""
    if xp.__name__ != "numpy":
        return [slice(0, b)]
    step = max(1, CACHE_BLOCK // max(per_row, 1))
    return [slice(i, i + step) for i in range(0, b, step)]


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
        y = matmul(x2, w.T)
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
        gx = matmul(g2, w).reshape(x.shape) if need[0] else None
        gw = matmul(g2.T, x.reshape(-1, x.shape[-1])) if need[1] else None
        if not ctx.has_bias:
            return gx, gw
        gb = sum_rows(g2, axis=0) if need[2] else None
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
    The statistics, and the whole backward, are computed in fp32 for a 16-bit x.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps=1e-5):
        xp = array_module(x)
        n = x.shape[-1]
        acc = accumulate_dtype(x.dtype)
        x2 = x.reshape(-1, n)  # (R, N)
        xhat, y = xp.empty(x2.shape, dtype=acc), xp.empty(x2.shape, dtype=acc)
        rstd = xp.empty((x2.shape[0], 1), dtype=acc)
        inv_n = xp.full(n, 1.0 / n, dtype=acc)
        for rows in _row_blocks(x2):
            xb, hb, rb = upcast(x2[rows]), xhat[rows], rstd[rows]
            xp.subtract(xb, (xb @ inv_n)[:, None], out=hb)  # x − μ
            rb[:, 0] = xp.einsum("ij,ij->i", hb, hb)  # N·σ²
            rb *= 1.0 / n
            rb += eps
            xp.sqrt(rb, out=rb)
            xp.divide(1.0, rb, out=rb)
            hb *= rb
            xp.multiply(hb, upcast(gamma), out=y[rows])
            y[rows] += upcast(beta)
        ctx.save_for_backward(narrow(xhat.reshape(x.shape), x.dtype),
                              rstd.reshape(*x.shape[:-1], 1), gamma)
        return narrow(y.reshape(x.shape), x.dtype)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, gamma = ctx.saved
        xp = array_module(g)
        need = ctx.needs_input_grad
        n = g.shape[-1]
        g2, h2 = upcast(g).reshape(-1, n), upcast(xhat).reshape(-1, n)  # (R, N), fp32 for 16 bits
        r2, gam, acc = rstd.reshape(-1, 1), upcast(gamma), g2.dtype
        gx = xp.empty_like(g2) if need[0] else None
        gg = xp.zeros(n, dtype=acc) if need[1] else None
        gb = xp.zeros(n, dtype=acc) if need[2] else None
        blocks = _row_blocks(g2)
        ones = xp.ones(blocks[0].stop - blocks[0].start, dtype=acc)  # the largest block
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
            mean_gx = (sb @ gam)[:, None] * (1.0 / n)  # mean(ĝ ⊙ x̂)
            mean_g = (gb_ @ gam)[:, None] * (1.0 / n)  # mean(ĝ)
            xb = gx[rows]
            xp.multiply(gb_, gam, out=xb)  # ĝ
            xb -= mean_g
            xp.multiply(hb, mean_gx, out=sb)
            xb -= sb
            xb *= r2[rows]
        return (None if gx is None else narrow(gx.reshape(g.shape), g.dtype),
                None if gg is None else narrow(gg, gamma.dtype),
                None if gb is None else narrow(gb, gamma.dtype))


# ---------------------------------------------------------------------------------------------
# Elementwise: GELU
# ---------------------------------------------------------------------------------------------
class Gelu(Function):
    """GELU, tanh form: y = ½x(1 + tanh u), u = c(x + kx³), c = √(2/π), k = 0.044715.

    dy/dx = ½(1 + t) + ½x(1 − t²)·c(1 + 3kx²), with t = tanh u. Forward keeps s = 1 + t
    (beside x), which turns that into dy/dx = ½s·(1 + x(2 − s)·c(1 + 3kx²)), since
    1 − t² = (1 − t)(1 + t) = (2 − s)s: the same formula in fewer passes over the array (a
    pass that reads two arrays costs several times one that scales an array in place).
    Computed in fp32 for a 16-bit x; x and s are kept in x's dtype.
    """

    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        xc = upcast(x)
        s, y = xp.empty_like(xc), xp.empty_like(xc)
        x2, s2, y2 = (a.reshape(-1, x.shape[-1]) for a in (xc, s, y))
        for rows in _row_blocks(x2):
            xb, sb, yb = x2[rows], s2[rows], y2[rows]
            xp.square(xb, out=sb)  # u = x(c + ck·x²), then s = 1 + tanh u, in one buffer
            sb *= GELU_C * GELU_K
            sb += GELU_C
            sb *= xb
            xp.tanh(sb, out=sb)
            sb += 1.0
            xp.multiply(xb, 0.5, out=yb)
            yb *= sb
        ctx.save_for_backward(x, narrow(s, x.dtype))
        return narrow(y, x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, s = (upcast(a) for a in ctx.saved)
        gc = upcast(g)
        xp = array_module(g)
        d = xp.empty_like(gc)
        x2, s2, g2, d2 = (a.reshape(-1, x.shape[-1]) for a in (x, s, gc, d))
        blocks = _row_blocks(x2)
        # The first block is the largest; an input of no rows (an idle expert) has none.
        scratch = xp.empty_like(x2[blocks[0]]) if blocks else None
        for rows in blocks:
            xb, sb, gb, db = x2[rows], s2[rows], g2[rows], d2[rows]
            tb = scratch[: xb.shape[0]]
            xp.square(xb, out=db)
            db *= 3.0 * GELU_K * GELU_C
            db += GELU_C  # c(1 + 3kx²)
            db *= xb
            xp.subtract(2.0, sb, out=tb)  # 2 − s
            db *= tb
            db += 1.0
            db *= sb
            db *= 0.5
            db *= gb
        return (narrow(d, g.dtype),)


# ---------------------------------------------------------------------------------------------
# Loss and attention
# ---------------------------------------------------------------------------------------------
class CrossEntropy(Function):
    """L = −(1/N) Σ_n log softmax(zₙ)[tₙ] = (1/N) Σ_n (log Σ_j e^(zₙⱼ) − zₙ[tₙ]).

    Computed stably: as it stands while no row's Σ_j e^(zₙⱼ) overflows or underflows, and
    with each row's maximum taken out first otherwise.

    dL/dzₙ = (softmax(zₙ) − onehot(tₙ)) / N. ``logits`` is (..., V) and ``targets`` (...)
    integer; N is the number of positions. 16-bit logits are taken to fp32 first: the
    softmax, the loss (returned as fp32) and the saved probabilities are fp32.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        xp = array_module(logits)
        v = logits.shape[-1]
        z = upcast(logits).reshape(-1, v)
        t = targets.reshape(-1)
        n = z.shape[0]
        rows = xp.arange(n)
        # As in attention's softmax (`attention_probs`): e^z without the row maximum, unless
        # a row sum overflows or underflows; then the textbook e^(z − max).
        p = xp.empty_like(z)
        _exp_quietly(z, out=p)
        ones = xp.ones(v, dtype=z.dtype)
        s = p @ ones  # row sums as one product
        if _sums_are_safe(s):
            target_z = z[rows, t]
        else:
            xp.subtract(z, z.max(axis=1, keepdims=True), out=p)
            target_z = p[rows, t].copy()
            xp.exp(p, out=p)
            s = p @ ones
        loss = (xp.log(s) - target_z).sum() / n
        xp.divide(1.0, s, out=s)
        p *= s[:, None]  # softmax, kept for backward
        ctx.save_for_backward(p, t, rows)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return xp.asarray(loss, dtype=accumulate_dtype(logits.dtype))

    @staticmethod
    def backward(ctx, g):
        p, t, rows = ctx.saved
        d = p * (g / p.shape[0])
        d[rows, t] -= g / p.shape[0]
        return (narrow(d.reshape(ctx.shape), ctx.dtype),)


def causal_mask_bias(t: int, xp, dtype):
    """(t, t) additive mask: 0 where key ≤ query, −inf where the key lies in the future."""
    bias = xp.zeros((t, t), dtype=dtype)
    bias[xp.triu_indices(t, 1)] = -xp.inf
    return bias


def attention_probs(q, k, scale: float, bias, out):
    """P = softmax(Q Kᵀ·scale + bias) over the last axis, written into ``out`` (b, H, T, T).

    One sequence block of `CausalAttention`; backward calls it again to recompute P.

    A softmax is the same whatever number c is taken from a row first: e^(s−c) / Σ e^(s−c).
    The textbook c is the row's maximum, so that no e^(s−c) exceeds 1. Finding it is the
    costliest step of this softmax on a CPU (a reduction along a short last axis: more time
    than the exponentials), and it matters only when e^s would overflow, or when a row's
    e^s are all so small that they lose precision. So the block is exponentiated with c = 0,
    and only if a row sum came out infinite (or NaN), or below tiny/eps (where the row's
    largest terms approach the subnormal range), is it computed again with c = the row's
    maximum. The second pass is the textbook softmax; the first differs from it only in the
    rounding of its last bits. Recomputing a block takes the same path, so the same bits.
    """
    xp = array_module(out)
    t = out.shape[-1]
    ones = xp.ones(t, dtype=out.dtype)
    _scores_into(out, q, k, scale, bias)
    _exp_quietly(out)
    sums = out.reshape(-1, t) @ ones  # row sums as one product
    if not _sums_are_safe(sums):
        _scores_into(out, q, k, scale, bias)
        out -= out.max(axis=-1, keepdims=True)
        xp.exp(out, out=out)
        sums = out.reshape(-1, t) @ ones
    xp.divide(1.0, sums, out=sums)  # 1/Σ
    out *= sums.reshape(*out.shape[:-1], 1)
    return out


def _scores_into(out, q, k, scale: float, bias) -> None:
    """out = Q Kᵀ·scale + bias (the causal mask)."""
    array_module(out).matmul(q, k.swapaxes(-1, -2), out=out)
    out *= scale
    out += bias


def _exp_quietly(a, out=None) -> None:
    """out = e^a (in place when no ``out``); an overflow gives inf (caught by
    `_sums_are_safe`), without numpy's warning. cupy warns of nothing."""
    xp = array_module(a)
    out = a if out is None else out
    if xp.__name__ == "numpy":
        with xp.errstate(over="ignore", under="ignore"):
            xp.exp(a, out=out)
    else:
        xp.exp(a, out=out)


def _sums_are_safe(sums) -> bool:
    """Every row sum of e^s finite and at least tiny/eps of its dtype (see `attention_probs`)."""
    xp = array_module(sums)
    info = finfo(sums.dtype)
    if sums.size == 0:  # a block of no sequences
        return True
    return bool(xp.isfinite(sums).all()) and bool(sums.min() >= info.tiny / info.eps)


def _product_into(out, a, b, scale: float | None = None) -> None:
    """out[...] = a @ b (× scale): written in place when ``out`` has the product's dtype, else
    computed in fp32 and rounded once into the 16-bit ``out``."""
    xp = array_module(out)
    if out.dtype == accumulate_dtype(out.dtype):
        xp.matmul(a, b, out=out)
        if scale is not None:
            out *= scale
    else:
        prod = a @ b
        if scale is not None:
            prod *= scale
        out[...] = prod


class CausalAttention(Function):
    """Multi-head causal self-attention from packed projections.

    ``qkv`` is (B, T, 3·C) laid out [q | k | v], each C = H·D (H heads of size D). Per head:
    S = Q Kᵀ/√D + mask,  P = softmax(S),  Y = (P ⊙ drop) V,  output (B, T, C) heads side by side.
    Backward:  dV = P̃ᵀ dY,  dP̃ = dY Vᵀ,  dP = dP̃ ⊙ drop,  dS = P ⊙ (dP − Σ_j dP ⊙ P),
    dQ = dS K/√D,  dK = dSᵀ Q/√D  (P̃ = P ⊙ drop; drop is the scaled dropout mask or 1).
    For 16-bit qkv the scores and the softmax are fp32; P is kept rounded to 16 bits, and
    P̃ V is a 16-bit product (fp32 accumulation).

    ``recompute`` (selective recomputation, Korthikanti et al. 2022): keep only q, k and v,
    not the (B, H, T, T) arrays P, P̃ and drop, whose size grows with T², and compute P again
    in backward, one block of sequences at a time, with the same operations (so the same
    bits). ``drop_mask`` may then be a function that draws the mask again, so that the mask
    is not kept either.

    Shaped for speed without changing the formulas: the row sums of the softmax (Σ_j e^S) are
    one matrix-vector product with (1, ..., 1) and Σ_j dP ⊙ P one ``einsum``, faster than
    numpy's reductions along a short last axis; the products write straight into the heads'
    slots of the output, so no head-ordered temporary is copied over; the 1/√D of dQ and dK
    is applied while they are written. Sums and that scaling take another order than a plain
    ``sum``, so results differ from one in the last bits only.
    """

    @staticmethod
    def forward(ctx, qkv, n_head, drop_mask=None, recompute=False):
        xp = array_module(qkv)
        b, t, c3 = qkv.shape
        c = c3 // 3
        d = c // n_head
        heads = qkv.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        q, k, v = heads[0], heads[1], heads[2]  # kept for backward, in qkv's dtype
        qc, kc, vc = upcast(q), upcast(k), upcast(v)  # what the products read
        acc = accumulate_dtype(qkv.dtype)
        scale = 1.0 / math.sqrt(d)
        bias = causal_mask_bias(t, xp, acc)
        mask = drop_mask() if callable(drop_mask) else drop_mask
        p = xp.empty((b, n_head, t, t), dtype=qkv.dtype)  # (B, H, T, T), kept for backward
        pd = p if mask is None else xp.empty_like(p)
        y = xp.empty((b, t, n_head, d), dtype=qkv.dtype)  # heads side by side, as returned
        # A few sequences at a time, so each (H, T, T) block of scores stays in cache through
        # the whole softmax instead of streaming the full (B, H, T, T) array seven times.
        for rows in _batch_blocks(p):
            sb = p[rows] if p.dtype == acc else xp.empty(p[rows].shape, dtype=acc)
            attention_probs(qc[rows], kc[rows], scale, bias, sb)
            if p.dtype != acc:
                p[rows] = sb  # the probabilities, rounded to 16 bits
            if mask is not None:
                xp.multiply(sb, mask[rows], out=pd[rows])
            _product_into(y[rows].transpose(0, 2, 1, 3), pd[rows], vc[rows])
        if recompute:
            ctx.save_for_backward(q, k, v, None, None, None)
            ctx.drop_mask = drop_mask  # the function that draws it, or the mask itself
        else:
            ctx.save_for_backward(q, k, v, p, pd, mask)
        ctx.scale, ctx.recompute, ctx.dtype = scale, recompute, qkv.dtype
        return y.reshape(b, t, c)

    @staticmethod
    def backward(ctx, g):
        q, k, v, p, pd, drop_mask = ctx.saved
        if ctx.recompute:
            drop_mask = ctx.drop_mask() if callable(ctx.drop_mask) else ctx.drop_mask
        q, k, v = upcast(q), upcast(k), upcast(v)
        xp = array_module(g)
        b, h, t, d = q.shape
        gy = upcast(g).reshape(b, t, h, d).transpose(0, 2, 1, 3)  # (B, H, T, D)
        out = xp.empty((b, t, 3, h, d), dtype=g.dtype)
        for rows, pb, pdb in _probability_blocks(ctx, q, k, p, pd, drop_mask):
            gyb = gy[rows]
            _product_into(out[rows, :, 2].transpose(0, 2, 1, 3), pdb.swapaxes(-1, -2), gyb)  # dV
            dp = gyb @ v[rows].swapaxes(-1, -2)  # (b', H, T, T)
            if drop_mask is not None:
                dp *= drop_mask[rows]
            dot = xp.einsum("ij,ij->i", dp.reshape(-1, t), pb.reshape(-1, t))  # Σ_j dP ⊙ P
            dp -= dot.reshape(*dp.shape[:-1], 1)
            dp *= pb  # dS; the 1/√D is applied to dQ and dK as they are written
            _product_into(out[rows, :, 0].transpose(0, 2, 1, 3), dp, k[rows], ctx.scale)  # dQ
            _product_into(out[rows, :, 1].transpose(0, 2, 1, 3), dp.swapaxes(-1, -2), q[rows],
                          ctx.scale)  # dK
        return (out.reshape(b, t, 3 * h * d),)


def _probability_blocks(ctx, q, k, p, pd, drop_mask):
    """``(rows, P, P ⊙ drop)`` for each block of sequences, for `CausalAttention.backward`.

    P comes in the accumulate dtype, P ⊙ drop as the forward pass kept it. These are the
    saved arrays' blocks; or, with ``ctx.recompute``, each block computed again from q and k
    (already in the accumulate dtype) into a scratch buffer of one block, with the forward
    pass's operations and roundings: P rounded to 16 bits for 16-bit attention, and P ⊙ drop
    the product of the unrounded P, rounded once.
    """
    if not ctx.recompute:
        for rows in _batch_blocks(p):
            yield rows, upcast(p[rows]), pd[rows]
        return
    xp = array_module(q)
    b, h, t, _ = q.shape
    bias = causal_mask_bias(t, xp, q.dtype)
    blocks = _sequence_blocks(b, h * t * t, xp)
    scratch = xp.empty((min(blocks[0].stop, b), h, t, t), dtype=q.dtype)  # the largest block
    scratch_d = None if drop_mask is None else xp.empty(scratch.shape, dtype=ctx.dtype)
    for rows in blocks:
        n = min(rows.stop, b) - rows.start
        sb = attention_probs(q[rows], k[rows], ctx.scale, bias, scratch[:n])
        kept = narrow(sb, ctx.dtype)  # P as the forward pass kept it
        if drop_mask is None:
            yield rows, upcast(kept), kept
        else:
            yield rows, upcast(kept), xp.multiply(sb, drop_mask[rows], out=scratch_d[:n])
