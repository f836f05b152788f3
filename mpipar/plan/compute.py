"""Compute, the pipeline bubble, and the predicted step: time, tokens/s, MFU, energy.

FLOPs. A token costs 6·Ψ_matmul + 6·L·s·h training FLOPs (`mpipar.model.flops_per_token`,
Kaplan et al. 2020's 6N plus attention), full recomputation adds its forward again
(`mpipar.activations.recompute_flops_per_token`). For one iteration of B sequences this is
Narayanan et al. (2021)'s count, F = 96·B·s·L·h²·(1 + s/(6h) + V/(16·L·h)) with recomputation
(`megatron_flops`) but for causal attention, which mpipar counts at half (QKᵀ and PV over
the s(s + 1)/2 pairs a causal mask keeps, 8·B·s²·L·h fewer FLOPs): the tests check that
difference exactly.

Time of one rank. Its matrix FLOPs run at the cluster's sustained ``gemm_flops``; the rest of
the work costs ``overhead_s_per_token`` per token, block and unit of width; the optimizer
``optimizer_s_per_param`` per parameter it updates (1/dp of them under ZeRO); with more than
one device the compute runs at the cluster's ``concurrent_fraction`` of that rate. A pipeline runs
m microbatches through p stages, so the step stretches by the bubble: compute/(1 − bubble),
bubble = (p − 1)/(m + p − 1) for GPipe and 1F1B, (p − 1)/(v·m + p − 1) interleaved,
(p − 1)/p for the naive schedule, (p − 1)/(3m + p − 1) for ZB-H1 (its (p − 1)(F + B − W) with
F = B = W: a block's forward, input-gradient and weight-gradient GEMMs are 24h² FLOPs per
token each) (`mpipar.parallel.pipeline.checker.theoretical_bubble`).
Communication is added as it is traced, none of it assumed hidden behind compute: each call's
α–β time on the link its group uses (`cluster.group_link`).

Model FLOPs utilisation MFU = (6·Ψ_matmul + 6Lsh)·tokens/s / (devices · peak) (Chowdhery et
al. 2022), recomputation not counted. Energy per token = devices · power · step / tokens: an
estimate, from the stated power, not a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mpipar.activations import recompute_flops_per_token
from mpipar.parallel.pipeline.checker import theoretical_bubble
from mpipar.plan.cluster import Cluster, group_link
from mpipar.plan.comm import comm_time, rank_calls
from mpipar.plan.layout import Layout
from mpipar.plan.memory import rank_parameters, stage_chunks
from mpipar.plan.model_shape import ModelShape


@dataclass(frozen=True)
class StepEstimate:
    """The predicted step of the slowest rank, its parts in seconds."""

    compute_s: float  # matrix products and the rest, of all microbatches
    optimizer_s: float
    bubble: float  # idle share of the pipeline, 0 without one
    comm_s: dict[str, float]  # per group
    step_s: float
    tokens_per_s: float
    mfu: float
    joules_per_token: float  # an estimate from the stated power

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def flops_per_step(shape: ModelShape, layout: Layout) -> int:
    """Training FLOPs of one step of the whole model: (6Ψ_matmul + 6Lsh + recompute)·B·s."""
    cfg = shape.config()
    per_token = shape.flops_per_token() + recompute_flops_per_token(cfg, layout.recompute)
    return per_token * layout.batch_size * shape.seq_len


def megatron_flops(shape: ModelShape, batch: int) -> int:
    """Narayanan et al. 2021, eq. (3): F = 96·B·s·L·h²·(1 + s/(6h) + V/(16·L·h)), with full
    recomputation (four passes of the blocks), in integers: 96BsLh² + 16BLs²h + 6BsVh."""
    s, h, n, v = shape.seq_len, shape.d_model, shape.n_layer, shape.vocab_size
    return 96 * batch * s * n * h * h + 16 * batch * n * s * s * h + 6 * batch * s * v * h


def rank_flops(shape: ModelShape, layout: Layout, pp_rank: int) -> tuple[float, int]:
    """(matrix FLOPs per step, blocks) of one rank: its blocks and, last stage, the head."""
    h, s, t = shape.d_model, shape.seq_len, layout.tp
    chunks = stage_chunks(shape, layout, pp_rank)
    blocks, post = sum(c[0] for c in chunks), any(c[2] for c in chunks)
    block = 72 * h * h + 6 * s * h  # 6·12h² + 6sh per token
    again = {"none": 0, "selective": s * h, "full": 24 * h * h + 2 * s * h}[layout.recompute]
    tokens = layout.batch_size * s / layout.grad_replicas
    per_token = blocks * (block + again) / t + post * 6 * shape.vocab_size * h / t
    return tokens * per_token, blocks


def bubble_fraction(layout: Layout) -> float:
    """The idle share of a pipelined step (module docstring); 0 when pp = 1."""
    if layout.pp == 1:
        return 0.0
    return theoretical_bubble(layout.schedule, layout.pp, layout.microbatches,
                              layout.virtual_stages)


def rank_time(shape: ModelShape, layout: Layout, cluster: Cluster,
              pp_rank: int) -> tuple[float, float, dict[str, float]]:
    """(compute, optimizer, communication per group) seconds of one rank's step."""
    flops, blocks = rank_flops(shape, layout, pp_rank)
    tokens = layout.batch_size * shape.seq_len / layout.grad_replicas
    compute = flops / cluster.gemm_flops \
        + cluster.overhead_s_per_token * tokens * blocks * shape.d_model / layout.tp
    if layout.world > 1:  # every device of the node busy at once
        compute /= cluster.concurrent_fraction
    updated = rank_parameters(shape, layout, pp_rank) / (layout.grad_replicas if layout.zero
                                                         else 1)
    comm: dict[str, float] = {}
    for c in rank_calls(shape, layout, pp_rank):
        link, size, _ = group_link(cluster, layout, c.group)
        comm[c.group] = comm.get(c.group, 0.0) + comm_time(c.nbytes, link, c.op, size, c.calls)
    return compute, cluster.optimizer_s_per_param * updated, comm


def step_estimate(shape: ModelShape, layout: Layout, cluster: Cluster) -> StepEstimate:
    """The predicted step: the slowest pipeline rank's compute stretched by the bubble, plus
    its optimizer and its communication."""
    bubble = bubble_fraction(layout)
    best = None
    for r in range(layout.pp):
        compute, opt, comm = rank_time(shape, layout, cluster, r)
        total = compute / (1 - bubble) + opt + sum(comm.values())
        if best is None or total > best[0]:
            best = (total, compute, opt, comm)
    step, compute, opt, comm = best
    tokens = layout.batch_size * shape.seq_len
    model_flops = shape.flops_per_token() * tokens
    world = layout.world
    return StepEstimate(compute, opt, bubble, comm, step, tokens / step,
                        model_flops / step / (world * cluster.peak_flops),
                        world * cluster.power_w * step / tokens)


__all__ = ["StepEstimate", "bubble_fraction", "flops_per_step", "megatron_flops",
           "rank_flops", "rank_time", "step_estimate"]
