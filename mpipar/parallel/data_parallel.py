"""Data parallelism: every rank holds the whole model, computes on 1/dp of the batch, and the
ranks average their gradients so that every replica takes exactly the same step.

Why the average is the right gradient. The loss of a global batch of B sequences is the mean
L = (1/B) Σ_b ℓ_b. Split the batch into dp equal shards S_0 … S_{dp−1} of B/dp sequences; rank
r computes the mean over its shard, L_r = (dp/B) Σ_{b∈S_r} ℓ_b, and its gradient ∇L_r. Then

    (1/dp) Σ_r ∇L_r = (1/dp) Σ_r (dp/B) Σ_{b∈S_r} ∇ℓ_b = (1/B) Σ_b ∇ℓ_b = ∇L,

because differentiation is linear and the shards partition the batch. So an all-reduce (sum)
of the gradients followed by a division by dp gives every rank the big-batch gradient, and
replicas that start identical stay identical.

:class:`DataParallel` wraps the parameters (like PyTorch's ``DistributedDataParallel``) and
offers three ways of doing that all-reduce, which a student can switch between and compare:

* ``per_param``: one all-reduce per parameter (many small messages: latency-bound);
* ``flat``: every gradient lives in one flat buffer and one all-reduce moves it all;
* ``bucketed``: the flat buffer is cut into buckets of about ``bucket_mb`` MiB, in reverse
  parameter order (roughly the order in which backward finishes the gradients). A gradient
  hook counts down each bucket's parameters; when the last one is ready, the bucket's
  non-blocking all-reduce starts while backward continues with earlier layers (*overlap*).

All three share the flat buffer: ``p.grad`` is a view into it, so the autograd engine's
``p.grad += g`` accumulates straight into the memory that is communicated, and gradient
accumulation over microbatches costs no copy and no communication until the last microbatch.

With ZeRO (``zero >= 1``, see :mod:`mpipar.parallel.zero`) the all-reduce becomes a
reduce-scatter: each rank keeps only the averaged gradients of the 1/dp slice of the flat
buffer whose optimizer state it owns.

MPI progress. MPICH advances a non-blocking collective only while the process is inside an MPI
call. Between two gradient hooks the process computes in numpy and the collective sits still.
So every hook also polls the requests in flight (``MPI_Test``), which moves them forward a
step each time; ``progress=False`` turns this off so its effect can be measured
(``bench/bench_data_parallel.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mpipar.backend import array_module
from mpipar.comm import Comm, Request, wait_all
from mpipar.nn import Parameter, unique_parameters
from mpipar.parallel.ring import chunk_bounds, ring_allreduce, ring_reduce_scatter

STRATEGIES = ("per_param", "flat", "bucketed")
ALLREDUCES = ("mpi", "ring")
MIB = 2**20


@dataclass
class Bucket:
    """Gradients reduced by one call: the contiguous range ``[lo, hi)`` of the flat buffer.

    ``params`` are listed in reverse model order, the order backward tends to finish them.
    ``pending`` counts the gradients of this backward pass still to arrive; at zero the bucket
    is ready to be reduced.
    """

    index: int
    lo: int
    hi: int
    params: list[Parameter]
    pending: int = 0
    launched: bool = False
    request: Request | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def assign_buckets(sizes: list[int], cap: float) -> list[list[int]]:
    """Group parameter indices into buckets of at least ``cap`` bytes, last parameter first.

    ``sizes[i]`` is parameter i's gradient size in bytes. Walking from the last parameter to
    the first, a bucket is closed as soon as it holds ``cap`` bytes or more, so every bucket but
    the last (the model's first parameters) is at least ``cap``, and a parameter larger than
    ``cap`` gets a bucket of its own. ``cap = 0`` gives one bucket per parameter, ``cap = inf``
    one bucket for everything. Each bucket lists indices in descending order.
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i in reversed(range(len(sizes))):
        current.append(i)
        filled += sizes[i]
        if filled >= cap:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


class DataParallel:
    """Averages gradients over a data-parallel group; see the module docstring.

    Args:
        params: this rank's parameters (whole tensors or tensor-parallel shards, all of one
            dtype); their ``.grad`` become views into one flat buffer.
        comm: the data-parallel group.
        strategy: ``"per_param"``, ``"flat"`` or ``"bucketed"``.
        bucket_mb: bucket size in MiB for ``"bucketed"``.
        overlap: launch each bucket's non-blocking all-reduce from the gradient hooks, during
            backward; otherwise all buckets are reduced, one blocking call each, in
            :meth:`finish`.
        allreduce: ``"mpi"`` (MPI's ``Allreduce``/``Iallreduce``) or ``"ring"``
            (:func:`~mpipar.parallel.ring.ring_allreduce`, built of blocking ``Sendrecv``, so
            it always runs in :meth:`finish`, bucket after bucket).
        zero: 0 all-reduces; 1 and 2 reduce-scatter instead (each rank keeps its 1/dp shard
            of the averaged gradient in :attr:`grad_shard`: with 1 a view into the flat
            buffer, which stays allocated; with 2 a buffer of its own, and the full flat
            buffer is freed after the reduce-scatter, so only the shard stays between steps).
        progress: poll in-flight requests from every gradient hook (see module docstring).

    Per step: :meth:`zero_grad`; for each microbatch ``set_sync(last)``, forward, backward;
    then :meth:`finish`.
    """

    def __init__(self, params: Iterable[Parameter], comm: Comm, *, strategy: str = "bucketed",
                 bucket_mb: float = 1.0, overlap: bool = True, allreduce: str = "mpi",
                 zero: int = 0, progress: bool = True) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown data-parallel strategy {strategy!r}; "
                             f"expected one of {STRATEGIES}")
        if allreduce not in ALLREDUCES:
            raise ValueError(f"unknown all-reduce {allreduce!r}; expected one of {ALLREDUCES}")
        if zero not in (0, 1, 2):
            raise ValueError(f"zero must be 0, 1 or 2, got {zero}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        self.params = unique_parameters(params)
        if not self.params:
            raise ValueError("DataParallel got no parameters")
        dtypes = {str(p.dtype) for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"DataParallel needs parameters of one dtype, got {sorted(dtypes)}")
        self.comm, self.dp = comm, comm.size
        self.strategy, self.allreduce, self.zero = strategy, allreduce, zero
        self.bucket_mb = float(bucket_mb)
        self.progress = progress
        # Hooks can only start work MPI runs in the background: a non-blocking all-reduce.
        self.overlap = overlap and allreduce == "mpi" and zero == 0
        self.xp = array_module(self.params[0].data)
        self.dtype = self.params[0].dtype

        # Flat layout, in model order: parameter i occupies [offsets[i], offsets[i] + size_i).
        self.offsets: list[int] = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += p.size
        self.numel = total
        # ZeRO cuts the buffer into dp equal shards; zero padding at the end makes it divide.
        self.padded = -(-total // self.dp) * self.dp if zero else total
        self.shard_bounds = chunk_bounds(self.padded, self.dp)
        # The shard a rank owns: block `rank` of MPI's reduce-scatter; the ring's
        # reduce-scatter leaves rank r holding chunk (r + 1) % n instead (see ring.py).
        self.owned_chunk = (comm.rank + 1) % self.dp if allreduce == "ring" else comm.rank
        self.shard_lo, self.shard_hi = self.shard_bounds[self.owned_chunk]

        self.buckets = self._make_buckets()
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._inflight: list[Bucket] = []
        self._sync = True
        self._grads = None  # the flat gradient buffer, (padded,)
        self._views: list = []
        # ZeRO: the averaged gradient of the owned shard, (padded / dp,). ZeRO-1 keeps the
        # flat buffer anyway, so the shard is a view into it; ZeRO-2 gives it its own memory.
        self.grad_shard = None
        if zero == 2:
            self.grad_shard = self.xp.zeros(self.shard_hi - self.shard_lo, dtype=self.dtype)

        self.broadcast_parameters()
        if self.overlap:
            for p in self.params:
                p.register_grad_hook(self._on_grad_ready)
        self.zero_grad()

    @property
    def grad_replicas(self) -> int:
        """How many ranks of the group hold each averaged gradient element after `finish`.

        dp when gradients are all-reduced (every replica holds all of them), 1 when ZeRO
        reduce-scatters them (each element lives in one rank's shard). A sum over the group
        of per-rank Σg² divided by this counts every element once.
        """
        return 1 if self.zero else self.dp

    # -- set-up ------------------------------------------------------------------------------
    def _make_buckets(self) -> list[Bucket]:
        cap = {"per_param": 0.0, "flat": float("inf"),
               "bucketed": self.bucket_mb * MIB}[self.strategy]
        itemsize = self.dtype.itemsize
        groups = assign_buckets([p.size * itemsize for p in self.params], cap)
        buckets = []
        for k, idx in enumerate(groups):
            lo = self.offsets[idx[-1]]  # the group's first parameter in model order
            hi = self.offsets[idx[0]] + self.params[idx[0]].size
            if idx[0] == len(self.params) - 1:
                hi = self.padded  # the bucket holding the last parameter carries the padding
            buckets.append(Bucket(k, lo, hi, [self.params[i] for i in idx]))
        return buckets

    def broadcast_parameters(self) -> None:
        """Make every replica start from dp rank 0's values (one flat broadcast).

        Every layout initialises parameters from the seed, so this changes nothing when all is
        well; it guarantees the replicas agree even if some rank's parameters were changed.
        """
        flat = self.xp.empty(self.numel, dtype=self.dtype)  # (Ψ,) staging buffer
        for p, o in zip(self.params, self.offsets, strict=True):
            flat[o:o + p.size] = p.data.reshape(-1)
        with self.comm.tracer.context(phase="other"):
            self.comm.broadcast(flat, root=0)
        for p, o in zip(self.params, self.offsets, strict=True):
            p.data[...] = flat[o:o + p.size].reshape(p.shape)

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

    # -- the step ----------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the flat gradient buffer in place and point every ``p.grad`` into it."""
        if self._inflight:
            raise RuntimeError("zero_grad() while gradient all-reduces are in flight; "
                               "call finish() first")
        if self._grads is None:  # first step, or ZeRO-2 freed it after the last one
            self._grads = self.xp.zeros(self.padded, dtype=self.dtype)
            self._views = [self._grads[o:o + p.size].reshape(p.shape)
                           for p, o in zip(self.params, self.offsets, strict=True)]
            if self.zero == 1:
                self.grad_shard = self._grads[self.shard_lo:self.shard_hi]
        else:
            self._grads.fill(0)
        for p, view in zip(self.params, self._views, strict=True):
            p.grad = view  # the engine accumulates into it: p.grad += g
        self._sync = True
        self._reset_buckets()

    def _reset_buckets(self) -> None:
        for b in self.buckets:
            b.pending, b.launched, b.request = len(b.params), False, None

    def set_sync(self, enabled: bool) -> None:
        """Whether the next backward pass should communicate (False: only accumulate).

        With M microbatches the training loop calls ``set_sync(k == M - 1)``: gradients of the
        first M − 1 just add up in the flat buffer, and buckets are launched during the last
        backward pass. A pipeline keeps it False for its whole schedule and lets
        :meth:`finish` launch everything.
        """
        self._sync = enabled
        if enabled:
            for b in self.buckets:
                if not b.launched:
                    b.pending = len(b.params)

    def _on_grad_ready(self, p: Parameter) -> None:
        """Gradient hook: ``p``'s gradient for this backward pass is final."""
        b = self._bucket_of[id(p)]
        if b.launched:
            raise RuntimeError(
                f"gradient of {p.name!r} changed after its bucket was launched: with gradient "
                "accumulation call set_sync(False) for all but the last microbatch")
        if self._sync:
            b.pending -= 1
            if b.pending == 0:
                self._launch(b)
        if self.progress:
            self.poll()

    def _launch(self, b: Bucket) -> None:
        b.request = self.comm.iallreduce(self._grads[b.lo:b.hi])
        b.launched = True
        self._inflight.append(b)

    def poll(self) -> None:
        """Give MPI a chance to advance the all-reduces in flight (never blocks)."""
        for b in self._inflight:
            if not b.request.done:
                b.request.test()

    def finish(self) -> None:
        """Complete the step's gradient communication; gradients end averaged (∑/dp).

        Without ZeRO every ``p.grad`` holds the dp average. With ZeRO :attr:`grad_shard`
        holds the average over the owned shard.
        """
        if self._grads is None:
            raise RuntimeError("finish() without gradients: call zero_grad() before backward")
        scale = 1.0 / self.dp
        if self.zero:
            self._reduce_scatter()
            self.grad_shard *= scale
            if self.zero == 2:  # only the owned shard survives until the next zero_grad()
                self._grads, self._views = None, []
                for p in self.params:
                    p.grad = None
            return
        for b in self.buckets:
            if b.launched:
                continue
            view = self._grads[b.lo:b.hi]  # (numel of the bucket,), contiguous
            if self.allreduce == "ring":
                ring_allreduce(self.comm, view)
            elif self.overlap:  # e.g. a pipeline kept sync off: start them all, wait below
                self._launch(b)
            else:
                self.comm.allreduce(view)
            b.launched = True
        wait_all([b.request for b in self._inflight])
        self._inflight.clear()
        self._grads *= scale

    def _reduce_scatter(self) -> None:
        """ZeRO: sum the flat buffer over dp, keeping only the owned shard of the sum.

        The ring reduces in place, leaving the sum in the owned slice of the flat buffer.
        MPI's reduce-scatter needs a receive buffer apart from the send buffer: ZeRO-2's
        shard, or for ZeRO-1 a temporary copied back into the owned slice.
        """
        n = self.shard_hi - self.shard_lo
        if self.allreduce == "ring":
            tmp = self.xp.empty(n, dtype=self.dtype)  # one chunk, the receive buffer
            done = ring_reduce_scatter(self.comm, self._grads, self.shard_bounds, tmp)
            assert done == self.owned_chunk
            if self.zero == 2:  # keep a copy: the flat buffer is about to be freed
                self.grad_shard[...] = self._grads[self.shard_lo:self.shard_hi]
        elif self.zero == 2:
            self.comm.reduce_scatter(self._grads, self.grad_shard)
        else:
            tmp = self.xp.empty(n, dtype=self.dtype)
            self.comm.reduce_scatter(self._grads, tmp)
            self.grad_shard[...] = tmp  # the owned slice of the flat buffer

    # -- bookkeeping -------------------------------------------------------------------------
    def grad_bytes(self) -> int:
        """Bytes of gradient storage this rank keeps between steps.

        zero 0 and 1: the flat buffer (ZeRO-1's shard is a slice of it). zero 2: the shard
        only; the full buffer exists only between :meth:`zero_grad` and :meth:`finish`.
        """
        item = self.dtype.itemsize
        if self.zero == 2:
            return (self.shard_hi - self.shard_lo) * item
        return self.padded * item
