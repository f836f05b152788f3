"""The communication of tensor parallelism, as autograd Functions with conjugate backward passes.

Megatron-LM (Shoeybi et al. 2019, §3) splits a transformer layer between the ``t`` ranks of a
tensor-parallel group with two operators placed around each pair of linear layers:

    f = copy_to_tensor_parallel_region       forward: identity      backward: all-reduce
    g = reduce_from_tensor_parallel_region   forward: all-reduce    backward: identity

f sits where a replicated activation enters ranks that each use it for a different slice of
the output; every rank's gradient with respect to that activation is then only its share of
the whole, so backward sums them. g sits where each rank holds a partial sum of an activation
that must be complete and replicated; backward hands the (replicated) gradient straight on.
Forward and backward are each other's transpose, which is why a collective in one direction
always meets its conjugate in the other.

Sequence parallelism (Korthikanti et al. 2022, §4.2.2) splits the activations *between* the
linear layers (LayerNorm, dropout, residual) along the sequence axis. An all-reduce is a
reduce-scatter followed by an all-gather, and sequence parallelism simply stops between the
two: g becomes a reduce-scatter to sequence pieces and f an all-gather from them.

Every function here takes the tensor-parallel :class:`~mpipar.comm.Comm` explicitly.
Activations are batch-first, (B, T, d): the sequence axis is 1 and the "tensor" axis (the
one column-parallel layers split) is the last. All communication goes through ``Comm``.
"""

from __future__ import annotations

from typing import Any

from mpipar.autograd import Function, Tensor
from mpipar.backend import array_module
from mpipar.comm import Comm

SEQUENCE_AXIS = 1  # activations are (B, T, ...)


# ---------------------------------------------------------------------------------------------
# Array-level collectives along an axis (no autograd): the building blocks of the Functions
# ---------------------------------------------------------------------------------------------
def all_reduce(x: Any, comm: Comm) -> Any:
    """A new array holding Σ over ranks of ``x`` (``x`` is left as it is)."""
    xp = array_module(x)
    out = xp.empty(x.shape, dtype=x.dtype)
    return comm.allreduce(xp.ascontiguousarray(x), out=out)


def split_along(x: Any, axis: int, comm: Comm) -> Any:
    """This rank's block of ``x`` along ``axis`` (``size`` equal blocks), as a new array.

    Needs no communication: every rank already holds the whole ``x``.
    """
    n = x.shape[axis]
    if n % comm.size:
        raise ValueError(f"cannot split an axis of length {n} between {comm.size} ranks")
    k = n // comm.size
    index = [slice(None)] * x.ndim
    index[axis] = slice(comm.rank * k, (comm.rank + 1) * k)
    return x[tuple(index)].copy()  # C-contiguous, and never a view of x


def gather_along(x: Any, axis: int, comm: Comm) -> Any:
    """All ranks' ``x`` joined along ``axis`` in rank order: (..., n, ...) → (..., size·n, ...).

    MPI all-gathers flat buffers one after the other, so the result arrives as
    (size, *x.shape) and is then laid side by side along ``axis``.
    """
    xp = array_module(x)
    recv = xp.empty((comm.size, *x.shape), dtype=x.dtype)
    comm.allgather(xp.ascontiguousarray(x), recv)
    if axis % x.ndim == 0:
        return recv.reshape(comm.size * x.shape[0], *x.shape[1:])
    return xp.concatenate(list(recv), axis=axis)


def reduce_scatter_along(x: Any, axis: int, comm: Comm) -> Any:
    """Block ``rank`` (along ``axis``) of Σ over ranks of ``x``: (..., n, ...) → (..., n/size, ...).

    MPI reduce-scatters flat buffers, so the blocks are first stacked rank-major:
    (size, *block shape), block i going to rank i.
    """
    xp = array_module(x)
    n = x.shape[axis]
    if n % comm.size:
        raise ValueError(f"cannot reduce-scatter an axis of length {n} over {comm.size} ranks")
    blocks = xp.ascontiguousarray(xp.stack(xp.split(x, comm.size, axis=axis)))
    out = xp.empty(blocks.shape[1:], dtype=x.dtype)
    return comm.reduce_scatter(blocks, out)


# ---------------------------------------------------------------------------------------------
# Tensor-parallel region (Megatron-LM, Shoeybi et al. 2019)
# ---------------------------------------------------------------------------------------------
class CopyToTensorParallelRegion(Function):
    """f — forward: identity, backward: all-reduce (Shoeybi et al. 2019, §3, Fig. 3)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, g):
        return (all_reduce(g, ctx.comm),)


class ReduceFromTensorParallelRegion(Function):
    """g — forward: all-reduce, backward: identity (Shoeybi et al. 2019, §3, Fig. 3)."""

    @staticmethod
    def forward(ctx, x, comm):
        return all_reduce(x, comm)

    @staticmethod
    def backward(ctx, g):
        return (g,)


class ScatterToTensorParallelRegion(Function):
    """Forward: keep this rank's block of the last axis, backward: all-gather the last axis
    (Shoeybi et al. 2019; Megatron-LM's ``scatter_to_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return split_along(x, -1, comm)

    @staticmethod
    def backward(ctx, g):
        return (gather_along(g, -1, ctx.comm),)


class GatherFromTensorParallelRegion(Function):
    """Forward: all-gather the last axis, backward: keep this rank's block of it
    (Shoeybi et al. 2019; Megatron-LM's ``gather_from_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return gather_along(x, -1, comm)

    @staticmethod
    def backward(ctx, g):
        return (split_along(g, -1, ctx.comm),)


# ---------------------------------------------------------------------------------------------
# Sequence-parallel region (Korthikanti et al. 2022)
# ---------------------------------------------------------------------------------------------
class ScatterToSequenceParallelRegion(Function):
    """Forward: keep this rank's piece of the sequence, backward: all-gather the sequence
    (Korthikanti et al. 2022, §4.2.2; used where a replicated activation enters the region)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return split_along(x, SEQUENCE_AXIS, comm)

    @staticmethod
    def backward(ctx, g):
        return (gather_along(g, SEQUENCE_AXIS, ctx.comm),)


class GatherFromSequenceParallelRegion(Function):
    """ḡ — forward: all-gather the sequence, backward: reduce-scatter the sequence
    (Korthikanti et al. 2022, §4.2.2: the sequence-parallel form of f)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return gather_along(x, SEQUENCE_AXIS, comm)

    @staticmethod
    def backward(ctx, g):
        return (reduce_scatter_along(g, SEQUENCE_AXIS, ctx.comm),)


class ReduceScatterToSequenceParallelRegion(Function):
    """g̅ — forward: reduce-scatter the sequence, backward: all-gather the sequence
    (Korthikanti et al. 2022, §4.2.2: the sequence-parallel form of g)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return reduce_scatter_along(x, SEQUENCE_AXIS, comm)

    @staticmethod
    def backward(ctx, g):
        return (gather_along(g, SEQUENCE_AXIS, ctx.comm),)


# ---------------------------------------------------------------------------------------------
# Functional interface (Megatron-LM's names)
# ---------------------------------------------------------------------------------------------
def copy_to_tensor_parallel_region(x: Tensor, comm: Comm) -> Tensor:
    """f: forward identity, backward all-reduce."""
    return CopyToTensorParallelRegion.apply(x, comm)


def reduce_from_tensor_parallel_region(x: Tensor, comm: Comm) -> Tensor:
    """g: forward all-reduce, backward identity."""
    return ReduceFromTensorParallelRegion.apply(x, comm)


def scatter_to_tensor_parallel_region(x: Tensor, comm: Comm) -> Tensor:
    """Forward: split the last axis (keep my block), backward: all-gather it."""
    return ScatterToTensorParallelRegion.apply(x, comm)


def gather_from_tensor_parallel_region(x: Tensor, comm: Comm) -> Tensor:
    """Forward: all-gather the last axis, backward: split it."""
    return GatherFromTensorParallelRegion.apply(x, comm)


def scatter_to_sequence_parallel_region(x: Tensor, comm: Comm) -> Tensor:
    """Forward: split the sequence axis (keep my piece), backward: all-gather it."""
    return ScatterToSequenceParallelRegion.apply(x, comm)


def gather_from_sequence_parallel_region(x: Tensor, comm: Comm) -> Tensor:
    """Forward: all-gather the sequence axis, backward: reduce-scatter it."""
    return GatherFromSequenceParallelRegion.apply(x, comm)


def reduce_scatter_to_sequence_parallel_region(x: Tensor, comm: Comm) -> Tensor:
    """Forward: reduce-scatter the sequence axis, backward: all-gather it."""
    return ReduceScatterToSequenceParallelRegion.apply(x, comm)


__all__ = [
    "all_reduce", "copy_to_tensor_parallel_region", "gather_along",
    "gather_from_sequence_parallel_region", "gather_from_tensor_parallel_region",
    "reduce_from_tensor_parallel_region", "reduce_scatter_along",
    "reduce_scatter_to_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region", "split_along",
]
