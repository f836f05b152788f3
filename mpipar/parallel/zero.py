"""ZeRO (Rajbhandari et al., 2020): shard the optimizer state, and the gradients, over dp.

Plain data parallelism keeps a full copy of everything on every rank. For a model of Ψ
parameters trained in fp32 with AdamW, each rank holds

    parameters 4Ψ bytes  +  gradients 4Ψ  +  AdamW moments m and v 8Ψ  =  16Ψ bytes,

and the dp copies of m, v and the gradients are identical. ZeRO stage 1 gives each rank a 1/dp
slice of the optimizer state; stage 2 slices the gradients too:

    ZeRO-1:  4Ψ + 4Ψ + 8Ψ/dp          ZeRO-2:  4Ψ + 4Ψ/dp + 8Ψ/dp

(stage 3, :mod:`mpipar.parallel.zero3`, also slices the parameters). The step becomes

1. **reduce-scatter** the flat gradient buffer: rank r receives the dp-sum of its shard only
   (half the traffic of an all-reduce, which is a reduce-scatter followed by an all-gather);
2. **update** the owned shard with AdamW (:func:`mpipar.optim.adamw_update`), using only the
   owned slice of m and v;
3. **all-gather** the updated parameter shards, so every rank has the whole model again.

Steps 1 and 3 together move exactly the bytes of one all-reduce: ZeRO-1/2 cost no extra
communication. With ``--allreduce ring`` they are literally the two halves of the ring
all-reduce (:mod:`mpipar.parallel.ring`) with the optimizer step in between.

:class:`ZeroGradients` does step 1. It is a :class:`~mpipar.parallel.data_parallel.DataParallel`
(parameters in model order in one flat gradient buffer, accumulated into during backward) whose
buffer is padded with zeros at the end so that dp divides it, and whose :meth:`finish`
reduce-scatters instead of all-reducing. Each rank owns a contiguous 1/dp of the flat space,
which cuts through parameters wherever it falls. ZeRO-1 keeps the whole flat buffer between
steps (its shard is a view into it); ZeRO-2 copies the shard out and frees the buffer, so that
only 4Ψ/dp bytes of gradients outlive the step.

:class:`ZeroAdamW` does steps 2 and 3. Weight decay is a per-element coefficient array over the
shard (λ on elements of matrices and embeddings, 0 on biases and LayerNorm gains), the
convention of :class:`mpipar.optim.AdamW`. The parameters' ``.data`` become views into one flat
buffer, so the all-gather writes straight into the model. Checkpoints stay layout-independent:
:meth:`ZeroAdamW.state_dict` gathers the shards and returns exactly the keys and shapes of
``AdamW.state_dict()``.

Mixed precision (:mod:`mpipar.master_weights`). With 16-bit parameters the gradients are
reduce-scattered and the parameters all-gathered in 16 bits (half the bytes), and the fp32
master weights are optimizer state like m and v: each rank keeps the master of its shard only
(``masters=``), updates it in fp32 and rounds it into the shard it all-gathers. Per rank,
with K = 12 bytes of fp32 state per parameter (master, m, v):

    ZeRO-1:  2Ψ + 2Ψ + 12Ψ/dp          ZeRO-2:  2Ψ + 2Ψ/dp + 12Ψ/dp
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mpipar.backend import to_numpy
from mpipar.comm import Comm
from mpipar.master_weights import MasterWeights, round_into
from mpipar.nn import Parameter, master_copy, unique_parameters
from mpipar.optim import AdamW, adamw_update, decay_mask
from mpipar.parallel.data_parallel import DataParallel
from mpipar.parallel.ring import chunk_bounds, ring_allgather, ring_reduce_scatter
from mpipar.parallel.zero3 import Zero3AdamW
from mpipar.precision import all_finite
from mpipar.trace import human_bytes


def owned_chunk(rank: int, n: int, allreduce: str) -> int:
    """The chunk of the flat buffer (of n) that ``rank`` owns after the reduce-scatter.

    MPI's reduce-scatter leaves block r on rank r; the ring's leaves rank r holding chunk
    (r + 1) % n, the chunk its last hop completed (see :mod:`mpipar.parallel.ring`).
    """
    return (rank + 1) % n if allreduce == "ring" else rank


class ZeroGradients(DataParallel):
    """DataParallel whose :meth:`finish` reduce-scatters: each rank keeps its averaged shard.

    Takes the arguments of :class:`DataParallel` but ``overlap`` and ``progress`` (the
    reduce-scatter runs in :meth:`finish`, after backward), plus ``zero``: 1 or 2. After
    :meth:`finish` this rank's 1/dp of the averaged gradient is in :attr:`grad_shard`, flat
    positions ``[shard_lo, shard_hi)``: with 1 a view into the flat buffer, which stays
    allocated; with 2 a buffer of its own, and the full flat buffer is freed after the
    reduce-scatter, so only the shard stays between steps.
    """

    def __init__(self, params: Iterable[Parameter], comm: Comm, *, zero: int,
                 strategy: str = "bucketed", bucket_mb: float = 1.0,
                 allreduce: str = "mpi") -> None:
        if zero not in (1, 2):
            raise ValueError(f"zero must be 1 or 2 for sharded gradients, got {zero}")
        self.zero = zero
        super().__init__(params, comm, strategy=strategy, bucket_mb=bucket_mb, overlap=False,
                         allreduce=allreduce)

    @property
    def grad_replicas(self) -> int:
        """1: after :meth:`finish` each averaged gradient element lives in one rank's shard."""
        return 1

    def lay_out(self) -> None:
        """DataParallel's layout, padded with zeros to dp equal shards; this rank's shard."""
        super().lay_out()
        self.padded = -(-self.numel // self.dp) * self.dp
        self.shard_bounds = chunk_bounds(self.padded, self.dp)
        self.owned_chunk = owned_chunk(self.comm.rank, self.dp, self.allreduce)
        self.shard_lo, self.shard_hi = self.shard_bounds[self.owned_chunk]
        # The averaged gradient of the owned shard, (padded / dp,). ZeRO-1 keeps the flat
        # buffer anyway, so the shard is a view into it; ZeRO-2 gives it its own memory.
        self.grad_shard = None
        if self.zero == 2:
            self.grad_shard = self.xp.zeros(self.shard_hi - self.shard_lo, dtype=self.dtype)

    def allocate_grads(self) -> None:
        """DataParallel's flat buffer; ZeRO-1's :attr:`grad_shard` is the owned slice of it."""
        super().allocate_grads()
        if self.zero == 1:
            self.grad_shard = self.flat_grads[self.shard_lo:self.shard_hi]

    def segments(self, lo: int, hi: int) -> list[tuple[Parameter, int, int, int, int]]:
        """The parameters overlapping flat range ``[lo, hi)``, as ``(p, p_lo, p_hi, s_lo, s_hi)``.

        Elements ``p_lo:p_hi`` of ``p`` flattened sit at ``s_lo:s_hi`` relative to ``lo``.
        Padding is part of no parameter, so it appears in no segment.
        """
        out = []
        for p, o in zip(self.params, self.offsets, strict=True):
            a, b = max(lo, o), min(hi, o + p.size)
            if a < b:
                out.append((p, a - o, b - o, a - lo, b - lo))
        return out

    def zero_grad(self) -> None:
        """As DataParallel's, first allocating the flat buffer again if ZeRO-2 freed it."""
        if self.flat_grads is None:
            self.allocate_grads()
        super().zero_grad()

    def finish(self) -> None:
        """Reduce-scatter; :attr:`grad_shard` ends holding the dp average over the owned shard."""
        if self.flat_grads is None:
            raise RuntimeError("finish() without gradients: call zero_grad() before backward")
        self._reduce_scatter()
        self.grad_shard *= 1.0 / self.dp
        if self.zero == 2:  # only the owned shard survives until the next zero_grad()
            self.flat_grads, self._views = None, []
            for p in self.params:
                p.grad = None

    def _reduce_scatter(self) -> None:
        """Sum the flat buffer over dp, keeping only the owned shard of the sum.

        The ring reduces in place, leaving the sum in the owned slice of the flat buffer.
        MPI's reduce-scatter needs a receive buffer apart from the send buffer: ZeRO-2's
        shard, or for ZeRO-1 a temporary copied back into the owned slice.
        """
        n = self.shard_hi - self.shard_lo
        if self.allreduce == "ring":
            tmp = self.xp.empty(n, dtype=self.dtype)  # one chunk, the receive buffer
            done = ring_reduce_scatter(self.comm, self.flat_grads, self.shard_bounds, tmp)
            assert done == self.owned_chunk
            if self.zero == 2:  # keep a copy: the flat buffer is about to be freed
                self.grad_shard[...] = self.flat_grads[self.shard_lo:self.shard_hi]
        elif self.zero == 2:
            self.comm.reduce_scatter(self.flat_grads, self.grad_shard)
        else:
            tmp = self.xp.empty(n, dtype=self.dtype)
            self.comm.reduce_scatter(self.flat_grads, tmp)
            self.grad_shard[...] = tmp  # the owned slice of the flat buffer

    def grad_bytes(self) -> int:
        """Bytes of gradient storage this rank keeps between steps.

        ZeRO-1: the flat buffer (its shard is a slice of it). ZeRO-2: the shard only; the full
        buffer exists only between :meth:`zero_grad` and :meth:`finish`.
        """
        if self.zero == 2:
            return (self.shard_hi - self.shard_lo) * self.dtype.itemsize
        return super().grad_bytes()


def make_grad_sync(params: Iterable[Parameter], comm: Comm, *, zero: int = 0,
                   strategy: str = "bucketed", bucket_mb: float = 1.0, overlap: bool = True,
                   allreduce: str = "mpi") -> DataParallel:
    """The gradient synchronisation of a ZeRO stage: all-reduce for 0, sharded for 1 and 2.

    ZeRO's reduce-scatter runs in :meth:`ZeroGradients.finish`, after backward, so ``overlap``
    applies to stage 0 only.
    """
    if zero == 0:
        return DataParallel(params, comm, strategy=strategy, bucket_mb=bucket_mb,
                            overlap=overlap, allreduce=allreduce)
    return ZeroGradients(params, comm, zero=zero, strategy=strategy, bucket_mb=bucket_mb,
                         allreduce=allreduce)


class ZeroAdamW:
    """AdamW whose moments (ZeRO-1), and gradients (ZeRO-2), are sharded over dp.

    ``grad_sync`` is the :class:`ZeroGradients` of the same parameters; its
    :meth:`~ZeroGradients.finish` leaves this rank's averaged gradient shard in
    ``grad_sync.grad_shard``. The interface is that of :class:`mpipar.optim.AdamW` plus what
    the training loop needs for a sharded gradient: :meth:`grad_norm_sq` and :meth:`clip`.

    ``masters`` (mixed precision): fp32 masters of the 16-bit ``params``
    (:func:`mpipar.master_weights.make_masters`); this rank keeps its shard of them, and the
    moments, in their dtype, and answers :class:`~mpipar.master_weights.MasterWeights`'s
    methods (:meth:`unscale`, :meth:`skip`, :meth:`master_parameters`, :meth:`load_masters`).
    """

    def __init__(self, params: Iterable[Parameter], grad_sync: ZeroGradients, lr: float,
                 weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, masters: list[Parameter] | None = None) -> None:
        params = unique_parameters(params)
        if not isinstance(grad_sync, ZeroGradients):
            raise ValueError(f"ZeroAdamW needs the ZeroGradients (zero=1 or 2) of its "
                             f"parameters, got a {type(grad_sync).__name__} with "
                             f"zero={grad_sync.zero}")
        if [id(p) for p in params] != [id(p) for p in grad_sync.params]:
            raise ValueError("ZeroAdamW must get the same parameters, in the same order, as "
                             "its ZeroGradients")
        self.params, self.sync, self.comm = params, grad_sync, grad_sync.comm
        self.lr, self.weight_decay, self.eps = float(lr), float(weight_decay), float(eps)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.step_count = 0
        xp, dtype = grad_sync.xp, grad_sync.dtype
        self.xp, self.dtype = xp, dtype

        # Flat parameters (padded,), in the gradients' layout; every p.data becomes a view.
        self.flat_params = xp.zeros(grad_sync.padded, dtype=dtype)
        for p, o in zip(params, grad_sync.offsets, strict=True):
            self.flat_params[o:o + p.size] = p.data.reshape(-1)
            p.data = self.flat_params[o:o + p.size].reshape(p.shape)

        self.lo, self.hi = grad_sync.shard_lo, grad_sync.shard_hi
        n = self.hi - self.lo  # shard length, padded / dp
        self.segments = grad_sync.segments(self.lo, self.hi)
        # Mixed precision: the fp32 master of this shard, and its unscaled fp32 gradient.
        self.master = self.master_grad = None
        if masters is not None:
            self.master = xp.zeros(n, dtype=masters[0].dtype)
            self.master_grad = xp.zeros(n, dtype=self.master.dtype)
            self.load_masters(masters)
        state = dtype if self.master is None else self.master.dtype  # of m, v and updates
        self.m = xp.zeros(n, dtype=state)
        self.v = xp.zeros(n, dtype=state)
        self._scratch = xp.empty(n, dtype=state)
        # Per-element weight decay λ_i over the shard: λ on matrices/embeddings, else 0.
        self.decay: Any = 0.0
        if self.weight_decay:
            self.decay = xp.zeros(n, dtype=state)
            for p, _, _, s_lo, s_hi in self.segments:
                if decay_mask(p):
                    self.decay[s_lo:s_hi] = self.weight_decay
        # MPI's all-gather needs a send buffer apart from the receive buffer.
        self._send = xp.empty(n, dtype=dtype) if grad_sync.allreduce == "mpi" else None

    # -- the update --------------------------------------------------------------------------
    def step(self, lr: float | None = None) -> None:
        """AdamW on the owned shard, then all-gather the parameters (see module docstring).

        With masters the update is applied to the fp32 master shard, which is then rounded
        into the 16-bit shard that the all-gather sends.
        """
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        shard = self.flat_params[self.lo:self.hi]  # (padded/dp,) view of this rank's slice
        if self._send is not None:  # update a copy, which the all-gather then sends
            self._send[...] = shard
            shard = self._send
        target = shard if self.master is None else self.master
        adamw_update(target, self._grad(), self.m, self.v, lr=lr, beta1=self.beta1,
                     beta2=self.beta2, eps=self.eps, weight_decay=self.decay,
                     step=self.step_count, scratch=self._scratch)
        if self.master is not None:
            shard[...] = self.master  # rounded to the compute dtype
        if self._send is not None:
            self.comm.allgather(self._send, self.flat_params)
        else:  # the ring's second half: pass each rank's updated chunk around
            bounds = self.sync.shard_bounds
            tmp = self.xp.empty(bounds[0][1] - bounds[0][0], dtype=self.dtype)
            ring_allgather(self.comm, self.flat_params, bounds, tmp)

    def zero_grad(self) -> None:
        """Zero the gradient buffer (delegated to the ZeroGradients that owns it)."""
        self.sync.zero_grad()

    def _grad(self) -> Any:
        """The averaged gradient shard the update uses: the fp32 unscaled one with masters."""
        return self.sync.grad_shard if self.master is None else self.master_grad

    def unscale(self, scale: float, check: bool = True) -> bool:
        """Mixed precision: the fp32 gradient shard = fp32(16-bit shard) / ``scale``; whether
        it is all finite (True without ``check``). See `MasterWeights.unscale`."""
        self.master_grad[...] = self.sync.grad_shard
        self.master_grad *= 1.0 / scale
        return not check or all_finite([self.master_grad])

    def skip(self) -> None:
        """An overflowed step: nothing is updated (no all-gather either; no rank updated)."""

    def grad_norm_sq(self, owned: Callable[[Parameter], bool]) -> float:
        """Σ g² over this rank's gradient shard, counting elements of params with ``owned(p)``.

        Summed in float64. The shards of the dp ranks are disjoint, so the sum over the world
        of this value counts every element of the model once (no division by dp).
        """
        g = self._grad()
        total = 0.0
        for p, _, _, s_lo, s_hi in self.segments:
            if owned(p):
                part = g[s_lo:s_hi].astype(self.xp.float64, copy=False)
                total = total + self.xp.dot(part, part)
        return float(total)

    def clip(self, norm: float, max_norm: float) -> None:
        """If ``norm > max_norm``: g ← g · max_norm / (norm + 10⁻⁶) on the owned shard.

        ``norm`` is the global norm; the formula is :func:`mpipar.optim.clip_grad_norm`'s.
        """
        if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
            g = self._grad()
            g *= float(max_norm) / (norm + 1e-6)

    # -- checkpoints -------------------------------------------------------------------------
    def _gather_flat(self, shard: Any) -> np.ndarray:
        """All ranks' shards of a state array, in flat order, on the host: (padded,)."""
        gathered = self.xp.empty(self.sync.padded, dtype=shard.dtype)
        self.comm.allgather(shard, gathered)  # block r is rank r's shard ...
        gathered = to_numpy(gathered)
        full = np.empty_like(gathered)
        n, bounds = self.comm.size, self.sync.shard_bounds
        width = bounds[0][1] - bounds[0][0]
        for r in range(n):  # ... which is chunk r (MPI) or chunk (r + 1) % n (ring)
            lo, hi = bounds[owned_chunk(r, n, self.sync.allreduce)]
            full[lo:hi] = gathered[r * width:(r + 1) * width]
        return full

    def state_dict(self) -> dict[str, np.ndarray]:
        """``AdamW.state_dict()``'s keys and shapes: ``adamw.m.<name>``, ``adamw.v.<name>``
        (each parameter's local shape) and ``adamw.step``. Collective over dp."""
        with self.comm.tracer.context(phase="other"):
            m, v = self._gather_flat(self.m), self._gather_flat(self.v)
        d: dict[str, np.ndarray] = {}
        for p, o in zip(self.params, self.sync.offsets, strict=True):
            d[f"adamw.m.{p.name}"] = m[o:o + p.size].reshape(p.shape).copy()
            d[f"adamw.v.{p.name}"] = v[o:o + p.size].reshape(p.shape).copy()
        d["adamw.step"] = np.array(self.step_count, dtype=np.int64)
        return d

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        """Restore from full per-parameter state (``AdamW`` format); keep the owned slice.

        The state is loaded into a plain :class:`~mpipar.optim.AdamW` of the same parameters
        (of the masters, with them) first, which checks keys and shapes and holds the full
        moments (2Ψ elements) for the duration of this call. No communication.
        """
        like = self.params if self.master is None else [
            master_copy(p, self.m.dtype) for p in self.params]
        full = AdamW(like, lr=self.lr)
        full.load_state_dict(d)
        for p, p_lo, p_hi, s_lo, s_hi in self.segments:
            for moments, shard in ((full.m, self.m), (full.v, self.v)):
                shard[s_lo:s_hi] = moments[p.name].reshape(-1)[p_lo:p_hi]  # of (p.size,)
        self.step_count = full.step_count

    # -- fp32 masters (mixed precision) ------------------------------------------------------
    def _shard_of(self, masters: list[Parameter]) -> Any:
        """This rank's flat shard of the values of ``masters`` (in their dtype): (padded/dp,)."""
        by_name = {m.name: m for m in masters}
        shard = self.xp.zeros(self.hi - self.lo, dtype=masters[0].dtype)
        for p, p_lo, p_hi, s_lo, s_hi in self.segments:
            shard[s_lo:s_hi] = by_name[p.name].data.reshape(-1)[p_lo:p_hi]
        return shard

    def master_parameters(self) -> list[Parameter]:
        """The whole fp32 masters, gathered over dp (collective), as parameters named and
        placed like the model's: what a checkpoint saves."""
        with self.comm.tracer.context(phase="other"):
            flat = self.xp.asarray(self._gather_flat(self.master))
        out = []
        for p, o in zip(self.params, self.sync.offsets, strict=True):
            m = master_copy(p, flat.dtype)
            m.data[...] = flat[o:o + p.size].reshape(p.shape)
            out.append(m)
        return out

    def load_masters(self, masters: list[Parameter]) -> None:
        """Keep this rank's shard of ``masters`` (whole, on every rank) and round all of them
        into the model's parameters. No communication."""
        self.master[...] = self._shard_of(masters)
        round_into(self.params, masters)

    # -- memory ------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Bytes this rank keeps for optimizer state and gradients, and without ZeRO.

        ``baseline_*`` are what plain AdamW and an unsharded gradient buffer take for the
        same local parameters (Ψ elements): 2Ψ (3Ψ with fp32 masters) and Ψ elements. The
        ratio is ~1/dp (exactly, up to the padding of Ψ to a multiple of dp) for the
        optimizer state with ZeRO-1/2 and for the gradients with ZeRO-2.
        """
        state = [self.m, self.v] + ([] if self.master is None else [self.master])
        return {
            "zero": self.sync.zero,
            "dp": self.comm.size,
            "params": self.sync.numel,
            "param_bytes": int(self.flat_params.nbytes),
            "optimizer_state_bytes": sum(int(a.nbytes) for a in state),
            "grad_bytes": self.sync.grad_bytes(),
            "baseline_optimizer_state_bytes": len(state) * self.sync.numel * self.m.itemsize,
            "baseline_grad_bytes": self.sync.numel * self.dtype.itemsize,
        }


def memory_report(optimizer: Any, grad_sync: DataParallel | None,
                  params: list[Parameter]) -> dict[str, int]:
    """The same report for any optimizer: a ZeRO optimizer's own (`ZeroAdamW`,
    `mpipar.parallel.zero3.Zero3AdamW`), or plain AdamW/SGD's (zero 0).

    For a plain optimizer, optimizer state is the bytes of its state arrays (and of the fp32
    masters under mixed precision) and gradient bytes are the data-parallel flat buffer (or
    one gradient per parameter without dp).
    """
    if isinstance(optimizer, ZeroAdamW | Zero3AdamW):
        return optimizer.memory_report()
    numel = sum(p.size for p in params)
    item = params[0].dtype.itemsize
    state = sum(int(a.nbytes) for a in optimizer.state_dict().values() if a.ndim > 0)
    if isinstance(optimizer, MasterWeights):
        state += optimizer.master_bytes()
    grads = grad_sync.grad_bytes() if grad_sync is not None else numel * item
    return {"zero": 0, "dp": grad_sync.dp if grad_sync is not None else 1, "params": numel,
            "param_bytes": numel * item, "optimizer_state_bytes": state, "grad_bytes": grads,
            "baseline_optimizer_state_bytes": state, "baseline_grad_bytes": grads}


def format_memory_report(r: Mapping[str, int]) -> str:
    """One line for the start of a run: each size, and its ratio to the size without ZeRO."""

    def part(what: str, key: str) -> str:
        now, base = r[f"{key}_bytes"], r[f"baseline_{key}_bytes"]
        return f"{what} {human_bytes(now)} ({now / base:.2f} × {human_bytes(base)})"

    params = ""
    if r["zero"] == 3:
        params = (f"{part('parameters', 'param')[:-1]}; "
                  f"{human_bytes(r['param_buffer_bytes'])} of it gather buffers), ")
    return (f"ZeRO-{r['zero']} over dp {r['dp']}, per rank (× the size without ZeRO): "
            f"{params}{part('optimizer state', 'optimizer_state')}, {part('gradients', 'grad')}")
