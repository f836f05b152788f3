"""Communication per step: the calls each group makes, their bytes, and their time.

Bytes are counted as mpipar's trace counts them (docs/design.md §6): per call, the buffer the
rank hands over (a reduce-scatter its whole input, an all-gather its shard, a ZeRO-3 in-place
all-gather the whole unit, a `sendrecv` the half it sends). With b = B/(dp·m) sequences per
microbatch, s tokens, width h, e bytes per element, L_r blocks on the rank and A = b·s·h·e:

* **tp**, per microbatch (Shoeybi et al. 2019): forward, g after each attention and MLP
  (2L_r all-reduces of A) and the vocab-parallel embedding's sum; backward, f before each
  (2L_r) and before the head; the cross-entropy's max and (sum, target) over the vocabulary,
  3·b·s floats. Sequence parallel (Korthikanti et al. 2022) turns each g into a reduce-scatter
  (A) and each f into an all-gather (A/t), gathers the input again in backward for the weight
  gradient, and sums the replicated parameters' gradients (6h per block, 2h for ln_f) once
  per step. Full recomputation repeats the forward's calls in backward.
* **dp**, per step: the gradient all-reduce (Ψ_r e), or the ring's 2(dp − 1) sendrecvs, or
  ZeRO-1/2's reduce-scatter (Pe) and all-gather (Pe/dp); ZeRO-3 gathers every block twice per
  microbatch, reduce-scatters it once, and the rest once per step each way.
* **pp**: one message of b·s·h·e (s/t under sequence parallelism) per point-to-point
  instruction of the rank's schedule, a SendRecv counted once.
* **cp** (context parallelism, `--cp C`), per microbatch and block: ring attention's
  2(C − 1) messages forward and 4C − 2 backward (2(C − 1) more with full recomputation),
  each a K, V, dK or dV block of b·(s/C)·(h/t)·e, traced as an isend and an irecv. Under cp
  every group above sees s/C positions, and the gradient group is dp × cp (``dpcp``).
* **embed**: the tied embedding's gradient, ⌈V/t⌉·h·e, on the first and the last stage.
* **world**: the gradient norm (8 bytes), and fp16's overflow flag (4 bytes).

Time follows the α–β model: a message of n bytes over a link of latency α and bandwidth β
takes α + n/β; a collective over g ranks is timed as its ring algorithm's steps, an
all-reduce 2(g − 1)(α + n/(gβ)), a reduce-scatter of n (or all-gather of a shard of n/g)
(g − 1)(α + n/(gβ)).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace

from mpipar.parallel.pipeline.instructions import PointToPoint, SendRecv
from mpipar.parallel.ring import chunk_bounds
from mpipar.plan.layout import Layout
from mpipar.plan.memory import (
    block_parameters,
    rank_parameters,
    rank_program,
    rest_parameters,
    stage_chunks,
)
from mpipar.plan.model_shape import ModelShape

GROUPS = ("dp", "tp", "pp", "embed", "world", "cp", "dpcp")


@dataclass(frozen=True)
class Calls:
    """``calls`` calls of one kind on one rank per step, ``nbytes`` in all (as traced)."""

    group: str
    op: str  # allreduce, reduce_scatter, allgather, p2p, sendrecv (the ring's steps)
    calls: int
    nbytes: int


@dataclass(frozen=True)
class Link:
    """A link's latency α (seconds) and bandwidth β (bytes per second)."""

    alpha: float
    beta: float


def tp_calls(shape: ModelShape, layout: Layout, pp_rank: int) -> list[Calls]:
    """One rank's tensor-parallel calls per step (module docstring)."""
    t, m = layout.tp, layout.microbatches
    if t == 1:
        return []
    chunks = stage_chunks(shape, layout, pp_rank)
    n = sum(c[0] for c in chunks)
    pre, post = any(c[1] for c in chunks), any(c[2] for c in chunks)
    s = shape.seq_len // layout.cp
    act = layout.micro_batch * s * shape.d_model * layout.item
    again = 2 * n if layout.recompute == "full" else 0  # the forward's calls, repeated
    ce = Calls("tp", "allreduce", 2 * m * post, 3 * m * post * layout.micro_batch
               * s * max(4, layout.item))
    if not layout.sequence_parallel:
        k = m * (4 * n + pre + post + again)
        return [Calls("tp", "allreduce", k, k * act), ce]
    gathers = m * (2 * n + post + 4 * n + pre + again)
    scatters = m * (2 * n + 2 * n + post + again)
    replicated = (6 * shape.d_model * n + 2 * shape.d_model * post) * layout.item
    return [Calls("tp", "allreduce", m * pre + 1, m * pre * act + replicated),
            Calls("tp", "allgather", gathers, gathers * (act // t)),
            Calls("tp", "reduce_scatter", scatters, scatters * act), ce]


def ring_bytes(numel: int, d: int, dp_rank: int, item: int) -> int:
    """Bytes rank ``dp_rank`` sends in the ring all-reduce: every chunk but r+1 in the
    reduce-scatter, every chunk but r+2 in the all-gather (`mpipar.parallel.ring`)."""
    sizes = [hi - lo for lo, hi in chunk_bounds(numel, d)]
    return (2 * numel - sizes[(dp_rank + 1) % d] - sizes[(dp_rank + 2) % d]) * item


def dp_calls(shape: ModelShape, layout: Layout, pp_rank: int, dp_rank: int = 0) -> list[Calls]:
    """One rank's data-parallel calls per step (module docstring); ``dp_rank`` is the rank's
    place in the gradient group (dp × cp ranks, traced as ``dpcp``, under --cp)."""
    d, e, z = layout.grad_replicas, layout.item, layout.zero
    if d == 1:
        return []
    if layout.cp > 1:
        return [Calls("dpcp", c.op, c.calls, c.nbytes) for c in
                dp_calls(shape, _as_dp(layout), pp_rank, dp_rank)]
    psi = rank_parameters(shape, layout, pp_rank)
    padded = -(-psi // d) * d
    if z == 3:
        blocks = sum(c[0] for c in stage_chunks(shape, layout, pp_rank))
        unit = -(-block_parameters(shape, layout.tp) // d) * d * e
        rest = -(-rest_parameters(shape, layout, pp_rank) // d) * d * e
        m = layout.microbatches
        return [Calls("dp", "allgather", 2 * m * blocks + 1, 2 * m * blocks * unit + rest),
                Calls("dp", "reduce_scatter", m * blocks + 1, m * blocks * unit + rest)]
    if layout.allreduce == "ring":
        numel = psi if z == 0 else padded
        return [Calls("dp", "sendrecv", 2 * (d - 1), ring_bytes(numel, d, dp_rank, e))]
    if z == 0:  # one call per bucket of about 1 MiB (`--bucket-mb`)
        return [Calls("dp", "allreduce", max(1, psi * e >> 20), psi * e)]
    return [Calls("dp", "reduce_scatter", 1, padded * e),
            Calls("dp", "allgather", 1, padded // d * e)]


def pp_calls(shape: ModelShape, layout: Layout, pp_rank: int) -> list[Calls]:
    """One rank's pipeline messages per step, and the tied embedding's gradient sum."""
    if layout.pp == 1:
        return []
    s = shape.seq_len // (layout.tp if layout.sequence_parallel else 1) // layout.cp
    msg = layout.micro_batch * s * shape.d_model * layout.item
    program = rank_program(layout, pp_rank)
    k = sum(isinstance(i, PointToPoint | SendRecv) for i in program)
    out = [Calls("pp", "p2p", k, k * msg)]
    chunks = stage_chunks(shape, layout, pp_rank)
    if any(c[1] or c[2] for c in chunks):
        wte = math.ceil(shape.vocab_size / layout.tp) * shape.d_model * layout.item
        out.append(Calls("embed", "allreduce", 1, wte))
    return out


def _as_dp(layout: Layout) -> Layout:
    """The same layout with its dp × cp gradient group seen as dp alone (for `dp_calls`)."""
    return replace(layout, dp=layout.grad_replicas, cp=1,
                   batch_size=layout.batch_size * layout.cp)


def cp_calls(shape: ModelShape, layout: Layout, pp_rank: int) -> list[Calls]:
    """One rank's ring-attention messages per step (module docstring), isend and irecv."""
    c = layout.cp
    if c == 1:
        return []
    blocks = sum(ch[0] for ch in stage_chunks(shape, layout, pp_rank))
    forward = 2 * (c - 1) * (2 if layout.recompute == "full" else 1)
    k = 2 * layout.microbatches * blocks * (forward + 4 * c - 2)  # ×2: isend and irecv
    msg = layout.micro_batch * (shape.seq_len // c) * (shape.d_model // layout.tp) \
        * layout.item
    return [Calls("cp", "p2p", k, k * msg)]


def rank_calls(shape: ModelShape, layout: Layout, pp_rank: int = 0,
               dp_rank: int = 0) -> list[Calls]:
    """Every call one rank makes in a training step (forward, backward, optimizer)."""
    calls = tp_calls(shape, layout, pp_rank) + dp_calls(shape, layout, pp_rank, dp_rank) \
        + pp_calls(shape, layout, pp_rank) + cp_calls(shape, layout, pp_rank)
    if layout.world > 1:
        flag = layout.precision == "fp16"
        calls.append(Calls("world", "allreduce", 1 + flag, 8 + 4 * flag))
    return [c for c in calls if c.calls]


def comm_bytes_per_step(shape: ModelShape, layout: Layout) -> dict[str, int]:
    """Bytes per step per group, summed over every rank, as the trace sums them."""
    total: dict[str, int] = defaultdict(int)
    for pp_rank in range(layout.pp):
        for dp_rank in range(layout.grad_replicas):  # each rank of the gradient group
            for c in rank_calls(shape, layout, pp_rank, dp_rank):
                total[c.group] += c.nbytes * layout.tp
    return {g: total[g] for g in GROUPS if total[g]}


def comm_time(nbytes: float, link: Link, op: str = "p2p", group_size: int = 2,
              calls: int = 1) -> float:
    """Seconds for ``calls`` calls moving ``nbytes`` (as traced) over ``link`` (α–β)."""
    g = group_size
    if op in ("p2p", "sendrecv"):  # the ring's sendrecvs: bytes already per rank
        return calls * link.alpha + nbytes / link.beta
    if op == "allreduce":
        return 2 * (g - 1) * (calls * link.alpha + nbytes / (g * link.beta))
    if op == "reduce_scatter":
        return (g - 1) * (calls * link.alpha + nbytes / (g * link.beta))
    if op == "allgather":  # the traced bytes are the shard: n/g of the whole
        return (g - 1) * (calls * link.alpha + nbytes / link.beta)
    raise ValueError(f"unknown op {op!r}")


__all__ = ["Calls", "GROUPS", "Link", "comm_bytes_per_step", "comm_time", "cp_calls", "dp_calls",
           "pp_calls", "rank_calls", "ring_bytes", "tp_calls"]
