"""Context parallelism: each sequence split over C ranks, attention computed as a ring.

Activation memory grows with the sequence length s (every block keeps O(s·h) per sequence),
so a long enough sequence does not fit one device whatever dp, tp and pp are. Context
parallelism (``--cp C``) gives each of C ranks a part of every sequence. Everything in a
block acts on one position at a time, except attention, where each query needs the keys and
values of all earlier positions. Ring attention (Liu et al. 2023) passes the key/value blocks
around the C ranks of the cp group while each rank computes its queries against the block it
holds, so no rank ever holds more than its own share plus one block in flight.

**Chunks and load balance.** A sequence of T tokens is cut into 2C chunks of n = T/(2C);
cp rank i holds chunks i and 2C−1−i (:func:`chunk_positions`). Causal attention does more
work for later queries; pairing an early chunk with a late one gives every rank the same
number of unmasked (query, key) pairs. Position ids are the tokens' global positions.

**Forward: the online softmax.** For one query row q and key blocks K_1, K_2, ... arriving
one at a time, keep a running maximum m, a running sum ℓ and an unnormalised output a::

    S_j = q K_jᵀ/√D (+ causal mask)     m' = max(m, max S_j)
    ℓ' = ℓ·e^(m−m') + Σ e^(S_j−m')      a' = a·e^(m−m') + e^(S_j−m') V_j

Starting from m = −∞, ℓ = 0, a = 0, after every block y = a/ℓ = softmax(q Kᵀ/√D) V exactly
(the rescaling by e^(m−m') only moves the reference point of the exponentials), and the
log-sum-exp L = m + log ℓ is kept for backward. Blocks whose keys all lie after the queries
are skipped; the diagonal chunk gets the causal mask.

**Backward.** With P_j = e^(S_j − L) (recomputed from the saved L, so no T×T array is kept),
dY the incoming gradient and Δ = rowsum(dY ⊙ Y)::

    dV_j += P_jᵀ dY      dP_j = dY V_jᵀ      dS_j = P_j ⊙ (dP_j − Δ)
    dQ   += dS_j K_j/√D                      dK_j += dS_jᵀ Q/√D

dQ stays on the rank. The K, V blocks go round the ring again, each travelling with its
dK, dV accumulator; after the last block, one more shift returns every accumulator to the
rank that owns its keys and values.

**Messages per layer and rank** (each an ``isend`` to cp rank i+1 and an ``irecv`` from
i−1): forward 2(C−1) (K and V, C−1 shifts); backward 2(C−1) for K and V plus 2C for dK and
dV (C shifts), 4C − 2 in all.
"""

from __future__ import annotations

import math
from typing import Any

from mpipar.autograd import Function, Tensor
from mpipar.backend import array_module, get_xp
from mpipar.comm import Comm, wait_all

# Tags of the four arrays that travel around the ring (two messages between the same pair
# of ranks are told apart by their tag).
K_TAG, V_TAG, DK_TAG, DV_TAG = 11, 12, 13, 14


def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two chunks (of 2·cp) that cp rank ``cp_rank`` holds: i and 2·cp − 1 − i."""
    return cp_rank, 2 * cp - 1 - cp_rank


def chunk_positions(seq_len: int, cp: int, cp_rank: int, xp: Any = None) -> Any:
    """Global positions of the tokens cp rank ``cp_rank`` holds, in order: its two chunks of
    n = seq_len / (2·cp) positions each (an integer array of seq_len / cp)."""
    xp = get_xp() if xp is None else xp
    n = seq_len // (2 * cp)
    first, second = chunk_ids(cp_rank, cp)
    return xp.concatenate([xp.arange(first * n, (first + 1) * n),
                           xp.arange(second * n, (second + 1) * n)])


def block_pairs(q_rank: int, kv_rank: int, cp: int) -> list[tuple[int, int, bool]]:
    """Which (query chunk, key chunk) pairs of two ranks' tokens attend, local indices 0/1.

    Each pair is ``(a, b, diagonal)``: query chunk a of ``q_rank`` sees key chunk b of
    ``kv_rank``, causally masked when they are the same chunk (``diagonal``), fully when the
    key chunk comes earlier; pairs whose keys all come later are left out.
    """
    pairs = []
    for a, qc in enumerate(chunk_ids(q_rank, cp)):
        for b, kc in enumerate(chunk_ids(kv_rank, cp)):
            if kc <= qc:
                pairs.append((a, b, kc == qc))
    return pairs


def split_heads(qkv: Any, n_head: int) -> tuple[Any, Any, Any]:
    """(B, t, 3·H·D) packed [q | k | v] → q, k, v, each a contiguous (B, H, t, D) array."""
    xp = array_module(qkv)
    b, t, c3 = qkv.shape
    heads = qkv.reshape(b, t, 3, n_head, c3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)
    return tuple(xp.ascontiguousarray(heads[i]) for i in range(3))


class Ring:
    """The cp group seen as a ring: send to cp rank i+1, receive from i−1, non-blocking."""

    def __init__(self, comm: Comm) -> None:
        self.comm, self.size, self.rank = comm, comm.size, comm.rank
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size

    def start_shift(self, arrays: list[Any], tags: list[int]) -> tuple[list, list[Any]]:
        """Start sending each array to the next rank and receiving its successor from the
        previous one; returns the requests and the receive buffers (valid after the wait)."""
        xp = get_xp()
        received = [xp.empty_like(a) for a in arrays]
        requests = [self.comm.irecv(r, self.prev, tag) for r, tag in zip(received, tags,
                                                                            strict=True)]
        requests += [self.comm.isend(a, self.next, tag) for a, tag in zip(arrays, tags,
                                                                           strict=True)]
        return requests, received

    def source(self, step: int) -> int:
        """The cp rank whose keys and values this rank holds after ``step`` shifts."""
        return (self.rank - step) % self.size


def _scores(q: Any, k: Any, scale: float, diagonal: bool) -> Any:
    """S = Q Kᵀ·scale for one (query chunk, key chunk) pair, −∞ above the diagonal."""
    xp = array_module(q)
    s = (q @ k.swapaxes(-1, -2)) * scale
    if diagonal:
        above = xp.triu_indices(s.shape[-1], 1)
        s[..., above[0], above[1]] = -xp.inf
    return s


class OnlineSoftmax:
    """Running max m, sum ℓ and unnormalised output a of every query row (module docstring)."""

    def __init__(self, q: Any) -> None:
        xp = array_module(q)
        self.m = xp.full(q.shape[:-1], -xp.inf, dtype=q.dtype)
        self.l = xp.zeros(q.shape[:-1], dtype=q.dtype)
        self.acc = xp.zeros_like(q)

    def add(self, rows: slice, s: Any, v: Any) -> None:
        """Fold the scores ``s`` (b, H, n, n) of one key block with values ``v`` into ``rows``."""
        xp = array_module(s)
        m_new = xp.maximum(self.m[..., rows], s.max(axis=-1))
        correction = xp.exp(self.m[..., rows] - m_new)
        p = xp.exp(s - m_new[..., None])
        self.l[..., rows] = self.l[..., rows] * correction + p.sum(axis=-1)
        self.acc[..., rows, :] = self.acc[..., rows, :] * correction[..., None] + p @ v
        self.m[..., rows] = m_new

    def finish(self) -> tuple[Any, Any]:
        """y = a / ℓ and the log-sum-exp L = m + log ℓ of every row."""
        xp = array_module(self.acc)
        return self.acc / self.l[..., None], self.m + xp.log(self.l)


class RingAttention(Function):
    """Causal multi-head attention of this rank's tokens against the whole sequence.

    ``qkv`` (B, t, 3·H·D) holds this rank's t = T/C tokens (its two chunks), ``ring`` its cp
    group. Returns (B, t, H·D) as :class:`mpipar.fused.CausalAttention` does on the whole
    sequence, restricted to this rank's rows. Forward and backward are in the module
    docstring; ``ctx`` keeps q, k, v, y and L: O(t), no (t, T) array.
    """

    @staticmethod
    def forward(ctx, qkv, n_head, ring):
        q, k, v = split_heads(qkv, n_head)
        n, scale = q.shape[2] // 2, 1.0 / math.sqrt(q.shape[3])
        state = OnlineSoftmax(q)
        kv = [k, v]
        for step in range(ring.size):
            pending = ring.start_shift(kv, [K_TAG, V_TAG]) if step < ring.size - 1 else None
            for a, b, diagonal in block_pairs(ring.rank, ring.source(step), ring.size):
                rows, cols = slice(a * n, (a + 1) * n), slice(b * n, (b + 1) * n)
                state.add(rows, _scores(q[..., rows, :], kv[0][..., cols, :], scale, diagonal),
                          kv[1][..., cols, :])
            if pending is not None:
                wait_all(pending[0])
                kv = pending[1]
        y, lse = state.finish()
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.ring, ctx.scale = ring, scale
        b_, h, t, d = y.shape
        return y.transpose(0, 2, 1, 3).reshape(b_, t, h * d)

    @staticmethod
    def backward(ctx, g):
        q, k, v, y, lse = ctx.saved
        ring, scale = ctx.ring, ctx.scale
        xp = array_module(g)
        b_, h, t, d = q.shape
        n = t // 2
        dy = xp.ascontiguousarray(g.reshape(b_, t, h, d).transpose(0, 2, 1, 3))
        delta = (dy * y).sum(axis=-1)  # Δ = rowsum(dY ⊙ Y)
        dq = xp.zeros_like(q)
        kv, dkv = [k, v], [xp.zeros_like(k), xp.zeros_like(v)]
        for step in range(ring.size):
            pending = ring.start_shift(kv, [K_TAG, V_TAG]) if step < ring.size - 1 else None
            for a, b, diagonal in block_pairs(ring.rank, ring.source(step), ring.size):
                rows, cols = slice(a * n, (a + 1) * n), slice(b * n, (b + 1) * n)
                kb, vb = kv[0][..., cols, :], kv[1][..., cols, :]
                p = xp.exp(_scores(q[..., rows, :], kb, scale, diagonal)
                           - lse[..., rows, None])
                dkv[1][..., cols, :] += p.swapaxes(-1, -2) @ dy[..., rows, :]  # dV
                ds = p * (dy[..., rows, :] @ vb.swapaxes(-1, -2) - delta[..., rows, None])
                dq[..., rows, :] += (ds @ kb) * scale
                dkv[0][..., cols, :] += (ds.swapaxes(-1, -2) @ q[..., rows, :]) * scale  # dK
            back = ring.start_shift(dkv, [DK_TAG, DV_TAG])  # to the block's next holder
            wait_all(back[0] + (pending[0] if pending is not None else []))
            dkv = back[1]
            if pending is not None:
                kv = pending[1]
        out = xp.stack([dq, dkv[0], dkv[1]])  # (3, B, H, t, D): after C shifts, our own dK, dV
        return (out.transpose(1, 3, 0, 2, 4).reshape(b_, t, 3 * h * d),)


class ContextParallel:
    """This rank's share of every sequence and the attention over the whole of it.

    ``comm`` is the cp group (ordered by cp rank). The trainer cuts each batch with
    :meth:`shard`; the model asks for :meth:`positions` in its embedding and calls
    :meth:`attention` in every block.
    """

    def __init__(self, comm: Comm) -> None:
        self.comm, self.size, self.rank = comm, comm.size, comm.rank
        self.ring = Ring(comm)

    def positions(self, local_len: int) -> Any:
        """Global positions of this rank's ``local_len`` = T/C tokens."""
        return chunk_positions(local_len * self.size, self.size, self.rank)

    def shard(self, x: Any) -> Any:
        """This rank's tokens of a (B, T) batch: columns :func:`chunk_positions`."""
        xp = array_module(x)
        return x[:, chunk_positions(x.shape[1], self.size, self.rank, xp)]

    def attention(self, qkv: Tensor, n_head: int) -> Tensor:
        """Causal attention of this rank's queries over the whole sequence (ring)."""
        return RingAttention.apply(qkv, n_head, self.ring)


def ring_messages(cp: int) -> dict[str, int]:
    """Point-to-point messages one rank starts per layer (each isend has its irecv)."""
    return {"forward": 2 * (cp - 1), "backward": 2 * (cp - 1) + 2 * cp}


__all__ = ["ContextParallel", "OnlineSoftmax", "Ring", "RingAttention", "block_pairs",
           "chunk_ids", "chunk_positions", "ring_messages", "split_heads"]
