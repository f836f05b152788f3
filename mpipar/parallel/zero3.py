"""ZeRO stage 3 (Rajbhandari et al., 2020): the parameters are sharded over dp as well.

ZeRO-1 and -2 (:mod:`mpipar.parallel.zero`) shard the optimizer state and the gradients; every
rank still holds all Ψ parameters. Stage 3 keeps 1/N of those too, so in fp32 with AdamW a rank
holds

    parameters 4Ψ/N  +  gradients 4Ψ/N  +  AdamW's m and v 8Ψ/N  =  16Ψ/N bytes,

and a layer's parameters exist whole only while the layer computes. Each transformer block is
a *unit*:

* **forward**: just before block i runs, all-gather its parameters (the call was started
  while block i − 1 ran: a non-blocking ``iallgather``, *prefetch*), start block i + 1's, run
  block i, and release it: its parameters' arrays point at nothing again;
* **backward**: just before block i's backward (a `GatherForBackward` node sits at the block's
  output), all-gather it again and start block i − 1's; once its backward is over (the last of
  its parameters' gradient hooks), reduce-scatter its gradient into this rank's shard of the
  gradient and release it;
* **optimizer**: AdamW on this rank's shard of the parameters, which stay sharded.

So per step (and microbatch) a block's parameters cross the network three times, two
all-gathers and a reduce-scatter: 3Ψ against the 2Ψ of ZeRO-1/2 (a reduce-scatter and one
all-gather), each Ψ moving (N − 1)/N · Ψ elements per rank.

Where the gathered values live. Two buffers of one block each, used in turn: block i gathers
into buffer i mod 2, so the block that runs and the block being prefetched never share one.
The autograd graph of block i keeps views into its buffer (a linear layer saves its weight);
between block i's forward and its backward the buffer holds other blocks, and the all-gather
before block i's backward puts block i's values back in the same place, under the views. The
parameters themselves, outside their unit's forward and backward, are a zero-stride view of
NaN: their shape is right and anything that reads them by mistake computes NaN.

The parameters outside the blocks (the tied embedding, the positions, the final LayerNorm)
are few and used at both ends of every pass, so they are kept whole, as ZeRO-2 keeps every
parameter: their gradient is reduce-scattered once per step and their updated shard
all-gathered after the optimizer step (DeepSpeed keeps small parameters whole the same way).

Checkpoints stay layout-independent: `Zero3AdamW.state_dict` and `ShardedParameters.gathered`
give exactly the arrays of the 1-process model and of plain AdamW.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpipar.autograd import Function, Tensor
from mpipar.backend import array_module, to_numpy
from mpipar.comm import Comm, Request
from mpipar.model import GPT, SequenceLayout
from mpipar.nn import DropoutKey, Module, ModuleList, Parameter
from mpipar.optim import AdamW, adamw_update, decay_mask


@dataclass(eq=False)
class Unit:
    """Parameters gathered and released together: one block, or everything else (``rest``).

    In the unit's flat space, parameter k occupies ``[offsets[k], offsets[k] + size)``; the
    space is padded with zeros to ``padded``, a multiple of dp, and this rank owns block
    ``dp_rank`` of it, ``width`` elements, which sit at ``shard_lo`` of the rank's shard.
    ``before``/``after`` are the blocks that run just before and after it in its model chunk.
    """

    params: list[Parameter]
    offsets: list[int]
    padded: int
    width: int
    shard_lo: int
    buffer: Any = None  # (padded,) where the whole unit is gathered
    before: Unit | None = None
    after: Unit | None = None
    pending: int = 0  # gradients of this backward pass still to come
    request: Request | None = field(default=None, repr=False)

    def segments(self, rank: int) -> Iterator[tuple[Parameter, int, int, int, int]]:
        """``(p, p_lo, p_hi, s_lo, s_hi)``: elements ``p_lo:p_hi`` of ``p`` (flattened) are
        this rank's, at ``s_lo:s_hi`` of its shard. Padding belongs to no parameter."""
        lo, hi = rank * self.width, (rank + 1) * self.width
        for p, o in zip(self.params, self.offsets, strict=True):
            a, b = max(lo, o), min(hi, o + p.size)
            if a < b:
                yield p, a - o, b - o, self.shard_lo + a - lo, self.shard_lo + b - lo


def lay_out(groups: list[list[Parameter]], dp: int) -> list[Unit]:
    """One `Unit` per group of parameters, their shards laid end to end in a rank's shard."""
    units, shard_lo = [], 0
    for params in groups:
        offsets, numel = [], 0
        for p in params:
            offsets.append(numel)
            numel += p.size
        padded = -(-numel // dp) * dp
        units.append(Unit(params, offsets, padded, padded // dp, shard_lo))
        shard_lo += padded // dp
    return units


class GatherForBackward(Function):
    """forward: identity on a block's output; backward: gather the block's parameters first.

    Its backward runs before any of the block's, since everything the block computed lies
    between its input and this node.
    """

    @staticmethod
    def forward(ctx, y, sharded, unit):
        ctx.sharded, ctx.unit = sharded, unit
        return y

    @staticmethod
    def backward(ctx, g):
        ctx.sharded.gather(ctx.unit, backward=True)
        return (g,)


class ShardedBlock(Module):
    """A block whose parameters `ShardedParameters` gathers around each forward and backward.

    It takes the block's place in its model chunk; parameter names are the block's own.
    """

    def __init__(self, block: Module, sharded: ShardedParameters, unit: Unit) -> None:
        self.block, self.sharded, self.unit = block, sharded, unit

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        return self.block.named_parameters(prefix)

    def forward(self, x: Tensor, layout: SequenceLayout, key: DropoutKey | None = None,
                cache: Any = None) -> Tensor:
        self.sharded.gather(self.unit, backward=False)
        try:
            y = self.block(x, layout, key, cache)
        finally:
            self.sharded.release(self.unit)
        if y.requires_grad:
            y = GatherForBackward.apply(y, sharded=self.sharded, unit=self.unit)
        return y


class ShardedParameters:
    """The parameters of this rank's model chunks, sharded over the data-parallel group.

    Takes the chunks' blocks' places with `ShardedBlock` s, holds this rank's shard of every
    unit (:attr:`shard`) and of the averaged gradient (:attr:`grad_shard`), and plays the part
    `DataParallel` plays in the training step (``zero_grad``, ``set_sync``, ``finish``).
    ``prefetch`` starts the next block's all-gather during the current one.
    ``replicated_sum`` (tensor parallelism's ``sync_replicated_grads``) is applied to a
    block's gradients before they are reduce-scattered.
    """

    zero = 3
    grad_replicas = 1  # after finish() each gradient element lives in one rank's shard

    def __init__(self, chunks: list[GPT], comm: Comm, *, prefetch: bool = True,
                 replicated_sum: Callable[[list[Parameter]], None] | None = None) -> None:
        self.comm, self.dp, self.rank = comm, comm.size, comm.rank
        self.prefetch, self.replicated_sum = prefetch, replicated_sum
        blocks = [b for c in chunks for b in c.blocks]
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        rest = [p for c in chunks for p in c.parameters() if id(p) not in in_blocks]
        rest = list({id(p): p for p in rest}.values())  # the tied matrix once
        self.units = lay_out([rest, *[b.parameters() for b in blocks]], self.dp)
        self.rest, self.block_units = self.units[0], self.units[1:]
        self.params = [p for u in self.units for p in u.params]
        self.xp, self.dtype = array_module(self.params[0].data), self.params[0].dtype
        self.numel = sum(p.size for p in self.params)
        self._wrap(chunks)
        self._unit_of = {id(p): u for u in self.block_units for p in u.params}
        for unit in self.block_units:
            for p in unit.params:
                p.register_grad_hook(self._on_grad_ready)
        self.shard = self.xp.zeros(self.units[-1].shard_lo + self.units[-1].width, self.dtype)
        self.grad_shard = self.xp.zeros_like(self.shard)
        self._take_shards()
        self.rest_grads: Any = None  # the rest's whole gradient, between zero_grad and finish

    # -- set-up ------------------------------------------------------------------------------
    def _wrap(self, chunks: list[GPT]) -> None:
        """Put a `ShardedBlock` in each block's place; chain each chunk's units in order."""
        units = iter(self.block_units)
        for chunk in chunks:
            previous, wrapped = None, []
            for block in chunk.blocks:
                unit = next(units)
                unit.before = previous
                if previous is not None:
                    previous.after = unit
                wrapped.append(ShardedBlock(block, self, unit))
                previous = unit
            chunk.blocks = ModuleList(wrapped, start=chunk.blocks.start)
        size = max((u.padded for u in self.block_units), default=0)
        # Block i gathers into buffer i mod 2 (module docstring).
        self._buffers = [self.xp.zeros(size, self.dtype) for _ in range(2)]
        for i, unit in enumerate(self.block_units):
            unit.buffer = self._buffers[i % 2][:unit.padded]
        self.rest.buffer = self.xp.zeros(self.rest.padded, self.dtype)

    def _take_shards(self) -> None:
        """Copy this rank's shard of every unit out of the (whole) initial values, point the
        rest into its buffer, and release the blocks."""
        for unit in self.units:
            for p, p_lo, p_hi, s_lo, s_hi in unit.segments(self.rank):
                self.shard[s_lo:s_hi] = p.data.reshape(-1)[p_lo:p_hi]
        for p, o in zip(self.rest.params, self.rest.offsets, strict=True):
            self.rest.buffer[o:o + p.size] = p.data.reshape(-1)
        self._point(self.rest)
        for unit in self.block_units:
            self.release(unit)

    def parameter_buffers(self) -> list[Any]:
        """The arrays gathered parameters live in (not activation memory)."""
        return [*self._buffers, self.rest.buffer]

    # -- gathering and releasing ---------------------------------------------------------------
    def _start_gather(self, unit: Unit) -> None:
        """Put this rank's shard of ``unit`` in its block of the buffer; start the all-gather."""
        lo = self.rank * unit.width
        unit.buffer[lo:lo + unit.width] = self.shard[unit.shard_lo:unit.shard_lo + unit.width]
        unit.request = self.comm.iallgather(unit.buffer)

    def gather(self, unit: Unit, backward: bool) -> None:
        """Make ``unit``'s parameters whole: finish its all-gather (prefetched, or started now),
        point each parameter into the buffer, and prefetch the block that runs next."""
        if unit.request is None:
            self._start_gather(unit)
        unit.request.wait()
        unit.request = None
        self._point(unit)
        if backward:
            unit.pending = len(unit.params)
        following = unit.before if backward else unit.after
        if self.prefetch and following is not None and following.request is None:
            self._start_gather(following)

    def _point(self, unit: Unit) -> None:
        for p, o in zip(unit.params, unit.offsets, strict=True):
            p.data = unit.buffer[o:o + p.size].reshape(p.shape)

    def release(self, unit: Unit) -> None:
        """The unit's parameters point at nothing: a NaN seen through zero strides."""
        nan = self.xp.full((), math.nan, dtype=self.dtype)
        for p in unit.params:
            p.data = self.xp.broadcast_to(nan, p.shape)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every parameter whole, each block in an array of its own, for the ``with`` body
        (checkpoints: 4Ψ bytes for the duration). Collective over dp."""
        for unit in self.block_units:
            whole = self.xp.zeros(unit.padded, self.dtype)
            lo = self.rank * unit.width
            whole[lo:lo + unit.width] = self.shard[unit.shard_lo:unit.shard_lo + unit.width]
            self.comm.iallgather(whole).wait()
            for p, o in zip(unit.params, unit.offsets, strict=True):
                p.data = whole[o:o + p.size].reshape(p.shape)
        try:
            yield
        finally:
            for unit in self.block_units:
                self.release(unit)

    def load(self, values: Mapping[int, Any]) -> None:
        """Set every parameter from its whole local value, ``values[id(p)]``: keep this rank's
        shard of it (and the rest whole). No communication."""
        for unit in self.units:
            for p, p_lo, p_hi, s_lo, s_hi in unit.segments(self.rank):
                local = self.xp.asarray(values[id(p)], dtype=self.dtype).reshape(-1)
                self.shard[s_lo:s_hi] = local[p_lo:p_hi]
        for p in self.rest.params:
            p.data[...] = self.xp.asarray(values[id(p)], dtype=self.dtype)

    # -- gradients -------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the gradient shard; give the rest a whole gradient buffer, ``p.grad`` views."""
        self.grad_shard.fill(0)
        self.rest_grads = self.xp.zeros(self.rest.padded, self.dtype)
        for p, o in zip(self.rest.params, self.rest.offsets, strict=True):
            p.grad = self.rest_grads[o:o + p.size].reshape(p.shape)
        for unit in self.block_units:
            for p in unit.params:
                p.grad = None

    def set_sync(self, enabled: bool) -> None:
        """Every microbatch's block gradients are reduce-scattered: nothing to switch."""

    def _on_grad_ready(self, p: Parameter) -> None:
        unit = self._unit_of[id(p)]
        unit.pending -= 1
        if unit.pending == 0:
            self._reduce_block(unit)

    def _reduce_block(self, unit: Unit) -> None:
        """Sum the block's gradient over dp into this rank's shard; release the block."""
        if self.replicated_sum is not None:
            self.replicated_sum(unit.params)
        flat = self.xp.zeros(unit.padded, self.dtype)
        for p, o in zip(unit.params, unit.offsets, strict=True):
            flat[o:o + p.size] = p.grad.reshape(-1)
            p.grad = None
        self._reduce_into_shard(flat, unit)
        self.release(unit)

    def _reduce_into_shard(self, flat: Any, unit: Unit) -> None:
        part = self.xp.empty(unit.width, self.dtype)
        self.comm.reduce_scatter(flat, part)  # block r of the dp sum lands on rank r
        self.grad_shard[unit.shard_lo:unit.shard_lo + unit.width] += part

    def finish(self) -> None:
        """Reduce-scatter the rest's gradient; :attr:`grad_shard` ends holding the dp average."""
        if self.rest_grads is None:
            raise RuntimeError("finish() without gradients: call zero_grad() before backward")
        if self.rest.padded:  # a middle pipeline stage holds only blocks
            self._reduce_into_shard(self.rest_grads, self.rest)
        self.grad_shard *= 1.0 / self.dp
        self.rest_grads = None  # like ZeRO-2: only the shard outlives the step
        for p in self.rest.params:
            p.grad = None

    def refresh_rest(self) -> None:
        """After the optimizer step: all-gather the rest's updated shards into its buffer."""
        if not self.rest.padded:
            return
        self._start_gather(self.rest)
        self.rest.request.wait()
        self.rest.request = None

    def grad_bytes(self) -> int:
        """Bytes of gradient storage kept between steps: the shard."""
        return int(self.grad_shard.nbytes)


class Zero3AdamW:
    """AdamW on this rank's shard of the parameters, gradients and moments (ZeRO-3).

    The interface of :class:`mpipar.optim.AdamW`, plus :meth:`grad_norm_sq` and :meth:`clip`
    for a sharded gradient, as :class:`mpipar.parallel.zero.ZeroAdamW` has them.
    """

    def __init__(self, params: Iterable[Parameter], sharded: ShardedParameters, lr: float,
                 weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8) -> None:
        if {id(p) for p in params} != {id(p) for p in sharded.params}:
            raise ValueError("Zero3AdamW must get the parameters its ShardedParameters holds")
        self.params, self.sharded, self.comm = sharded.params, sharded, sharded.comm
        self.lr, self.weight_decay, self.eps = float(lr), float(weight_decay), float(eps)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.step_count = 0
        xp = sharded.xp
        self.segments = [s for u in sharded.units for s in u.segments(sharded.rank)]
        self.m, self.v = xp.zeros_like(sharded.shard), xp.zeros_like(sharded.shard)
        self._scratch = xp.empty_like(sharded.shard)
        # Per-element weight decay λ_i over the shard: λ on matrices/embeddings, else 0.
        self.decay: Any = 0.0
        if self.weight_decay:
            self.decay = xp.zeros_like(sharded.shard)
            for p, _, _, s_lo, s_hi in self.segments:
                if decay_mask(p):
                    self.decay[s_lo:s_hi] = self.weight_decay

    def step(self, lr: float | None = None) -> None:
        """AdamW on the shard; then the whole rest is all-gathered (the blocks stay sharded)."""
        self.step_count += 1
        adamw_update(self.sharded.shard, self.sharded.grad_shard, self.m, self.v,
                     lr=self.lr if lr is None else float(lr), beta1=self.beta1,
                     beta2=self.beta2, eps=self.eps, weight_decay=self.decay,
                     step=self.step_count, scratch=self._scratch)
        self.sharded.refresh_rest()

    def zero_grad(self) -> None:
        self.sharded.zero_grad()

    def grad_norm_sq(self, owned: Callable[[Parameter], bool]) -> float:
        """Σ g² over this rank's gradient shard, counting elements of params with ``owned(p)``
        (summed in float64; over the world every element of the model counts once)."""
        g, total = self.sharded.grad_shard, 0.0
        for p, _, _, s_lo, s_hi in self.segments:
            if owned(p):
                part = g[s_lo:s_hi].astype(np.float64, copy=False)
                total = total + float((part * part).sum())
        return total

    def clip(self, norm: float, max_norm: float) -> None:
        """If ``norm > max_norm``: g ← g · max_norm / (norm + 10⁻⁶) on the shard."""
        if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
            self.sharded.grad_shard *= float(max_norm) / (norm + 1e-6)

    # -- checkpoints -------------------------------------------------------------------------
    def _gather_state(self, shard: Any) -> dict[int, np.ndarray]:
        """Each parameter's whole local array of a state kept in shards (collective over dp)."""
        out = {}
        for unit in self.sharded.units:
            whole = self.sharded.xp.zeros(unit.padded, self.sharded.dtype)
            lo = self.sharded.rank * unit.width
            whole[lo:lo + unit.width] = shard[unit.shard_lo:unit.shard_lo + unit.width]
            whole = to_numpy(self.comm.iallgather(whole).wait())
            for p, o in zip(unit.params, unit.offsets, strict=True):
                out[id(p)] = whole[o:o + p.size].reshape(p.shape).copy()
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """``AdamW.state_dict()``'s keys and shapes. Collective over dp."""
        with self.comm.tracer.context(phase="other"):
            m, v = self._gather_state(self.m), self._gather_state(self.v)
        d = {}
        for p in self.params:
            d[f"adamw.m.{p.name}"], d[f"adamw.v.{p.name}"] = m[id(p)], v[id(p)]
        d["adamw.step"] = np.array(self.step_count, dtype=np.int64)
        return d

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        """Restore from whole per-parameter state (``AdamW`` format); keep this rank's shard.

        A plain AdamW of the same shapes checks the keys and shapes first. No communication.
        """
        full = AdamW(self.params, lr=self.lr)
        full.load_state_dict(d)
        for p, p_lo, p_hi, s_lo, s_hi in self.segments:
            for moments, shard in ((full.m, self.m), (full.v, self.v)):
                shard[s_lo:s_hi] = self.sharded.xp.asarray(
                    moments[p.name].reshape(-1)[p_lo:p_hi])
        self.step_count = full.step_count

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank keeps between steps, and without ZeRO (`zero.memory_report`).

        ``param_bytes``: the parameter shard and the gather buffers (two blocks, and the
        parameters outside the blocks, kept whole), ``param_buffer_bytes`` the buffers alone.
        """
        s, item = self.sharded, self.sharded.dtype.itemsize
        buffers = sum(int(b.nbytes) for b in s.parameter_buffers())
        return {
            "zero": 3, "dp": s.dp, "params": s.numel,
            "param_bytes": int(s.shard.nbytes) + buffers, "param_buffer_bytes": buffers,
            "optimizer_state_bytes": int(self.m.nbytes + self.v.nbytes),
            "grad_bytes": s.grad_bytes(),
            "baseline_param_bytes": s.numel * item,
            "baseline_optimizer_state_bytes": 2 * s.numel * item,
            "baseline_grad_bytes": s.numel * item,
        }
