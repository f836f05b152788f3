"""A mixture-of-experts MLP: a router, top-k gates, capacity, and E expert MLPs.

With ``GPTConfig.n_expert = E > 0`` each block's MLP is replaced by :class:`MoE`. For the N
tokens x_t (rows of the block's (B, T, d) input, flattened):

    router     r_t = W_r x_t                       W_r (E, d), no bias
    probs      p_t = softmax(r_t)                  (N, E)
    top-k      S_t = the K experts of largest p_t  (ties: the lower expert index)
    gates      g_te = p_te / Σ_{e'∈S_t} p_te'      for K > 1 (renormalised over the chosen K);
               g_te = p_te                         for K = 1 (Switch: renormalising would make
                                                   g ≡ 1 and cut the router off from the loss)
    experts    E_e(x) = W₂ₑ gelu(W₁ₑ x + b₁ₑ) + b₂ₑ  (the dense MLP's shape, width 4·d)
    output     y_t = Σ_{e ∈ S_t, kept} g_te · E_e(x_t)

**Capacity.** The tokens of one *sequence* compete for room: expert e takes at most
C = ⌈cf · T · K / E⌉ assignments of each sequence (cf = ``capacity_factor``). Assignments
claim slots in priority order: every token's first choice in position order, then every
token's second choice, and so on (GShard's order), so which assignment wins is fixed by the
data alone. An assignment that finds its expert full is *dropped*: it adds 0 to y_t (the
token still passes through the residual connection). Counting per sequence makes routing
independent of how the batch is split between ranks and microbatches. Capacity applies in
training; in evaluation mode (``eval()``: validation, generation) every assignment is kept, so
a token's output does not depend on the other tokens of its sequence and generation with a
KV cache, one token at a time, computes what a pass over the whole sequence computes.

**Load-balancing loss** (Switch Transformer, Fedus et al. 2021, eq. 4), per sequence s:

    aux_s = E · Σ_e f_se · P_se,   f_se = (assignments of s to e) / (T·K)   (before capacity),
                                   P_se = (1/T) Σ_{t∈s} p_te,

minimal (= 1) when both are uniform. The objective gains ``aux_loss_coef`` · mean_s aux_s per
MoE layer, averaged over the sequences of the global batch like the LM loss. Only P carries a
gradient (f counts). Because a pipeline stage's layers never see the loss, the term enters
backward through :class:`InjectAuxGrad` (forward: identity on y; backward: dObjective/d aux =
coef · ``grad_seed``, the seed with which the step starts backward from the LM loss, 1/M).

Expert placement: ``MoE`` holds the experts a *dispatcher* says are local. :class:`LocalDispatch`
(one process, or data parallelism without ep) holds all E; the expert-parallel one
(`mpipar.parallel.expert_parallel`) holds E/P and moves tokens with two all-to-alls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpipar import ops
from mpipar.autograd import Function, Tensor, is_grad_enabled
from mpipar.backend import array_module, get_xp, to_numpy
from mpipar.nn import Linear, Module, ModuleList


def capacity(seq_len: int, n_expert: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per sequence: C = ⌈cf · T · K / E⌉."""
    return math.ceil(capacity_factor * seq_len * top_k / n_expert)


@dataclass(frozen=True)
class Routing:
    """Where the N = B·T tokens of a forward pass go (host arrays; no gradient).

    ``expert`` (N, K): each token's chosen experts, best first. ``kept`` (N, K): whether the
    assignment found room. ``order``: the kept assignments as flat indices a = t·K + j,
    sorted by expert, then by a; ``counts`` (E,): kept assignments per expert, so expert e's
    rows are ``order[offsets[e]:offsets[e+1]]``. ``load`` (B, E): f_se of the aux loss.
    """

    expert: np.ndarray
    kept: np.ndarray
    order: np.ndarray
    counts: np.ndarray
    load: np.ndarray

    @property
    def dropped(self) -> int:
        """Assignments that found their expert full."""
        return int(self.kept.size - self.kept.sum())

    @property
    def tokens(self) -> np.ndarray:
        """The token of each kept assignment, in ``order``."""
        return self.order // self.expert.shape[1]


def top_k_experts(probs: np.ndarray, k: int) -> np.ndarray:
    """(N, E) → (N, K): the K likeliest experts of each row, best first, ties to the lower e."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :k]


def route(probs: np.ndarray, batch: int, k: int, cap: int) -> Routing:
    """The routing of (N, E) probabilities of ``batch`` sequences of N/batch tokens each.

    Within a sequence, assignments claim slots in the order (choice j, position t); an
    assignment is kept when fewer than ``cap`` earlier ones of its sequence chose its expert.
    """
    n, e = probs.shape
    t = n // batch
    expert = top_k_experts(probs, k)                               # (N, K)
    by_priority = expert.reshape(batch, t, k).transpose(0, 2, 1)   # (B, K, T): j, then t
    onehot = np.eye(e, dtype=np.int64)[by_priority.reshape(batch, k * t)]  # (B, K·T, E)
    slot = (np.cumsum(onehot, axis=1) - 1)[onehot.astype(bool)].reshape(batch, k, t)
    kept = (slot < cap).transpose(0, 2, 1).reshape(n, k)
    flat = np.flatnonzero(kept)                                    # a = t·K + j
    order = flat[np.argsort(expert.reshape(-1)[flat], kind="stable")]
    counts = np.bincount(expert.reshape(-1)[flat], minlength=e)
    load = onehot.sum(axis=1) / (t * k)                            # (B, E), before capacity
    return Routing(expert, kept, order, counts, load)


class ScatterRows(Function):
    """y = zeros(n, d) with y[idx[p]] += x[p] for every row p;  dx = g[idx] (a gather)."""

    @staticmethod
    def forward(ctx, x, idx, n):
        ctx.idx = idx
        return ops.scatter_add_rows((n, x.shape[1]), idx, x)

    @staticmethod
    def backward(ctx, g):
        return (g[ctx.idx],)


def scatter_rows(x: Tensor, idx: Any, n: int) -> Tensor:
    """Rows of ``x`` (P, d) added into an (n, d) zero array at rows ``idx`` (P,)."""
    return ScatterRows.apply(x, idx=get_xp().asarray(idx), n=n)


class InjectAuxGrad(Function):
    """forward: y (identity), ignoring ``aux``;  backward: (g, ``scale``) — dObjective/d aux.

    Adds an auxiliary loss to the objective from inside the model, where the loss is not
    (a pipeline's earlier stages): backward from the LM loss reaches y, and hands ``aux`` the
    gradient it would get had ``scale · aux`` been added to the loss.
    """

    @staticmethod
    def forward(ctx, y, aux, scale):
        ctx.scale, ctx.like = scale, aux
        return y

    @staticmethod
    def backward(ctx, g):
        return g, array_module(g).full(ctx.like.shape, ctx.scale, dtype=ctx.like.dtype)


class Expert(Module):
    """One expert: x ↦ W₂ gelu(W₁ x + b₁) + b₂, the dense MLP's shape (d → 4d → d)."""

    def __init__(self, d: int, proj_std: float, dtype: Any) -> None:
        self.fc = Linear(d, 4 * d, std=0.02, dtype=dtype)
        self.proj = Linear(4 * d, d, std=proj_std, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(ops.gelu(self.fc(x)))


def run_experts(experts: ModuleList, x: Tensor, counts: np.ndarray) -> Tensor:
    """Rows of ``x`` grouped by expert (``counts[i]`` rows for ``experts[i]``) → the outputs.

    Every expert runs, even on no rows, so each has a (zero) gradient every step.
    """
    outs, lo = [], 0
    for expert, n in zip(experts, counts.tolist(), strict=True):
        outs.append(expert(ops.getitem(x, slice(lo, lo + n))))
        lo += n
    return ops.concat(outs, axis=0)


class LocalDispatch:
    """Every expert on this rank: the rows for expert e go straight to it (no communication)."""

    ep_size = 1

    def local_experts(self, n_expert: int) -> range:
        return range(n_expert)

    def prepare(self, experts: ModuleList) -> None:
        """Nothing to mark: the experts are ordinary data-parallel parameters here."""

    def run(self, experts: ModuleList, x: Tensor, counts: np.ndarray) -> Tensor:
        """x (n, d) sorted by expert, ``counts`` (E,) → the experts' outputs, same order."""
        return run_experts(experts, x, counts)


class MoE(Module):
    """The mixture-of-experts MLP of one block (see the module docstring for the math)."""

    def __init__(self, cfg: Any, dtype: Any, proj_std: float, dispatch: Any = None) -> None:
        d, e = cfg.d_model, cfg.n_expert
        self.n_expert, self.top_k = e, cfg.moe_top_k
        self.capacity_factor, self.aux_loss_coef = cfg.capacity_factor, cfg.aux_loss_coef
        self.dispatch = dispatch if dispatch is not None else LocalDispatch()
        self.router = Linear(d, e, bias=False, std=0.02, dtype=dtype)
        local = self.dispatch.local_experts(e)
        self.experts = ModuleList([Expert(d, proj_std, dtype) for _ in local],
                                  start=local.start)
        self.dispatch.prepare(self.experts)
        self.grad_seed = 1.0  # dObjective/d(LM loss of this forward pass); the trainer sets it
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the sums of the aux loss (per forward pass, coef included) and drops."""
        self.aux_sum, self.dropped_sum, self.passes = 0.0, 0, 0

    def forward(self, x: Tensor, layout: Any = None) -> Tensor:
        """x (B, T, d) → (B, T, d)."""
        b, t, d = x.shape
        n = b * t
        xf = ops.reshape(x, (n, d))
        probs = ops.softmax(self.router(xf), axis=-1)                          # (N, E)
        # Capacity binds in training only: evaluation and generation keep every assignment,
        # so a token's output never depends on its neighbours (cached generation = uncached).
        cap = capacity(t, self.n_expert, self.top_k, self.capacity_factor) if self.training else t
        routing = route(to_numpy(probs.data), b, self.top_k, cap)
        gates = self.gates(probs, routing)                                     # (n_kept, 1)
        xs = ops.getitem(xf, get_xp().asarray(routing.tokens))                 # (n_kept, d)
        ys = self.dispatch.run(self.experts, xs, routing.counts)
        y = scatter_rows(ys * gates, routing.tokens, n)                        # (N, d)
        aux = self.aux_loss(probs, routing, b)
        self.aux_sum += float(aux.data) * self.aux_loss_coef
        self.dropped_sum += routing.dropped
        self.passes += 1
        if is_grad_enabled() and self.aux_loss_coef:
            y = InjectAuxGrad.apply(y, aux, scale=self.aux_loss_coef * self.grad_seed)
        return ops.reshape(y, (b, t, d))

    def gates(self, probs: Tensor, routing: Routing) -> Tensor:
        """g of each kept assignment, in ``routing.order``: p_te, over Σ_{S_t} p when K > 1."""
        xp = get_xp()
        n, e = probs.shape
        k = self.top_k
        flat = ops.reshape(probs, (n * e, 1))
        chosen = xp.asarray((np.arange(n)[:, None] * e + routing.expert).reshape(-1))
        picked = ops.getitem(flat, chosen)                                     # (N·K, 1)
        kept = xp.asarray(routing.order)
        if k == 1:
            return ops.getitem(picked, kept)
        total = ops.sum(ops.reshape(picked, (n, k)), axis=1, keepdims=True)    # (N, 1)
        norm = ops.reshape(ops.getitem(total, xp.asarray(routing.order // k)), (-1, 1))
        return ops.getitem(picked, kept) / norm

    def aux_loss(self, probs: Tensor, routing: Routing, batch: int) -> Tensor:
        """mean_s E · Σ_e f_se · P_se over the ``batch`` sequences of this pass (a scalar)."""
        n, e = probs.shape
        p_mean = ops.mean(ops.reshape(probs, (batch, n // batch, e)), axis=1)  # (B, E)
        f = get_xp().asarray(routing.load.astype(probs.dtype))
        return ops.mean(ops.sum(p_mean * f, axis=1)) * float(e)


__all__ = ["MoE", "Expert", "LocalDispatch", "Routing", "capacity", "route", "run_experts",
           "scatter_rows", "top_k_experts", "InjectAuxGrad", "ScatterRows"]
