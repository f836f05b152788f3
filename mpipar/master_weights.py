"""fp32 master weights for a model that computes in 16 bits (mixed precision).

Under ``--precision fp16`` or ``bf16`` the model's parameters are 16-bit: forward and backward
read them, and their gradients (16-bit, and multiplied by the loss scale S under fp16)
accumulate in ``p.grad``, where data parallelism all-reduces them in 16 bits. The optimizer
never updates those parameters directly. It keeps an fp32 *master* copy of each one and runs
its ordinary rule (:class:`~mpipar.optim.SGD` or :class:`~mpipar.optim.AdamW`, unchanged) on
the masters. One step:

1. :meth:`MasterWeights.unscale`: master.grad = fp32(p.grad) / S, and whether every value is
   finite (the trainer then asks all ranks at once, :func:`mpipar.precision.overflow_anywhere`);
2. clipping by the global norm, and the update, on the fp32 masters;
3. :meth:`MasterWeights.step` rounds every updated master into its model parameter,
   p ← 16-bit(master): the one cast from fp32 weights to compute weights per step.

Why masters. An update smaller than half a unit in the last place of a weight is rounded
away. A bf16 weight near 1.0 has units of 2⁻⁷ ≈ 0.008 and an fp16 one 2⁻¹⁰ ≈ 0.001, so a
step of 10⁻⁴ (a typical learning rate times a normalised AdamW update) would leave it exactly
where it was, every step. In fp32 (units of 2⁻²³) the same steps add up until they move the
rounded copy. The masters are also what a checkpoint saves (:meth:`master_parameters`), so a
checkpoint of a mixed-precision run holds float32 weights like any other.

ZeRO-1/2 shard the masters with the moments (``ZeroAdamW(..., masters=...)``), each rank
keeping the fp32 master of its 1/dp slice only, and answer the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mpipar.nn import Parameter, initialize_parameter, master_copy, unique_parameters
from mpipar.precision import all_finite


def make_masters(params: Iterable[Parameter], seed: int, dtype: Any) -> list[Parameter]:
    """fp32 (``dtype``) masters of ``params``, at the seed's initial values.

    Drawn from the seed like the parameters themselves (rounded once from float64 to
    ``dtype``), so the masters start exactly where a float32 run's weights start.
    """
    masters = []
    for p in unique_parameters(params):
        m = master_copy(p, dtype)
        initialize_parameter(m, seed, p.name)
        masters.append(m)
    return masters


def round_into(params: Iterable[Parameter], masters: Iterable[Parameter]) -> None:
    """p ← the master's value rounded to p's dtype (round to nearest even), for each pair."""
    for p, m in zip(params, masters, strict=True):
        p.data[...] = m.data


class MasterWeights:
    """An optimizer over fp32 masters standing in for an optimizer over 16-bit parameters.

    ``params`` are the model's (16-bit) parameters, ``masters`` their fp32 copies in the same
    order (:func:`make_masters`), ``inner`` the SGD or AdamW that updates the masters. The
    model's parameters are set from the masters at once. The trainer calls :meth:`unscale`
    after the gradients are complete, then :meth:`clip` and :meth:`step`, or :meth:`skip`.
    """

    def __init__(self, params: Iterable[Parameter], masters: list[Parameter],
                 inner: Any) -> None:
        self.params = unique_parameters(params)
        if [p.name for p in self.params] != [m.name for m in masters]:
            raise ValueError("MasterWeights needs one master per parameter, in the same order")
        self.masters, self.inner = masters, inner
        round_into(self.params, self.masters)

    @classmethod
    def build(cls, params: Iterable[Parameter], seed: int, dtype: Any,
              make_inner: Callable[[list[Parameter]], Any]) -> MasterWeights:
        """Masters of ``params`` drawn from ``seed`` in ``dtype``, updated by
        ``make_inner(masters)``."""
        masters = make_masters(params, seed, dtype)
        return cls(params, masters, make_inner(masters))

    # -- a step ------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Drop the model's 16-bit gradients (the next backward starts them afresh)."""
        for p in self.params:
            p.grad = None

    def unscale(self, scale: float, check: bool = True) -> bool:
        """master.grad = fp32(p.grad) / ``scale`` for every parameter with a gradient.

        Returns whether every unscaled gradient is finite (True without ``check``): an inf
        from an fp16 overflow survives the division and the cast.
        """
        inv = 1.0 / scale
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.astype(m.dtype) * inv
        return not check or all_finite(m.grad for m in self.masters if m.grad is not None)

    def grad_norm_sq(self, owned: Callable[[Parameter], bool]) -> float:
        """Σ g² of the unscaled fp32 gradients (the masters carry their parameters' flags)."""
        return self.inner.grad_norm_sq(owned)

    def clip(self, norm: float, max_norm: float) -> None:
        self.inner.clip(norm, max_norm)

    def step(self, lr: float | None = None) -> None:
        """Update the masters in fp32, round them into the model, free the fp32 gradients."""
        self.inner.step(lr)
        round_into(self.params, self.masters)
        self.skip()

    def skip(self) -> None:
        """Leave the masters and the model as they are (an overflowed step); free the
        fp32 gradients."""
        for m in self.masters:
            m.grad = None

    # -- checkpoints and memory ----------------------------------------------------------------
    def master_parameters(self) -> list[Parameter]:
        """The fp32 weights a checkpoint saves, named and placed like the model's parameters."""
        return self.masters

    def load_masters(self, masters: list[Parameter]) -> None:
        """Take the values of ``masters`` (loaded from a checkpoint, in this order) as the
        masters, and round them into the model."""
        for own, m in zip(self.masters, masters, strict=True):
            own.data[...] = m.data
        round_into(self.params, self.masters)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The inner optimizer's state: the same keys and shapes as without mixed precision."""
        return self.inner.state_dict()

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state_dict(d)

    def master_bytes(self) -> int:
        """Bytes of the fp32 masters (part of the optimizer's state in the memory report)."""
        return sum(int(m.data.nbytes) for m in self.masters)
