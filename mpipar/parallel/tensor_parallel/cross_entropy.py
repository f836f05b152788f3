"""Cross-entropy over logits whose vocabulary axis is split between tensor-parallel ranks.

The tied head gives rank r the logits of its own slice of the vocabulary, z[:, lo_r:hi_r]
(Megatron-LM, Shoeybi et al. 2019, §3: "parallelize the output embedding GEMM ... fuse the
output with the cross-entropy loss"). Gathering the (N, V) logits to every rank would cost
N·V numbers per rank; the loss needs only three numbers per position, each a reduction that
splits over the vocabulary:

    m   = max_v z_v                   local max, then all-reduce(max)
    s   = Σ_v exp(z_v − m)            local sum, then all-reduce(sum)
    z_t = z_target − m                the one rank holding column t knows it, the others add 0

    loss = (1/N) Σ_n (log s_n − z_t,n)                  (the same formula as fused.CrossEntropy)

so each rank sends 2 numbers per position (the max, then the sum and the target logit in one
buffer) instead of V/t. Backward needs no communication: dL/dz_v = (softmax_v − [v = t]) / N
and rank r holds exactly softmax's columns lo_r..hi_r (exp(z − m)/s, with the global m and s).

A vocabulary that t does not divide is padded to a multiple of t; the padded columns are
masked to −inf before the max and the exponentials, so they get probability 0, contribute 0
to s, and receive gradient 0: the loss is the serial one.

Under mixed precision the logits arrive in 16 bits and, as in ``fused.CrossEntropy``, are
taken to fp32 first: the max, the sums and what they all-reduce, the loss and the saved
softmax are fp32; only the gradient returned to the head is rounded back.
"""

from __future__ import annotations

from typing import Any

from mpipar.autograd import Function, Tensor
from mpipar.backend import array_module
from mpipar.comm import Comm
from mpipar.precision import accumulate_dtype, narrow, upcast


class VocabParallelCrossEntropy(Function):
    """L = (1/N) Σₙ (log Σ_v exp(zₙᵥ − mₙ) − (zₙ,tₙ − mₙ)) with z split over the vocabulary.

    forward: local max → all-reduce(max); local Σ exp and target logit → all-reduce(sum).
    backward: dL/dz = (softmax(z) − onehot(t)) / N on this rank's columns (no communication).
    ``logits`` is (..., V_local) holding global columns ``vocab_start + j``; columns at or past
    ``vocab_size`` (the real vocabulary) are padding.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, comm):
        xp = array_module(logits)
        v_local = logits.shape[-1]
        z = upcast(logits).reshape(-1, v_local)  # (N, V_local), fp32 for 16-bit logits
        t = targets.reshape(-1)
        n = z.shape[0]
        real = min(max(vocab_size - vocab_start, 0), v_local)  # real columns held here

        # 1. the global max of every row (a row with no real column here contributes −inf)
        m = z[:, :real].max(axis=1) if real else xp.full(n, -xp.inf, dtype=z.dtype)  # (N,)
        comm.allreduce(m, op="max")

        # 2. exp(z − m) with the padded columns masked to −inf, i.e. to probability 0
        p = z - m[:, None]  # (N, V_local)
        p[:, real:] = -xp.inf
        local_t = t - vocab_start  # (N,) target's column here; outside [0, real): elsewhere
        mine = (local_t >= 0) & (local_t < real)
        rows = xp.arange(n)
        sums = xp.zeros((2, n), dtype=z.dtype)  # [Σ exp(z − m), z_target − m] per row
        sums[1, mine] = p[rows[mine], local_t[mine]]
        xp.exp(p, out=p)
        sums[0] = p.sum(axis=1)
        comm.allreduce(sums)  # one call for both sums: 2·N numbers
        s, target_z = sums[0], sums[1]
        loss = (xp.log(s) - target_z).sum() / n
        p /= s[:, None]  # this rank's columns of the softmax, kept for backward
        ctx.save_for_backward(p, local_t, mine)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return xp.asarray(loss, dtype=accumulate_dtype(logits.dtype))

    @staticmethod
    def backward(ctx, g):
        p, local_t, mine = ctx.saved
        xp = array_module(p)
        n = p.shape[0]
        d = p * (g / n)  # a new array: p stays as saved
        rows = xp.arange(n)[mine]
        d[rows, local_t[mine]] -= g / n
        return (narrow(d.reshape(ctx.shape), ctx.dtype),)


def vocab_parallel_cross_entropy(logits: Tensor, targets: Any, vocab_start: int,
                                 vocab_size: int, comm: Comm) -> Tensor:
    """Mean cross-entropy of logits split over the vocabulary (see the module docstring).

    ``logits`` (..., V_local): this rank's columns ``vocab_start .. vocab_start + V_local``;
    ``targets`` (...): global token ids; ``vocab_size``: the real (unpadded) vocabulary.
    Every rank of ``comm`` returns the same loss.
    """
    if isinstance(targets, Tensor):
        targets = targets.data
    return VocabParallelCrossEntropy.apply(logits, targets=targets, vocab_start=vocab_start,
                                           vocab_size=vocab_size, comm=comm)
