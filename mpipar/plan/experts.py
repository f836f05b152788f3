"""The planner's mixture of experts: parameters, memory and all-to-all traffic per rank.

A dense block's MLP holds 8h² + 5h parameters. With E experts (`mpipar.moe`) a block holds a
router (E·h, no bias) and E such MLPs, of which a rank holds E/P under expert parallelism
(`--ep P`, `mpipar.parallel.expert_parallel`):

    block(E, P) = block_dense − (8h² + 5h) + E·h + (E/P)·(8h² + 5h)

Memory follows the parameters: each parameter of a rank has its gradient and (AdamW) two
moments, so the state is Ψ_r · (item + item + 2·state_item) bytes, the dense layout's rule.

Traffic per rank and step (the trace's bytes, docs/design.md §13), the mean over the ranks
of the ep group: a rank hands in its own kept rows when it dispatches, but the rows its
experts received when it sends the outputs back, and those depend on the routing; their sum
over the group does not. With n = (B/dp)·s tokens on a rank, K assignments each and D of
them dropped by capacity, every kept row crosses the ep group twice in forward (to its
expert, and back) and twice in backward:

    forward   2·(L·n·K − D)·h·item  +  L·M·E·8   (the per-expert counts, int64, per microbatch)
    backward  2·(L·n·K − D)·h·item

in 3·L·M forward and 2·L·M backward ``alltoallv`` calls. D depends on the data; it is 0
when the capacity C = ⌈cf·s·K/E⌉ reaches s (no token can overflow an expert), which makes
the figure exact, and the planner's default is that upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpipar.moe import capacity
from mpipar.plan.layout import Layout
from mpipar.plan.memory import block_parameters, rest_parameters
from mpipar.plan.model_shape import ModelShape

COUNT_ITEM = 8  # the per-expert counts travel as int64


@dataclass(frozen=True)
class Experts:
    """E experts per block, top-K routing, the capacity factor and the ep size P."""

    n_expert: int
    top_k: int = 2
    capacity_factor: float = 1.25
    ep: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_expert or self.n_expert % self.ep:
            raise ValueError(f"need 1 <= top-k {self.top_k} <= experts {self.n_expert} and ep "
                             f"{self.ep} dividing the experts")


def expert_mlp_parameters(shape: ModelShape) -> int:
    """One expert, the dense MLP's shape: 8h² + 5h."""
    h = shape.d_model
    return 8 * h * h + 5 * h


def moe_block_parameters(shape: ModelShape, experts: Experts) -> int:
    """One block on one rank: the dense block with its MLP swapped for the router and E/P
    experts (tp = 1: experts are not split between tensor-parallel ranks)."""
    mlp = expert_mlp_parameters(shape)
    local = experts.n_expert // experts.ep
    return block_parameters(shape) - mlp + experts.n_expert * shape.d_model + local * mlp


def moe_rank_parameters(shape: ModelShape, layout: Layout, experts: Experts) -> int:
    """Ψ_r of an MoE model on one rank (pp = 1, as expert parallelism requires)."""
    if layout.pp != 1 or layout.tp != 1:
        raise ValueError("the expert planner covers tp = pp = 1 (what --ep runs with)")
    return (shape.n_layer * moe_block_parameters(shape, experts)
            + rest_parameters(shape, layout, 0))


def moe_state_bytes(shape: ModelShape, layout: Layout, experts: Experts) -> dict[str, int]:
    """Parameters, gradients and AdamW's two moments of one rank, in bytes."""
    psi = moe_rank_parameters(shape, layout, experts)
    return {"parameters": psi * layout.item, "gradients": psi * layout.item,
            "optimizer_state": 2 * psi * layout.state_item}


def tokens_per_rank(shape: ModelShape, layout: Layout) -> int:
    """n = (B/dp)·s, the tokens a rank routes per step."""
    return layout.batch_size // layout.dp * shape.seq_len


def drops_possible(shape: ModelShape, experts: Experts) -> bool:
    """Whether capacity can drop an assignment: C < s (a token never picks an expert twice)."""
    c = capacity(shape.seq_len, experts.n_expert, experts.top_k, experts.capacity_factor)
    return c < shape.seq_len


def alltoall_per_rank(shape: ModelShape, layout: Layout, experts: Experts,
                      dropped: int = 0) -> dict[str, tuple[int, int]]:
    """``{"forward": (calls, bytes), "backward": (calls, bytes)}`` of one rank's ``alltoallv``
    in the ep group per step (bytes: the mean over the group's ranks); ``dropped``: the
    assignments dropped per rank, over all layers."""
    if experts.ep == 1:
        return {"forward": (0, 0), "backward": (0, 0)}
    layers, m, h = shape.n_layer, layout.microbatches, shape.d_model
    kept = layers * tokens_per_rank(shape, layout) * experts.top_k - dropped
    rows = 2 * kept * h * layout.item
    counts = layers * m * experts.n_expert * COUNT_ITEM
    return {"forward": (3 * layers * m, rows + counts), "backward": (2 * layers * m, rows)}


__all__ = ["Experts", "alltoall_per_rank", "drops_possible", "expert_mlp_parameters",
           "moe_block_parameters", "moe_rank_parameters", "moe_state_bytes", "tokens_per_rank"]
