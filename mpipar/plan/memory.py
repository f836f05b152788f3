"""Memory per device: parameters, gradients, optimizer state and activations, in bytes.

The parameter, gradient and optimizer-state bytes are those mpipar allocates, so that they
equal `mpipar.parallel.zero.memory_report` byte for byte. A rank of a dp × tp × pp layout holds
Ψ_r parameters: its blocks, 12h²/t + 7h/t + 6h each (the qkv and fc weights and biases and the
proj weights split over tp; the LayerNorms and the proj biases whole), the embedding table's
⌈V/t⌉ rows (padded; first and last pipeline stage, tied) and the positions s·h (first stage)
and ln_f, 2h (last stage). With e bytes per element (the compute precision), AdamW and dp ranks:

    ZeRO-0:  Ψe + Ψe + 2Ψe'                    (+ 4Ψ fp32 masters under fp16/bf16)
    ZeRO-1:  Pe + Pe + (2 + masters)·(P/dp)e'  (P: Ψ padded to a multiple of dp)
    ZeRO-2:  Pe + (P/dp)e + (2 + masters)·(P/dp)e'
    ZeRO-3:  each block and the rest padded apart, 1/dp of each; plus two blocks' and the
             rest's gather buffers (`mpipar.parallel.zero3`)

where e' = 4 under 16-bit compute (fp32 state) and e otherwise. For GPT-3 175B in bf16 with
ZeRO-0 that is 2Ψ + 2Ψ + 12Ψ = 16Ψ = 2.8 TB, the number of the ZeRO paper (Rajbhandari et al.
2020, §3.1: K = 12).

Activations: each block keeps `mpipar.activations.formula_bytes` for every microbatch in
flight (counted from the schedule itself, `in_flight_layers`), a pipeline stage its received
input too, and the last stage its head (ln_f, the head's input and the fp32 softmax of the
loss).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

from mpipar.activations import formula_bytes, korthikanti_bytes
from mpipar.parallel.pipeline.instructions import Backward, BackwardWeight, Forward
from mpipar.parallel.pipeline.schedules import build_schedule
from mpipar.parallel.ring import chunk_bounds
from mpipar.plan.layout import Layout
from mpipar.plan.model_shape import ModelShape


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds; ``peak`` adds them up, with what exists only inside a step."""

    rank: int  # the pipeline rank this is for (the fullest one, by default)
    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int  # ZeRO-2's whole gradient buffer during backward
    peak: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def parameter_count(shape: ModelShape) -> int:
    """Ψ of the 1-process model: Vh + sh + L(12h² + 13h) + 2h (tied head)."""
    h = shape.d_model
    return shape.vocab_size * h + shape.seq_len * h + shape.n_layer * (12 * h * h + 13 * h) + 2 * h


def block_parameters(shape: ModelShape, tp: int = 1) -> int:
    """Parameters of one block on one tp rank: 12h²/t + 7h/t + 6h."""
    h = shape.d_model
    return (12 * h * h + 7 * h) // tp + 6 * h


def stage_chunks(shape: ModelShape, layout: Layout, pp_rank: int) -> list[tuple[int, bool, bool]]:
    """(blocks, first stage?, last stage?) of each model chunk on ``pp_rank``."""
    p, v = layout.pp, layout.virtual_stages
    bounds = chunk_bounds(shape.n_layer, p * v)
    out = []
    for c in range(v):
        s = c * p + pp_rank
        out.append((bounds[s][1] - bounds[s][0], s == 0, s == p * v - 1))
    return out


def rest_parameters(shape: ModelShape, layout: Layout, pp_rank: int) -> int:
    """Parameters outside the blocks on ``pp_rank``: embedding shard, positions, ln_f."""
    h, chunks = shape.d_model, stage_chunks(shape, layout, pp_rank)
    pre, post = any(c[1] for c in chunks), any(c[2] for c in chunks)
    wte = math.ceil(shape.vocab_size / layout.tp) * h
    return (wte if pre or post else 0) + (shape.seq_len * h if pre else 0) + (2 * h if post else 0)


def rank_parameters(shape: ModelShape, layout: Layout, pp_rank: int = 0) -> int:
    """Ψ_r: the parameters one rank of pipeline rank ``pp_rank`` holds."""
    blocks = sum(c[0] for c in stage_chunks(shape, layout, pp_rank))
    return blocks * block_parameters(shape, layout.tp) + rest_parameters(shape, layout, pp_rank)


def _pad(n: int, d: int) -> int:
    return -(-n // d) * d


def model_state_bytes(psi: int, dp: int, zero: int, item: int = 2, state: int = 12) -> float:
    """The ZeRO paper's model states per device (Rajbhandari et al. 2020, §5 and Figure 1):
    (2 + 2 + K)Ψ, 2Ψ + 2Ψ + KΨ/N, 2Ψ + (2 + K)Ψ/N and (2 + 2 + K)Ψ/N for stages 0–3, with
    ``item`` bytes per parameter and gradient and K = ``state`` bytes of optimizer state per
    parameter (12 for mixed-precision Adam). `state_bytes` is mpipar's exact count."""
    p, g, k, n = item * psi, item * psi, state * psi, dp
    return [p + g + k, p + g + k / n, p + (g + k) / n, (p + g + k) / n][zero]


def state_bytes(shape: ModelShape, layout: Layout, pp_rank: int = 0) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes of one rank, as `memory_report` says."""
    psi, d, e, se = rank_parameters(shape, layout, pp_rank), layout.grad_replicas, \
        layout.item, layout.state_item
    states = 2 + (layout.precision != "fp32")  # m, v and the fp32 master
    if layout.zero == 0:
        return psi * e, psi * e, states * psi * se
    if layout.zero in (1, 2):
        padded = _pad(psi, d)
        grads = padded * e if layout.zero == 1 else padded // d * e
        return padded * e, grads, states * padded // d * se
    blocks = [block_parameters(shape, layout.tp)] * sum(
        c[0] for c in stage_chunks(shape, layout, pp_rank))
    rest = _pad(rest_parameters(shape, layout, pp_rank), d)
    shard = sum(_pad(n, d) // d for n in blocks) + rest // d
    buffers = 2 * max((_pad(n, d) for n in blocks), default=0) + rest
    return (shard + buffers) * e, shard * e, 2 * shard * se


@lru_cache(maxsize=256)
def _schedule(name: str, p: int, m: int, v: int) -> tuple[tuple, ...]:
    return tuple(tuple(program) for program in build_schedule(name, p, m, v))


def rank_program(layout: Layout, pp_rank: int) -> tuple:
    """The instruction list of ``pp_rank`` under the layout's schedule (built once, cached:
    a search asks for the same schedule many times)."""
    return _schedule(layout.schedule, layout.pp, layout.microbatches,
                     layout.virtual_stages)[pp_rank]


def in_flight_layers(shape: ModelShape, layout: Layout, pp_rank: int) -> tuple[int, int, int]:
    """(blocks, head copies, chunk inputs) whose activations ``pp_rank`` holds at its fullest.

    Walks the rank's instruction list (`mpipar.parallel.pipeline.schedules`): a Forward of
    chunk c adds its blocks (and its input) to the stash, the Backward of the same
    (microbatch, chunk) frees them; under a split backward (zb-h1) its W does, and the stash
    is counted whole until then (what W keeps, every Linear's input and output gradient, is
    most of it: 94% on the tiny preset's last stage). Without pipelining one microbatch runs
    forward and backward at a time, and its input is the embedding's output, kept by no
    operation.
    """
    chunks = stage_chunks(shape, layout, pp_rank)
    if layout.pp == 1:
        return chunks[0][0], 1, 0
    live, best = (0, 0, 0), (0, 0, 0)
    for instr in rank_program(layout, pp_rank):
        if isinstance(instr, Forward | Backward | BackwardWeight):
            sign = 1 if isinstance(instr, Forward) else -1
            blocks, _, post = chunks[instr.chunk]
            live = (live[0] + sign * blocks, live[1] + sign * post, live[2] + sign)
            best = max(best, live)
    return best


def block_activation_bytes(shape: ModelShape, layout: Layout,
                           structure: str = "mpipar") -> float:
    """Bytes one block keeps for one microbatch: mpipar's operations
    (`mpipar.activations.formula_bytes`), or with ``structure="megatron"`` Megatron's block
    in 16-bit with dropout, Korthikanti et al. 2022's sbh(34 + 5as/h) and its tp/sp forms."""
    b, s, h, a = layout.micro_batch, shape.seq_len // layout.cp, shape.d_model, shape.n_head
    if structure == "megatron":
        return korthikanti_bytes(b, s, h, a, recompute=layout.recompute, tp=layout.tp,
                                 sequence_parallel=layout.sequence_parallel)
    if structure != "mpipar":
        raise ValueError(f"structure must be mpipar or megatron, got {structure!r}")
    # Ring attention (--cp) keeps no (s/cp)² probabilities, as selective recomputation.
    recompute = "selective" if layout.cp > 1 and layout.recompute == "none" else layout.recompute
    return formula_bytes(b, s, h, a, layout.item, recompute=recompute, tp=layout.tp,
                         sequence_parallel=layout.sequence_parallel)


def activation_bytes(shape: ModelShape, layout: Layout, pp_rank: int = 0,
                     structure: str = "mpipar") -> int:
    """Bytes of activations kept for backward on ``pp_rank`` at its peak (module docstring)."""
    b, h, e, t = layout.micro_batch, shape.d_model, layout.item, layout.tp
    s = shape.seq_len // layout.cp  # the positions this rank holds (all but under --cp)
    blocks, heads, inputs = in_flight_layers(shape, layout, pp_rank)
    per_block = block_activation_bytes(shape, layout, structure)
    s_loc = s // t if layout.sequence_parallel else s
    # ln_f's x̂ and 1/σ, the head's (gathered) input, the loss's fp32 softmax over V/t.
    head = e * (b * s_loc * h + b * s_loc + b * s * h) \
        + max(e, 4) * b * s * math.ceil(shape.vocab_size / t)
    stage_input = inputs * b * s_loc * h * e
    return int(blocks * per_block) + stage_input + heads * head


def memory_for_rank(shape: ModelShape, layout: Layout, pp_rank: int) -> MemoryEstimate:
    """The `MemoryEstimate` of one pipeline rank (every dp and tp rank of it is alike)."""
    params, grads, optimizer = state_bytes(shape, layout, pp_rank)
    acts = activation_bytes(shape, layout, pp_rank)
    transient = 0
    if layout.zero == 2:  # the whole flat gradient buffer lives from zero_grad to finish
        transient = (_pad(rank_parameters(shape, layout, pp_rank), layout.grad_replicas)
                     * layout.item - grads)
    return MemoryEstimate(pp_rank, params, grads, optimizer, acts, transient,
                          params + grads + optimizer + acts + transient)


def memory_per_device(shape: ModelShape, layout: Layout) -> MemoryEstimate:
    """The fullest device's `MemoryEstimate`: the pipeline rank with the largest peak."""
    return max((memory_for_rank(shape, layout, r) for r in range(layout.pp)),
               key=lambda m: m.peak)


__all__ = ["MemoryEstimate", "activation_bytes", "block_activation_bytes", "block_parameters",
           "in_flight_layers", "model_state_bytes",
           "memory_for_rank", "memory_per_device", "parameter_count", "rank_parameters",
           "rank_program", "rest_parameters", "stage_chunks", "state_bytes"]
