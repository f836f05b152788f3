"""Expert parallelism: the E experts of each MoE layer spread over an ep group of P ranks.

The groups (made by splitting the data-parallel group, whose ranks hold the same layers):

    ep   dp ranks {P·c, …, P·c + P − 1}     color dp_rank // P, key dp_rank % P
    edp  dp ranks with the same dp_rank % P  color dp_rank % P,  key dp_rank // P

so P must divide dp. Rank i of an ep group holds experts [i·E/P, (i+1)·E/P). Each rank still
holds its own rows of the batch (data parallelism), routes its own tokens (`mpipar.moe`), and
sends every kept assignment's row to the rank holding its expert (GShard, Lepikhin et al.
2020, §2.2; the tokens a rank holds depend on the data, so both exchanges are all-to-all-v):

    dispatch   counts: alltoallv of the per-expert counts (int64, E/P per peer)
               rows:   alltoallv, forward: sorted rows → their experts' ranks
                                  backward: the reverse alltoallv of their gradients
    experts    each local expert on the rows of every source, grouped by expert
    combine    alltoallv, forward: the outputs → back to the rows' sources
                          backward: the reverse alltoallv (send and receive counts swapped)

Gradients. The loss a rank backpropagates is the mean over its own rows, and a data-parallel
gradient is the average over dp of those. An expert's weights see the rows of the P ranks of
its ep group, so after backward a rank holds the *sum* over its ep group; the edp group (the
dp/P ranks holding the same experts) sums those, and dividing by dp (not dp/P) gives the
average over all dp ranks' losses, as for every other weight (:class:`ExpertDataParallel`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpipar import ops
from mpipar.autograd import Function, Tensor
from mpipar.backend import array_module, get_xp
from mpipar.comm import Comm
from mpipar.moe import run_experts
from mpipar.nn import ModuleList, Parameter
from mpipar.parallel.data_parallel import DataParallel


def split_colors(dp_rank: int, ep: int) -> dict[str, tuple[int, int]]:
    """The (color, key) a dp rank hands to ``Split`` of its dp group for each expert group:
    ep = the P consecutive dp ranks, edp = the dp ranks P apart."""
    return {"ep": (dp_rank // ep, dp_rank % ep), "edp": (dp_rank % ep, dp_rank // ep)}


def expert_groups(dp_comm: Comm, ep: int) -> tuple[Comm, Comm]:
    """``(ep group, edp group)`` of this rank, split from its data-parallel group."""
    if dp_comm.size % ep:
        raise ValueError(f"--ep {ep} does not divide the data-parallel size {dp_comm.size}")
    colors = split_colors(dp_comm.rank, ep)
    ep_comm = dp_comm.split(*colors["ep"], "ep")
    edp_comm = dp_comm.split(*colors["edp"], "edp")
    assert ep_comm is not None and edp_comm is not None
    return ep_comm, edp_comm


def exchange(x: Any, send_counts: list[int], recv_counts: list[int], comm: Comm) -> Any:
    """Rows of ``x`` (n, *rest) → the rows other ranks send here, ``send_counts[j]`` rows to
    rank j and ``recv_counts[j]`` from it (array level, no autograd)."""
    xp = array_module(x)
    rest = x.shape[1:]
    row = int(np.prod(rest, dtype=np.int64))
    out = xp.empty((sum(recv_counts), *rest), dtype=x.dtype)
    comm.alltoallv(xp.ascontiguousarray(x), [c * row for c in send_counts], out,
                   [c * row for c in recv_counts])
    return out


class AllToAll(Function):
    """forward: alltoallv with (send, recv) row counts;  backward: alltoallv with (recv, send)."""

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, comm):
        ctx.counts, ctx.comm = (send_counts, recv_counts), comm
        return exchange(x, send_counts, recv_counts, comm)

    @staticmethod
    def backward(ctx, g):
        send_counts, recv_counts = ctx.counts
        return (exchange(g, recv_counts, send_counts, ctx.comm),)


def all_to_all(x: Tensor, send_counts: list[int], recv_counts: list[int], comm: Comm) -> Tensor:
    return AllToAll.apply(x, send_counts=send_counts, recv_counts=recv_counts, comm=comm)


class ExpertParallelDispatch:
    """This rank's E/P experts and the token exchange with the rest of its ep group."""

    def __init__(self, ep_comm: Comm, edp_comm: Comm) -> None:
        self.comm, self.edp = ep_comm, edp_comm
        self.ep_size = ep_comm.size

    def local_experts(self, n_expert: int) -> range:
        if n_expert % self.ep_size:
            raise ValueError(f"{n_expert} experts cannot be split between ep {self.ep_size}")
        per = n_expert // self.ep_size
        return range(self.comm.rank * per, (self.comm.rank + 1) * per)

    def prepare(self, experts: ModuleList) -> None:
        """Mark the experts' parameters as replicated over edp only (``data_replica``)."""
        for p in experts.parameters():
            p.data_replica = self.edp.rank

    def counts_matrix(self, counts: np.ndarray) -> np.ndarray:
        """(E,) kept rows per expert here → (P, E/P): row j, the counts rank j sends here."""
        per = counts.size // self.ep_size
        send = np.ascontiguousarray(counts, dtype=np.int64)
        recv = np.empty_like(send)
        self.comm.alltoallv(send, [per] * self.ep_size, recv, [per] * self.ep_size)
        return recv.reshape(self.ep_size, per)

    def run(self, experts: ModuleList, x: Tensor, counts: np.ndarray) -> Tensor:
        """x (n, d), this rank's kept rows sorted by expert, ``counts`` (E,) → the outputs of
        their experts (n, d), same order, computed where the experts live."""
        p = self.ep_size
        per = counts.size // p
        send = counts.reshape(p, per).sum(axis=1).tolist()   # rows to each rank
        got = self.counts_matrix(counts)                     # (P sources, E/P experts)
        recv = got.sum(axis=1).tolist()                      # rows from each rank
        x_in = all_to_all(x, send, recv, self.comm)          # (Σ recv, d), source-major
        by_expert, back = grouping(got)
        xp = get_xp()
        y = run_experts(experts, _take(x_in, xp.asarray(by_expert)), got.sum(axis=0))
        return all_to_all(_take(y, xp.asarray(back)), recv, send, self.comm)


def _take(x: Tensor, rows: Any) -> Tensor:
    """Rows ``rows`` of x (a permutation, so its gradient is the inverse permutation)."""
    return ops.getitem(x, rows)


def grouping(got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Received rows are source-major (source s: expert 0's rows, expert 1's, …); experts
    want them expert-major. ``(by_expert, back)``: the permutation taking source-major to
    expert-major order, and its inverse."""
    offsets = np.concatenate([[0], np.cumsum(got.reshape(-1))]).reshape(-1)
    p, per = got.shape
    pieces = [np.arange(offsets[s * per + e], offsets[s * per + e + 1])
              for e in range(per) for s in range(p)]
    by_expert = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)
    back = np.empty_like(by_expert)
    back[by_expert] = np.arange(by_expert.size)
    return by_expert, back


def is_expert(p: Parameter) -> bool:
    """Whether ``p`` is an expert weight held by one rank of each ep group."""
    return p.data_replica is not None


class ExpertDataParallel:
    """Gradient averaging under expert parallelism: dense weights over dp, experts over edp.

    Both parts are :class:`DataParallel` (the edp part only when dp > P); the experts' sums
    are then divided by P as well, so each expert's gradient is the average over all dp
    ranks' losses (module docstring). Same interface as ``DataParallel``.
    """

    zero = 0

    def __init__(self, params: list[Parameter], dp_comm: Comm, edp_comm: Comm, ep: int,
                 **options: Any) -> None:
        self.ep, self.dp = ep, dp_comm.size
        self.expert_params = [p for p in params if is_expert(p)]
        self.dense = DataParallel([p for p in params if not is_expert(p)], dp_comm, **options)
        self.experts = (DataParallel(self.expert_params, edp_comm, **options)
                        if edp_comm.size > 1 and self.expert_params else None)

    @property
    def grad_replicas(self) -> int:
        """Replicas of a dense gradient element (expert elements: dp / P, see the trainer)."""
        return self.dense.grad_replicas

    def zero_grad(self) -> None:
        self.dense.zero_grad()
        if self.experts is not None:
            self.experts.zero_grad()
        else:
            for p in self.expert_params:
                p.grad = get_xp().zeros(p.shape, dtype=p.dtype)

    def set_sync(self, enabled: bool) -> None:
        self.dense.set_sync(enabled)
        if self.experts is not None:
            self.experts.set_sync(enabled)

    def finish(self) -> None:
        """Average the dense gradients over dp and the experts' sums over edp, then / P."""
        self.dense.finish()
        if self.experts is not None:
            self.experts.finish()
        for p in self.expert_params:
            p.grad *= 1.0 / self.ep

    def grad_bytes(self) -> int:
        extra = (self.experts.grad_bytes() if self.experts is not None else
                 sum(p.data.nbytes for p in self.expert_params))
        return self.dense.grad_bytes() + extra

    @property
    def numel(self) -> int:
        return self.dense.numel + sum(p.size for p in self.expert_params)


__all__ = ["AllToAll", "ExpertDataParallel", "ExpertParallelDispatch", "all_to_all",
           "exchange", "expert_groups", "grouping", "is_expert", "split_colors"]
