"""All parameters of an optimizer in one flat buffer, so an update is a few array operations.

AdamW's update is elementwise: on Ψ parameters held as hundreds of small arrays it is
dominated by Python's per-array overhead, and on one flat array of Ψ elements by memory
traffic. :class:`FlatLayout` moves the parameters (and their gradients) into flat buffers
and leaves each parameter's ``.data`` a view of its range, so the model does not notice.
"""

from __future__ import annotations

from collections.abc import Callable

from mpipar.backend import array_module


class FlatLayout:
    """Parameters laid end to end in one flat buffer, Ψ elements, in the given order.

    Parameter i occupies ``[offsets[i], offsets[i] + size_i)`` of :attr:`params` (its ``.data``
    becomes a view of that range) and of :attr:`grads`; :meth:`views` cuts any other flat
    array (a moment) the same way. Elementwise work on all parameters is then one operation
    on the flat array, with no Python loop and no per-parameter call overhead.
    """

    BLOCK = 1 << 15  # elements; 5 arrays of float32 blocks take 640 KiB of cache

    def __init__(self, params: list) -> None:
        self.members = params
        self.xp = array_module(params[0].data)
        dtype = params[0].data.dtype
        if any(p.data.dtype != dtype for p in params):
            raise ValueError("a flat layout needs parameters of one dtype")
        self.offsets, total = [], 0
        for p in params:
            self.offsets.append(total)
            total += p.data.size
        self.params = self.xp.empty(total, dtype=dtype)  # (Ψ,)
        self.grads = self.xp.zeros(total, dtype=dtype)  # (Ψ,)
        for p, data in zip(params, self._cut(self.params), strict=True):
            data[...] = p.data
            p.data = data
        self._grad_views = self._cut(self.grads)
        self._runs: dict[Callable, list[slice]] = {}

    def _cut(self, flat) -> list:
        return [flat[o:o + p.data.size].reshape(p.data.shape)
                for p, o in zip(self.members, self.offsets, strict=True)]

    def blocks(self) -> list[slice]:
        """The flat range cut into pieces of ``BLOCK`` elements: an update's arrays, block by
        block, stay in the CPU's cache through a chain of elementwise operations (on a GPU,
        one piece)."""
        n = self.params.size
        step = n if self.xp.__name__ != "numpy" else self.BLOCK
        return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def zeros(self):
        return self.xp.zeros_like(self.params)

    def views(self, flat) -> dict[str, object]:
        """``{parameter name: its view of flat}``."""
        return {p.name: v for p, v in zip(self.members, self._cut(flat), strict=True)}

    def gather_grads(self) -> bool:
        """Copy into :attr:`grads` every gradient held elsewhere (e.g. in a data-parallel
        buffer); False, copying nothing, if some parameter has no gradient."""
        if any(p.grad is None for p in self.members):
            return False
        for p, view in zip(self.members, self._grad_views, strict=True):
            if p.grad is not view:
                view[...] = p.grad
        return True

    def runs(self, keep: Callable) -> list[slice]:
        """Maximal ranges of the flat buffer covered by consecutive parameters with
        ``keep(p)``."""
        if keep not in self._runs:
            runs: list[slice] = []
            for p, o in zip(self.members, self.offsets, strict=True):
                if not keep(p):
                    continue
                if runs and runs[-1].stop == o:
                    runs[-1] = slice(runs[-1].start, o + p.data.size)
                else:
                    runs.append(slice(o, o + p.data.size))
            self._runs[keep] = runs
        return self._runs[keep]
