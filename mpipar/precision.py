"""Mixed precision: compute in 16 bits, keep the weights in 32 (Micikevicius et al. 2018).

A training step in fp32 with AdamW keeps 16 bytes per parameter: the weight, its gradient
and the two moments, 4 bytes each. Mixed precision runs the model on 2-byte copies of the
weights and keeps a 4-byte *master* copy for the optimizer:

    fp16/bf16 weights 2 + fp16/bf16 gradients 2 + fp32 master 4 + moments m, v 8 = 16 bytes

The same 16 bytes (so mixed precision alone saves no parameter memory), but the activations,
the gradients and everything communicated are half the size, and on a GPU the 16-bit matrix
products run several times faster. Each step the optimizer updates the masters in fp32 and
rounds them into the model's weights once (:mod:`mpipar.master_weights`, and the fp32 master
shard of :class:`mpipar.parallel.zero.ZeroAdamW`): an update smaller than half a unit in the
last place of a 16-bit weight is lost on the weight but kept on the master.

The policy (``--precision``):

=========  =================  ===========================  ============================
name       compute dtype      range (largest, smallest)    gradients need loss scaling
=========  =================  ===========================  ============================
``fp32``   the master dtype   3.4e38, 1.2e-38              no
``bf16``   bfloat16           3.4e38, 1.2e-38 (8 bits of   no: fp32's exponent
                              precision, ~2.4 digits)
``fp16``   float16            65504, 6.1e-5 (6e-8 with     yes: small gradients
                              subnormals; 11 bits, ~3.3    underflow to 0
                              digits)
=========  =================  ===========================  ============================

``fp32``, the default, computes in the master dtype itself, with no cast anywhere (``--dtype
float64`` is the exactness mode, and refuses a 16-bit precision: :func:`resolve_precision`).

Rounding points, the same in every layout. The model's parameters, every activation between
two operations, every gradient and every message between ranks are 16-bit. *Inside* an
operation the arithmetic is fp32, as in a fused GPU kernel or a tensor-core GEMM: matrix
products take 16-bit inputs, accumulate in fp32 and round the result once (:func:`matmul`);
LayerNorm's mean and variance, the attention softmax, GELU, and every sum over rows
(bias and LayerNorm gradients, embedding gradients) are computed in fp32 and rounded once
(:func:`upcast`, then :func:`narrow`); the cross-entropy and the loss stay fp32. Textbook
element-wise operations (the residual add, dropout) run in the 16-bit type itself.

On the CPU, numpy has float16 but no 16-bit matrix product worth the name (it does not use
BLAS: hundreds of times slower), and no bfloat16 at all: ``ml_dtypes`` supplies the dtype.
So a 16-bit product here is emulated exactly as the hardware defines it: cast the inputs to
fp32 (every 16-bit value is exact in fp32, and so is the product of two), multiply with fp32
BLAS, round the result. The casts are extra passes over memory and numpy's 16-bit
element-wise loops convert every element to float and back, so **on a CPU half precision is
slower than fp32**; the point of it is a GPU, whose tensor cores multiply 16-bit inputs
natively (on a GPU the products here are cupy's own).

fp16 and loss scaling. Gradients of a language model are often below fp16's smallest
normal number, 6.1e-5: they lose digits, or become 0. Multiplying the loss by S (a power of
two, so exact) multiplies every gradient by S, lifting them into range; the optimizer divides
by S again, in fp32, before it uses them. Too large an S overflows a gradient to inf:
:class:`LossScaler` then skips the step and halves S, and doubles it again after
``growth_interval`` clean steps. Whether any gradient of the whole model overflowed is a
question about every rank's gradients, so it is asked with one all-reduce (max) of one
number over the world (:func:`overflow_anywhere`): every rank skips, or none does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from mpipar.backend import array_module, device

PRECISIONS = ("fp32", "fp16", "bf16")
FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
HALF_DTYPES = (FLOAT16, BFLOAT16)
FLOAT32 = np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """What ``--precision`` means for a run whose weights are kept in ``master`` dtype."""

    name: str = "fp32"
    master: np.dtype = FLOAT32

    @property
    def compute(self) -> np.dtype:
        """The dtype of the model's parameters, activations, gradients and messages."""
        return {"fp16": FLOAT16, "bf16": BFLOAT16}.get(self.name, np.dtype(self.master))

    @property
    def half(self) -> bool:
        """Whether the model computes in 16 bits (and the optimizer keeps masters)."""
        return self.name != "fp32"

    @property
    def loss_scaling(self) -> bool:
        """fp16 only: bf16 has fp32's exponent range, so its gradients do not underflow."""
        return self.name == "fp16"


def resolve_precision(name: str, master: str) -> Precision:
    """The policy of ``--precision name`` with ``--dtype master``; ValueError if refused.

    A 16-bit precision keeps float32 masters. float64 is the exactness mode, in which every
    layout matches the 1-process run to ~1e-10; 16-bit arithmetic would throw that away, so
    the combination is refused rather than silently meaning something else. bf16 is refused
    on a GPU (cupy has no bfloat16 type).
    """
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "bf16" and device() == "gpu":
        raise ValueError("--precision bf16 computes with numpy's bfloat16 (ml_dtypes), and "
                         "cupy has no bfloat16 arrays: use --precision fp16 on a GPU")
    if name != "fp32" and master != "float32":
        raise ValueError(f"--precision {name} keeps float32 master weights; --dtype {master} "
                         "is the exactness mode and computes in its own dtype only (use "
                         "--precision fp32 with it)")
    return Precision(name, np.dtype(master))


# ---------------------------------------------------------------------------------------------
# Casts: where a 16-bit operation computes in fp32
# ---------------------------------------------------------------------------------------------
def is_half(dtype: Any) -> bool:
    return np.dtype(dtype) in HALF_DTYPES


def accumulate_dtype(dtype: Any) -> np.dtype:
    """The dtype arithmetic on ``dtype`` values runs in: fp32 for 16-bit, else itself."""
    return FLOAT32 if is_half(dtype) else np.dtype(dtype)


def upcast(a: Any) -> Any:
    """``a`` in fp32 if it is 16-bit (a new array); otherwise ``a`` itself, untouched."""
    return a.astype(FLOAT32) if is_half(a.dtype) else a


def narrow(a: Any, dtype: Any) -> Any:
    """``a`` rounded to ``dtype`` (a new array), or ``a`` itself when it already is one."""
    return a if a.dtype == dtype else a.astype(dtype)


def matmul(a: Any, b: Any) -> Any:
    """a @ b; for 16-bit numpy inputs, fp32 products and sums rounded once to a's dtype.

    That is a tensor core's contract (16-bit inputs, fp32 accumulation, one rounding of the
    output), computed with fp32 BLAS: numpy's own float16 product does not use BLAS, and
    bfloat16 has none. float32/float64 inputs, and cupy arrays (whose 16-bit products are
    cuBLAS's), are multiplied as they are.
    """
    if not is_half(a.dtype) or array_module(a).__name__ != "numpy":
        return a @ b
    return (a.astype(FLOAT32) @ b.astype(FLOAT32)).astype(a.dtype)


def sum_rows(a: Any, axis: Any, keepdims: bool = False) -> Any:
    """Σ of ``a`` over ``axis``, accumulated in fp32 for 16-bit ``a`` and rounded once.

    A long sum in 16 bits stalls: once the total is 2¹¹ (fp16) or 2⁸ (bf16) times a term,
    adding the term changes nothing.
    """
    if not is_half(a.dtype):
        return a.sum(axis=axis, keepdims=keepdims)
    return a.sum(axis=axis, keepdims=keepdims, dtype=FLOAT32).astype(a.dtype)


def finfo(dtype: Any) -> Any:
    """numpy's ``finfo`` for any float dtype, bfloat16 included (via ``ml_dtypes``)."""
    return ml_dtypes.finfo(dtype)


# ---------------------------------------------------------------------------------------------
# Dynamic loss scaling
# ---------------------------------------------------------------------------------------------
# A short window suits runs of a few hundred steps: each growth past the largest safe scale
# costs one skipped step, so this wastes at most 1 step in 200 (PyTorch's GradScaler waits
# 2000 steps, Megatron-LM 1000, for runs of hundreds of thousands).
GROWTH_INTERVAL = 200
INITIAL_SCALE = 2.0**16
MIN_SCALE = 1.0


@dataclass
class LossScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018, §3.2; the rule of PyTorch's GradScaler).

    The loss is multiplied by ``scale`` before backward. After backward, :meth:`update` gets
    whether any gradient anywhere was inf or NaN: then the step is skipped and the scale
    halved; otherwise the step is taken, and after ``growth_interval`` clean steps in a row
    the scale doubles (probing whether a larger one fits). Powers of two only, so scaling and
    unscaling are exact.
    """

    scale: float = INITIAL_SCALE
    growth_interval: int = GROWTH_INTERVAL
    good_steps: int = 0  # clean steps since the last change of scale

    def update(self, overflow: bool) -> None:
        """Halve the scale after an overflow; double it after ``growth_interval`` clean steps."""
        if overflow:
            self.scale = max(self.scale / 2.0, MIN_SCALE)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        """The scale and the count of clean steps: what a resumed run needs to go on exactly."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])


def all_finite(arrays: Any) -> bool:
    """Whether every element of every array is finite (no inf, no NaN)."""
    return all(bool(array_module(a).isfinite(a).all()) for a in arrays)


def overflow_anywhere(local: bool, comm: Any) -> bool:
    """Whether any rank of ``comm`` (the world) found a non-finite gradient: every rank gets
    the same answer, so every rank skips the step or none does.

    One all-reduce (max) of a single float32, 4 bytes, in the trace. Data-parallel replicas
    would agree without it (they all-reduced their gradients), but tensor-parallel shards and
    pipeline stages hold different gradients: an inf in stage 0's embedding is invisible to
    stage 1, which would otherwise take the step alone and leave the model inconsistent.
    """
    if comm.size == 1:
        return local
    flag = np.array([1.0 if local else 0.0], dtype=FLOAT32)
    comm.allreduce(flag, op="max")
    return bool(flag[0] > 0)


__all__ = ["BFLOAT16", "FLOAT16", "FLOAT32", "HALF_DTYPES", "PRECISIONS", "LossScaler",
           "Precision", "accumulate_dtype", "all_finite", "finfo", "is_half", "matmul",
           "narrow", "overflow_anywhere", "resolve_precision", "sum_rows", "upcast"]
