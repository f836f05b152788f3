"""Data parallelism: every rank holds the whole model, computes on 1/dp of the batch, and the
ranks average their gradients so that every replica takes exactly the same step.

Why the average is the right gradient. The loss of a global batch of B sequences is the mean
L = (1/B) Σ_b ℓ_b. Split the batch into dp equal shards S_0 … S_{dp−1} of B/dp sequences; rank
r computes the mean over its shard, L_r = (dp/B) Σ_{b∈S_r} ℓ_b, and its gradient ∇L_r. Then

    (1/dp) Σ_r ∇L_r = (1/dp) Σ_r (dp/B) Σ_{b∈S_r} ∇ℓ_b = (1/B) Σ_b ∇ℓ_b = ∇L,

because differentiation is linear and the shards partition the batch. So an all-reduce (sum)
of the gradients followed by a division by dp gives every rank the big-batch gradient, and
replicas that start identical stay identical. :func:`allreduce_gradients` is exactly that, one
all-reduce per parameter after backward.

:class:`DataParallel` wraps the parameters (like PyTorch's ``DistributedDataParallel``) and
computes the same average with fewer, larger messages. It offers three ways of doing the
all-reduce, which a student can switch between and compare:

* ``per_param``: one all-reduce per parameter (many small messages: latency-bound);
* ``flat``: every gradient lives in one flat buffer and one all-reduce moves it all;
* ``bucketed``: the flat buffer is cut into buckets of about ``bucket_mb`` MiB, in reverse
  parameter order (roughly the order in which backward finishes the gradients). A gradient
  hook counts down each bucket's parameters; when the last one is ready, the bucket's
  non-blocking all-reduce starts while backward continues with earlier layers (*overlap*).

All three share the flat buffer: ``p.grad`` is a view into it, so the autograd engine's
``p.grad += g`` accumulates straight into the memory that is communicated, and gradient
accumulation over microbatches costs no copy and no communication until the last microbatch.

ZeRO (:mod:`mpipar.parallel.zero`) builds on this class: its ``ZeroGradients`` keeps the flat
buffer and replaces the all-reduce by a reduce-scatter, so each rank keeps only the averaged
gradients of the 1/dp slice whose optimizer state it owns.

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
from mpipar.parallel.ring import ring_allreduce

STRATEGIES = ("per_param", "flat", "bucketed")
ALLREDUCES = ("mpi", "ring")
MIB = 2**20


def allreduce_gradients(params: Iterable[Parameter], comm: Comm) -> None:
    """Average every ``p.grad`` over the ranks of ``comm``: data parallelism at its simplest.

    One blocking all-reduce (a sum over the dp ranks) per parameter, then a division by dp, so
    that every rank ends with (1/dp) Σ_r ∇L_r = ∇L. :class:`DataParallel` computes the same
    average from a flat buffer, in buckets, during backward.
    """
    scale = 1.0 / comm.size
    for p in params:
        comm.allreduce(p.grad)  # in place: Σ over ranks
        p.grad *= scale


# ---------------------------------------------------------------------------------------------
# Buckets
# ---------------------------------------------------------------------------------------------
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


def check_options(strategy: str, allreduce: str, bucket_mb: float) -> None:
    """Refuse unknown strategies and all-reduces, and a bucket size that is not positive."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown data-parallel strategy {strategy!r}; "
                         f"expected one of {STRATEGIES}")
    if allreduce not in ALLREDUCES:
        raise ValueError(f"unknown all-reduce {allreduce!r}; expected one of {ALLREDUCES}")
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")


def flat_parameters(params: Iterable[Parameter]) -> list[Parameter]:
    """The distinct parameters in model order; they must exist and share one dtype."""
    params = unique_parameters(params)
    if not params:
        raise ValueError("DataParallel got no parameters")
    dtypes = {str(p.dtype) for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"DataParallel needs parameters of one dtype, got {sorted(dtypes)}")
    return params


# ---------------------------------------------------------------------------------------------
# DataParallel
# ---------------------------------------------------------------------------------------------
class DataParallel:
    """Averages gradients over a data-parallel group by all-reduce; see the module docstring.

    Args:
        params: this rank's parameters (whole tensors or tensor-parallel shards, all of one
            dtype); their ``.grad`` become views into one flat buffer, :attr:`flat_grads`.
        comm: the data-parallel group.
        strategy: ``"per_param"``, ``"flat"`` or ``"bucketed"``.
        bucket_mb: bucket size in MiB for ``"bucketed"``.
        overlap: launch each bucket's non-blocking all-reduce from the gradient hooks, during
            backward; otherwise all buckets are reduced, one blocking call each, in
            :meth:`finish`.
        allreduce: ``"mpi"`` (MPI's ``Allreduce``/``Iallreduce``) or ``"ring"``
            (:func:`~mpipar.parallel.ring.ring_allreduce`, built of blocking ``Sendrecv``, so
            it always runs in :meth:`finish`, bucket after bucket).
        progress: poll in-flight requests from every gradient hook (see module docstring).

    Per step: :meth:`zero_grad`; for each microbatch ``set_sync(last)``, forward, backward;
    then :meth:`finish`.
    """

    zero = 0  # the ZeRO stage: gradients are replicated, not sharded

    def __init__(self, params: Iterable[Parameter], comm: Comm, *, strategy: str = "bucketed",
                 bucket_mb: float = 1.0, overlap: bool = True, allreduce: str = "mpi",
                 progress: bool = True) -> None:
        check_options(strategy, allreduce, bucket_mb)
        self.params = flat_parameters(params)
        self.comm, self.dp = comm, comm.size
        self.strategy, self.allreduce = strategy, allreduce
        self.bucket_mb = float(bucket_mb)
        self.progress = progress
        # Hooks can only start work MPI runs in the background: a non-blocking all-reduce.
        self.overlap = overlap and allreduce == "mpi"
        self.xp = array_module(self.params[0].data)
        self.dtype = self.params[0].dtype
        self.lay_out()

        self.buckets = self._make_buckets()
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._inflight: list[Bucket] = []
        self._sync = True
        self.allocate_grads()

        self.broadcast_parameters()
        if self.overlap:
            for p in self.params:
                p.register_grad_hook(self._on_grad_ready)
        self.zero_grad()

    @property
    def grad_replicas(self) -> int:
        """How many ranks of the group hold each averaged gradient element after `finish`.

        dp: every replica holds all of them. A sum over the group of per-rank Σg² divided by
        this counts every element once.
        """
        return self.dp

    # -- set-up ------------------------------------------------------------------------------
    def lay_out(self) -> None:
        """The flat layout, in model order: parameter i occupies [offsets[i], offsets[i] + size_i).

        ``numel`` is Ψ, the number of elements of all parameters; ``padded`` the length of the
        flat buffer (Ψ here; ZeRO pads it to a multiple of dp).
        """
        self.offsets: list[int] = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += p.size
        self.numel = self.padded = total

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
                hi = self.padded  # the bucket holding the last parameter carries any padding
            buckets.append(Bucket(k, lo, hi, [self.params[i] for i in idx]))
        return buckets

    def allocate_grads(self) -> None:
        """Allocate the flat gradient buffer, (padded,), and each parameter's view into it."""
        self.flat_grads = self.xp.empty(self.padded, dtype=self.dtype)
        self._views = [self.flat_grads[o:o + p.size].reshape(p.shape)
                       for p, o in zip(self.params, self.offsets, strict=True)]

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

    # -- the step ----------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the flat gradient buffer in place and point every ``p.grad`` into it."""
        if self._inflight:
            raise RuntimeError("zero_grad() while gradient all-reduces are in flight; "
                               "call finish() first")
        self.flat_grads.fill(0)
        for p, view in zip(self.params, self._views, strict=True):
            p.grad = view  # the engine accumulates into it: p.grad += g
        self._sync = True
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
        b.request = self.comm.iallreduce(self.flat_grads[b.lo:b.hi])
        b.launched = True
        self._inflight.append(b)

    def poll(self) -> None:
        """Give MPI a chance to advance the all-reduces in flight (never blocks)."""
        for b in self._inflight:
            if not b.request.done:
                b.request.test()

    def finish(self) -> None:
        """Complete the step's all-reduces; every ``p.grad`` ends holding the dp average."""
        for b in self.buckets:
            if b.launched:
                continue
            view = self.flat_grads[b.lo:b.hi]  # (numel of the bucket,), contiguous
            if self.allreduce == "ring":
                ring_allreduce(self.comm, view)
            elif self.overlap:  # e.g. a pipeline kept sync off: start them all, wait below
                self._launch(b)
            else:
                self.comm.allreduce(view)
            b.launched = True
        wait_all([b.request for b in self._inflight])
        self._inflight.clear()
        self.flat_grads *= 1.0 / self.dp

    # -- bookkeeping -------------------------------------------------------------------------
    def grad_bytes(self) -> int:
        """Bytes of gradient storage this rank keeps between steps: the flat buffer."""
        return self.padded * self.dtype.itemsize
