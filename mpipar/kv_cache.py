"""The KV cache: the keys and values of positions already seen, kept between forward passes.

Without a cache, generating n tokens after a prompt of P runs the model over the whole
context once per new token: P, then P + 1, then P + 2 ... positions through every layer.
Yet attention is the only place where positions meet, and in causal attention the key and
value of position j depend only on tokens 0..j: once computed, they never change. A generator
keeps them and runs two kinds of forward pass:

    prefill   the prompt, t = P positions at once; writes keys and values 0 .. P−1
    decode    one new token per sequence, t = 1; its query attends to the cached keys
              0 .. P+i−1 and its own, and it appends its key and value at position P + i

Each decode pass moves one position through the model: every weight is read to multiply a
single row, which is why decoding is limited by memory bandwidth, not arithmetic.

Memory. Per token and per layer the cache holds one key and one value of d_model numbers:
2 · d_model · (bytes per number), 1 KiB for d_model = 128 in float32. Tensor parallelism
splits the heads, so a rank caches H/t heads, 1/t of that; pipeline parallelism splits the
layers, so a stage caches only its own layers.

Batches. Prompts of different lengths are padded on the right to one length t. Row b's
cache holds ``lengths[b]`` real positions; a pass writes its t new keys at positions
lengths[b] .. lengths[b]+t−1 and query i of row b may see key j only if j ≤ lengths[b] + i.
Keys written for padding lie beyond the row's real length: no real query can see them, and
the row's next tokens overwrite them. The caller says how many of the t positions were real
(:meth:`KVCache.advance`); each row thus keeps its own length and its own positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from mpipar.autograd import Tensor, is_grad_enabled
from mpipar.backend import array_module, get_xp


def kv_bytes_per_token(n_layer: int, d_model: int, itemsize: int) -> int:
    """Bytes the cache holds per token of context: a key and a value per layer."""
    return 2 * n_layer * d_model * itemsize


class KVCache:
    """Keys and values of ``batch`` sequences for the layers ``layers`` of one model (chunk).

    Each layer's keys and values are arrays (B, H_local, capacity, D): the heads this rank
    computes, ``capacity`` positions (the model's context length). ``lengths`` (B,) counts the
    real positions each row holds.
    """

    def __init__(self, batch: int, capacity: int, layers: Iterable[int], n_heads: int,
                 head_dim: int, dtype: Any) -> None:
        xp = get_xp()
        self.capacity = capacity
        self.lengths = np.zeros(batch, dtype=np.int64)
        shape = (batch, n_heads, capacity, head_dim)
        self.keys = {i: xp.zeros(shape, dtype=dtype) for i in layers}
        self.values = {i: xp.zeros(shape, dtype=dtype) for i in layers}

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values on this rank."""
        return sum(a.nbytes for a in (*self.keys.values(), *self.values.values()))

    def positions(self, t: int) -> Any:
        """Positions (B, t) of the next t tokens of every row: lengths[b] + 0 .. t−1."""
        if int(self.lengths.max(initial=0)) + t > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; "
                             f"{int(self.lengths.max())} + {t} do not fit")
        return get_xp().asarray(self.lengths[:, None] + np.arange(t))

    def attend(self, layer: int, qkv: Tensor, n_head: int) -> Tensor:
        """Causal attention of t new positions per row over the cache, after storing them.

        ``qkv`` (B, t, 3·C) is the packed [q | k | v] of the new positions (C = n_head·D, this
        rank's heads). Returns (B, t, C) with heads side by side, as ``ops.causal_attention``
        does: per head Y = softmax(Q Kᵀ/√D + mask) V over keys 0 .. lengths[b] + t − 1, where
        the mask lets query i see key j only if j ≤ lengths[b] + i. Inference only: no graph.
        """
        if is_grad_enabled():
            raise RuntimeError("a KV cache serves inference only; run the model under no_grad")
        a = qkv.data
        xp = array_module(a)
        b, t, c3 = a.shape
        d = c3 // 3 // n_head
        heads = a.reshape(b, t, 3, n_head, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, t, D)
        q, k, v = heads[0], heads[1], heads[2]
        keys, values = self.keys[layer], self.values[layer]
        pos = self.positions(t)  # (B, t)
        rows = xp.arange(b)[:, None]
        keys[rows, :, pos] = k.transpose(0, 2, 1, 3)  # (B, t, H, D) into (B, H, cap, D)
        values[rows, :, pos] = v.transpose(0, 2, 1, 3)
        span = int(self.lengths.max()) + t  # keys any row may see
        scores = q @ keys[:, :, :span].swapaxes(-1, -2)  # (B, H, t, span)
        scores *= 1.0 / math.sqrt(d)
        scores += self._mask(t, span, xp, a.dtype)
        scores -= scores.max(axis=-1, keepdims=True)
        xp.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        y = scores @ values[:, :, :span]  # (B, H, t, D)
        return Tensor(y.transpose(0, 2, 1, 3).reshape(b, t, n_head * d))

    def _mask(self, t: int, span: int, xp: Any, dtype: Any) -> Any:
        """(B, 1, t, span) additive mask: 0 where key j ≤ lengths[b] + i, −inf elsewhere."""
        last = self.lengths[:, None] + np.arange(t)  # (B, t): the last key query i may see
        allowed = np.arange(span)[None, None, :] <= last[:, :, None]  # (B, t, span)
        bias = np.where(allowed, 0.0, -np.inf).astype(dtype)
        return xp.asarray(bias[:, None])

    def advance(self, counts: Any) -> None:
        """Row b's last pass held ``counts[b]`` real positions (the rest was padding)."""
        self.lengths += np.asarray(counts, dtype=np.int64)

    def keep_rows(self, rows: Any) -> None:
        """Drop every row not in ``rows`` (finished sequences leave the batch)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.lengths = self.lengths[rows]
        index = get_xp().asarray(rows)
        for store in (self.keys, self.values):
            for i in store:
                store[i] = store[i][index]

    def reset(self) -> None:
        """Forget every position (a new context); the arrays are reused."""
        self.lengths[:] = 0


__all__ = ["KVCache", "kv_bytes_per_token"]
