"""The executor's memory: pooled receive buffers and the measured activation stash.

A pipeline rank holds two kinds of activation memory between the forward and the backward of
a microbatch:

* **receive buffers** (`BufferPool`): an input activation or an output gradient arrives in a
  preallocated (mb, T/parts, d) buffer, which goes back to the pool once its contents are
  dead, so steady-state steps allocate nothing;
* **the stash** (`Stash`): per (microbatch, chunk), the input and output tensors whose
  autograd graph backward will walk, and with them every array that graph saved. Its size in
  bytes is measured after each forward (`graph_bytes`, with the autograd's `saved_arrays`)
  and its peaks are kept in `StashStats`: the number GPipe and 1F1B differ by.

A split backward (zero-bubble schedules) frees the graph at B but not the whole stash: what
its W needs (`WeightGradients`: each weight's input and output gradient, and the receive
buffers they may live in) stays under the same key until W, measured again after B.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpipar.autograd import Tensor, WeightGradients, memory_root, saved_arrays
from mpipar.backend import get_xp

Key = tuple[int, int]  # (microbatch, chunk)


def memory_ids(arrays: Iterable[Any]) -> set[int]:
    """The blocks of memory ``arrays`` live in, as ``id(memory_root(a))``."""
    return {id(memory_root(a)) for a in arrays}


def graph_bytes(output: Tensor, held: Sequence[Any], exclude: set[int]) -> int:
    """Bytes of memory the autograd graph behind ``output`` keeps alive, plus ``held`` arrays.

    Sums, once per block of memory, the arrays the graph saved for backward
    (`mpipar.autograd.saved_arrays`) and the ``held`` ones. ``exclude`` lists memory (see
    `memory_ids`) that is not the stash's: parameters and the batch itself.
    """
    blocks = {id(b): b for b in map(memory_root, held)}
    blocks.update((id(b), b) for b in saved_arrays(output))
    return sum(int(b.nbytes) for key, b in blocks.items() if key not in exclude)


@dataclass
class StashStats:
    """Activation memory an executor held, measured while it ran.

    ``peak_inflight``: most (microbatch, chunk) stashes alive at once (forward done, backward
    not yet, or for a split backward W not yet); ``peak_bytes``: most bytes those stashes
    held at once (inputs and arrays saved for backward, parameters excluded); ``buffers``:
    receive buffers the pool ever allocated.
    """

    peak_inflight: int = 0
    peak_bytes: int = 0
    buffers: int = 0


class BufferPool:
    """Receive buffers by shape: `take` one (allocating only if none is free), `give` it back.

    A buffer may be given back only when nothing reads it any more; the executor does so after
    the backward that used it, so the pool holds as many buffers as the schedule keeps
    microbatches in flight, and steady-state steps allocate nothing.
    """

    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.free: dict[tuple[int, ...], list[Any]] = {}
        self.allocated = 0

    def take(self, shape: tuple[int, ...]) -> Any:
        free = self.free.get(shape)
        if free:
            return free.pop()
        self.allocated += 1
        return get_xp().empty(shape, dtype=self.dtype)

    def give(self, buf: Any) -> None:
        self.free.setdefault(tuple(buf.shape), []).append(buf)


class Stash:
    """What each forward keeps for its backward, by (microbatch, chunk), and its bytes.

    `keep` stores the chunk's input leaf (None on virtual stage 0, whose input is token ids)
    and output, measures the bytes their graph holds and updates ``stats``' peaks; `release`
    hands them to the backward and takes the bytes off. ``exclude``: memory that is not
    activation memory (parameters, the batch), see `graph_bytes`.
    """

    def __init__(self, stats: StashStats, exclude: set[int]) -> None:
        self.stats = stats
        self.exclude = exclude
        self.entries: dict[Key, tuple[Tensor | None, Tensor, int]] = {}
        self.for_weights: dict[Key, tuple[WeightGradients, list[Any], int]] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries) + len(self.for_weights)

    def _count(self, nbytes: int) -> None:
        self.nbytes += nbytes
        self.stats.peak_inflight = max(self.stats.peak_inflight, len(self))
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.nbytes)

    def keep(self, key: Key, x: Tensor | None, out: Tensor) -> None:
        held = [x.data] if x is not None else []
        nbytes = graph_bytes(out, held, self.exclude)
        self.entries[key] = (x, out, nbytes)
        self._count(nbytes)

    def release(self, key: Key) -> tuple[Tensor | None, Tensor]:
        x, out, nbytes = self.entries.pop(key)
        self.nbytes -= nbytes
        return x, out

    def keep_for_weights(self, key: Key, store: WeightGradients, buffers: list[Any]) -> None:
        """After B of ``key``: keep what its W needs, ``store``, and the receive ``buffers``
        that may hold some of it (they go back to the pool only after W); count its bytes."""
        blocks = {id(b): b for b in map(memory_root, buffers)}
        blocks.update((id(b), b) for b in store.saved_arrays())
        nbytes = sum(int(b.nbytes) for k, b in blocks.items() if k not in self.exclude)
        self.for_weights[key] = (store, buffers, nbytes)
        self._count(nbytes)

    def release_weights(self, key: Key) -> tuple[WeightGradients, list[Any]]:
        """Hand W of ``key`` its `WeightGradients` and the buffers to give back after it."""
        store, buffers, nbytes = self.for_weights.pop(key)
        self.nbytes -= nbytes
        return store, buffers
