"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 2019) and sequence parallelism
(Korthikanti et al. 2022), behind the same interface as :class:`mpipar.model.SerialLayers`.

The GPT code does not change: it asks its ``layers`` object for a ``column_linear``, a
``row_linear`` and a ``token_embedding``, and :class:`TensorParallelLayers` hands back the
parallel versions. With t ranks in the tensor-parallel group, rank r holds

    ColumnParallelLinear   rows r·n/t .. (r+1)·n/t of W (n, d_in) and of b: y_r = x W_rᵀ + b_r
                           (for attention's packed qkv: the rows of *its heads* of q, k and v)
    RowParallelLinear      columns r·k/t .. (r+1)·k/t of W (d_out, k): y = Σ_r x_r W_rᵀ, + b
    VocabParallelEmbedding rows r·V'/t .. (r+1)·V'/t of the table, V' = V padded to t | V'

A block is then  x → LN → f → [qkv_r → attention of my heads → proj_r] → g → + x
                   → LN → f → [fc_r → gelu → proj_r] → g → + x
with f = copy_to_tensor_parallel_region and g = reduce_from_tensor_parallel_region (see
``mappings.py``): 2 all-reduces in forward (the two g's) and 2 in backward (the two f's).

With ``sequence_parallel`` the LayerNorms, dropouts and residual adds work on one piece of
the sequence per rank: f becomes an all-gather of the sequence and g a reduce-scatter of it.
Parameters are created with their slice of the 1-process model's values (``full_shape``,
``shard_index``, ``local_index``, ``replicated_in_tp``), so every layout starts identically.

Whether a forward pass splits the sequence is decided per pass, not per model: training and
evaluation always run ``seq_len`` tokens, which t must divide, but generation grows the
sequence one token at a time. So the decision travels with the activations, as the
:class:`mpipar.model.SequenceLayout` that the GPT asks for at the start of every forward pass
(:meth:`TensorParallelLayers.sequence_layout`, from the full length T) and passes to every
block, linear layer and the head: ``layout.split`` chooses all-gather / reduce-scatter or
f / g, ``layout.index`` slices dropout masks. A pipeline stage without the embedding sees only
T/t positions, so the executor tells its chunk T (``GPT.forward(..., seq_len=T)``). The layers
object and its modules hold nothing that changes from one forward pass to the next.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from mpipar import ops
from mpipar.autograd import Function, Tensor, is_grad_enabled
from mpipar.backend import array_module
from mpipar.comm import Comm
from mpipar.model import SequenceLayout
from mpipar.nn import Init, Module, Parameter
from mpipar.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mpipar.parallel.tensor_parallel.mappings import (
    SEQUENCE_AXIS,
    copy_to_tensor_parallel_region,
    gather_along,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_along,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from mpipar.precision import matmul, narrow, sum_rows, upcast


def divide(n: int, t: int, what: str) -> int:
    """n / t, or a ValueError naming ``what`` when t does not divide n."""
    if n % t:
        raise ValueError(f"{what} {n} is not divisible by the tensor-parallel size {t}")
    return n // t


def column_shard_rows(d_out: int, tp_size: int, tp_rank: int, *, qkv: bool = False) -> Any:
    """Which rows of a column-parallel weight (d_out, d_in) rank ``tp_rank`` holds.

    Plain: the contiguous block ``slice(r·d_out/t, (r+1)·d_out/t)``. Packed qkv: the rows are
    [q | k | v], each C = d_out/3 = H·D with heads side by side, so rank r's heads are rows
    r·C/t .. (r+1)·C/t of each part; it takes those of q, then k, then v (an index array),
    so its local qkv output is [q_r | k_r | v_r] and ``ops.causal_attention`` works on it.
    """
    if not qkv:
        n = divide(d_out, tp_size, "output width")
        return slice(tp_rank * n, (tp_rank + 1) * n)
    c = divide(d_out, 3, "qkv width")
    n = divide(c, tp_size, "attention width d_model")
    return np.concatenate([np.arange(j * c + tp_rank * n, j * c + (tp_rank + 1) * n)
                           for j in range(3)])


class SequenceParallelLinear(Function):
    """Column-parallel linear on a sequence-split input: y = AllGather_T(x) W_rᵀ + b_r.

    forward: all-gather x (B, T/t, d_in) along the sequence to X (B, T, d_in), then the GEMM.
    backward: dX = g W_r reduce-scattered along the sequence to dx (B, T/t, d_in);
    dW_r = gᵀ X, db_r = Σ g. Only x, this rank's piece, is kept for backward and X is
    all-gathered again there (Korthikanti et al. 2022, §4.2.2): saving X would store the
    whole sequence on every rank, the memory sequence parallelism exists to save.
    """

    @staticmethod
    def forward(ctx, x, w, b, comm):
        full = gather_along(x, SEQUENCE_AXIS, comm)  # (B, T, d_in)
        y = matmul(full.reshape(-1, full.shape[-1]), w.T)
        y += b
        ctx.save_for_backward(x, w)
        ctx.comm = comm
        return y.reshape(*full.shape[:-1], w.shape[0])  # (B, T, d_out/t)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved
        need = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (B·T, d_out/t)
        gx = gw = gb = None
        if need[0]:
            gfull = matmul(g2, w).reshape(*g.shape[:-1], w.shape[1])  # (B, T, d_in), partial
            gx = reduce_scatter_along(gfull, SEQUENCE_AXIS, ctx.comm)  # (B, T/t, d_in)
        if need[1]:
            full = gather_along(x, SEQUENCE_AXIS, ctx.comm)  # again: only x was kept
            gw = matmul(g2.T, full.reshape(-1, full.shape[-1]))
        if need[2]:
            gb = sum_rows(g2, axis=0)
        return gx, gw, gb


class ColumnParallelLinear(Module):
    """y_r = x W_rᵀ + b_r: this rank's block of the output features (Shoeybi et al. 2019).

    The input x (B, T, d_in) is replicated; it passes f (identity forward, all-reduce
    backward: every rank's dx = g_r W_r is only its share of dx = Σ_r g_r W_r). Under
    sequence parallelism x is (B, T/t, d_in) and is all-gathered instead (backward:
    reduce-scatter). ``gather_output`` all-gathers y to the full (B, T, d_out).
    """

    def __init__(self, layers: TensorParallelLayers, d_in: int, d_out: int, std: float, *,
                 qkv: bool = False, gather_output: bool = False) -> None:
        rows = column_shard_rows(d_out, layers.tp_size, layers.tp_rank, qkv=qkv)
        n = d_out // layers.tp_size
        self.weight = Parameter((n, d_in), Init("normal", std), layers.dtype,
                                full_shape=(d_out, d_in), shard_index=(rows,))
        self.bias = Parameter((n,), Init("zeros"), layers.dtype, full_shape=(d_out,),
                              shard_index=(rows,))
        self.layers = layers
        self.gather_output = gather_output

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        comm = self.layers.comm
        if layout.split:
            y = SequenceParallelLinear.apply(x, self.weight, self.bias, comm=comm)
        else:
            y = ops.linear(copy_to_tensor_parallel_region(x, comm), self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, comm)
        return y  # (B, T, d_out/t), or (B, T, d_out) gathered


class RowParallelLinear(Module):
    """y = Σ_r x_r W_rᵀ + b: this rank's block of the input features (Shoeybi et al. 2019).

    x_r (B, T, d_in/t) is the split output of a column-parallel layer (or, with
    ``input_is_parallel=False``, a replicated input this layer splits itself). Each rank's
    product is a partial sum; g all-reduces it (backward: identity, every rank needs the whole
    dy for its dx_r = dy W_r). Under sequence parallelism the sum is reduce-scattered along
    the sequence instead (backward: all-gather). The bias is replicated and added once,
    after the reduction.
    """

    def __init__(self, layers: TensorParallelLayers, d_in: int, d_out: int, std: float, *,
                 input_is_parallel: bool = True) -> None:
        k = divide(d_in, layers.tp_size, "input width")
        cols = slice(layers.tp_rank * k, (layers.tp_rank + 1) * k)
        self.weight = Parameter((d_out, k), Init("normal", std), layers.dtype,
                                full_shape=(d_out, d_in), shard_index=(slice(None), cols))
        self.bias = Parameter((d_out,), Init("zeros"), layers.dtype)  # replicated
        self.layers = layers
        self.input_is_parallel = input_is_parallel

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        comm = self.layers.comm
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, comm)
        partial = ops.linear(x, self.weight)  # (B, T, d_out): this rank's share of the sum
        if layout.split:
            y = reduce_scatter_to_sequence_parallel_region(partial, comm)  # (B, T/t, d_out)
        else:
            y = reduce_from_tensor_parallel_region(partial, comm)  # (B, T, d_out)
        return y + self.bias


class VocabShardLookup(Function):
    """y[p] = W_r[idx[p] − lo] if lo ≤ idx[p] < lo + V_r, else 0 (the token is elsewhere).

    dW_r[i] = Σ over positions p with idx[p] = lo + i of g[p]; foreign tokens add nothing
    (summed in fp32 for a 16-bit g).
    """

    @staticmethod
    def forward(ctx, weight, idx, lo):
        xp = array_module(weight)
        local = idx - lo
        inside = (local >= 0) & (local < weight.shape[0])  # (B, T)
        local = xp.where(inside, local, 0)
        y = weight[local]  # (B, T, d), a new array
        y[~inside] = 0
        ctx.save_for_backward(local, inside)
        ctx.shape = weight.shape
        return y

    @staticmethod
    def backward(ctx, g):
        local, inside = ctx.saved
        rows = upcast(g[inside])  # (n, d): the positions whose token lives on this rank
        return (narrow(ops.scatter_add_rows(ctx.shape, local[inside], rows), g.dtype),)


class VocabParallelEmbedding(Module):
    """y = W[idx] with the table's rows split over ranks; the partial lookups are all-reduced.

    Rank r holds rows lo_r = r·V'/t .. lo_r + V'/t of the table padded to V' (the smallest
    multiple of t ≥ V); rows ≥ V are padding: zero, never looked up, and (tied as the head)
    masked out of the loss, so they stay zero. A token's row lives on exactly one rank, the
    others contribute 0, and g (all-reduce) completes y on every rank (Shoeybi et al. 2019).
    """

    def __init__(self, layers: TensorParallelLayers, vocab_size: int, d: int,
                 std: float = 0.02) -> None:
        t, r = layers.tp_size, layers.tp_rank
        per = math.ceil(vocab_size / t)  # rows per rank of the padded table
        self.vocab_start = r * per
        real = max(0, min(per, vocab_size - self.vocab_start))  # rows < V held here
        self.weight = Parameter((per, d), Init("normal", std), layers.dtype,
                                full_shape=(vocab_size, d),
                                shard_index=(slice(self.vocab_start, self.vocab_start + real),))
        self.weight.local_index = (slice(0, real),)
        self.layers = layers

    def forward(self, idx: Any) -> Tensor:
        partial = VocabShardLookup.apply(self.weight, idx=idx, lo=self.vocab_start)
        return reduce_from_tensor_parallel_region(partial, self.layers.comm)  # (B, T, d)


class TensorParallelLayers:
    """The parallel counterpart of :class:`mpipar.model.SerialLayers` over ``tp_comm``.

    ``sequence_parallel`` (Korthikanti et al. 2022) splits the sequence between the blocks'
    linear layers. Each forward pass decides whether it actually does so
    (:meth:`sequence_layout`): only when t divides its sequence length T. Training and
    evaluation always use ``seq_len`` (which ``grid.validate_layout`` requires t to divide);
    generation grows the sequence one token at a time, and for a T that t does not divide the
    pass simply runs without the split: the same arithmetic on the whole sequence (f and g
    instead of all-gather and reduce-scatter), so the result is the same.

    Dropout: every rank draws the mask of the whole global activation from
    (seed, step, site) and applies its slice (``nn.Dropout.mask_from_full``): ``head_index``
    for the attention probabilities, the layout's ``index`` for the residual stream under
    sequence parallelism. Replicated activations thus get the same mask on every rank (they
    stay identical) and split ones their own part of it, exactly as in the 1-process model.
    """

    context: Any = None  # context parallelism, as SerialLayers.context

    def __init__(self, tp_comm: Comm, dtype: Any = np.float32, *,
                 sequence_parallel: bool = False) -> None:
        self.comm = tp_comm
        self.tp_size = tp_comm.size
        self.tp_rank = tp_comm.rank
        self.dtype = np.dtype(dtype)
        self.sequence_parallel = sequence_parallel and tp_comm.size > 1

    # -- which part of a full activation this rank holds ------------------------------------
    def sequence_layout(self, length: int) -> SequenceLayout:
        """How a forward pass over sequences of ``length`` = T tokens holds them.

        Under sequence parallelism with t | T: t pieces, this rank's being positions
        r·T/t .. (r+1)·T/t. Otherwise (no sequence parallelism, or a generation length t does
        not divide) the whole sequence. A pass that computes gradients must split when
        sequence parallelism is on: `sync_replicated_grads` counts on it.
        """
        if not self.sequence_parallel:
            return SequenceLayout(length)
        if length % self.tp_size:
            if is_grad_enabled():
                raise ValueError(f"sequence parallelism: a training pass needs the sequence "
                                 f"length {length} divisible by the tensor-parallel size "
                                 f"{self.tp_size}")
            return SequenceLayout(length)
        n = length // self.tp_size
        piece = slice(self.tp_rank * n, (self.tp_rank + 1) * n)
        return SequenceLayout(length, self.tp_size, (piece,))

    def head_index(self, n_head: int) -> tuple:
        """This rank's heads on axis 1 of the attention probabilities (B, H, T, T)."""
        h = self.local_heads(n_head)
        return (slice(self.tp_rank * h, (self.tp_rank + 1) * h),)

    def local_heads(self, n_head: int) -> int:
        return divide(n_head, self.tp_size, "number of heads")

    # -- layers -----------------------------------------------------------------------------
    def column_linear(self, d_in: int, d_out: int, std: float, *, qkv: bool = False) -> Module:
        return ColumnParallelLinear(self, d_in, d_out, std, qkv=qkv)

    def row_linear(self, d_in: int, d_out: int, std: float) -> Module:
        return RowParallelLinear(self, d_in, d_out, std)

    def token_embedding(self, vocab_size: int, d_model: int) -> Module:
        return VocabParallelEmbedding(self, vocab_size, d_model)

    # -- the sequence-parallel region --------------------------------------------------------
    def enter_blocks(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        """Split the sequence (B, T, d) → (B, T/t, d) under sequence parallelism.

        The GPT adds the position embedding wpe[0..T) to the token embedding *before* this
        call, on the whole sequence. That is why the embedding all-reduces (every rank needs
        the whole (B, T, d) to add wpe to) and the split here is a plain scatter (no
        communication in forward; backward all-gathers, so wpe's gradient is complete on
        every rank). Reduce-scattering the embedding instead would need wpe added per piece.
        """
        if not layout.split:
            return x
        return scatter_to_sequence_parallel_region(x, self.comm)

    def exit_blocks(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        """Gather the sequence back, (B, T/t, d) → (B, T, d), for the head (backward:
        reduce-scatter, which also sums the ranks' partial dh of the vocab-split head)."""
        if not layout.split:
            return x
        return gather_from_sequence_parallel_region(x, self.comm)

    # -- the tied head -----------------------------------------------------------------------
    def _head_input(self, h: Tensor, layout: SequenceLayout) -> Tensor:
        # Without the split, f: each rank's dh = dz_r W_r is a share of the whole. With it,
        # exit_blocks's reduce-scatter already sums those shares.
        return h if layout.split else copy_to_tensor_parallel_region(h, self.comm)

    def lm_loss(self, h: Tensor, wte: Parameter, targets: Any,
                layout: SequenceLayout) -> Tensor:
        """Mean cross-entropy of the tied head, logits split by vocabulary (never gathered).

        z_r = h · W_rᵀ is (B, T, V'/t): the logits of this rank's rows of the table.
        """
        logits = ops.linear(self._head_input(h, layout), wte)  # (B, T, V'/t)
        vocab_start = self.tp_rank * wte.shape[0]
        return vocab_parallel_cross_entropy(logits, targets, vocab_start, wte.full_shape[0],
                                            self.comm)

    def lm_logits(self, h: Tensor, wte: Parameter, layout: SequenceLayout) -> Tensor:
        """Full logits (B, T, V), identical on every rank: all-gathered, padding dropped."""
        logits = ops.linear(self._head_input(h, layout), wte)  # (B, T, V'/t)
        full = gather_from_tensor_parallel_region(logits, self.comm)  # (B, T, V')
        return full[..., :wte.full_shape[0]]

    # -- gradients -----------------------------------------------------------------------------
    def sync_replicated_grads(self, params: Iterable[Parameter]) -> None:
        """Sum, over tp, the gradients of replicated parameters that only saw a sequence piece.

        Without sequence parallelism there is nothing to do: a replicated parameter (LayerNorm
        gains and biases, row-parallel biases, wpe) acts on a replicated activation, and the
        gradient reaching it is replicated and complete, because the conjugate of every
        split (f's all-reduce in backward) has already summed the ranks' partial gradients.
        Every rank computes the same full gradient.

        With sequence parallelism the LayerNorms, the row-parallel biases and ln_f act on one
        piece of the sequence per rank, so their gradient is a sum over that piece only: the
        pieces are all-reduced here, in one call for all of them (Korthikanti et al. 2022).
        wpe is the exception (``before_sequence_split``): it is added before the split
        (``enter_blocks``). Every pass that computes gradients splits the sequence under
        sequence parallelism (`sequence_layout`), so the configured mode says which case holds.
        """
        if not self.sequence_parallel:
            return
        partial = [p for p in params
                   if p.replicated_in_tp and p.grad is not None
                   and not p.before_sequence_split]
        if not partial:
            return
        xp = array_module(partial[0].grad)
        flat = xp.concatenate([p.grad.reshape(-1) for p in partial])  # a new buffer
        self.comm.allreduce(flat)
        start = 0
        for p in partial:
            p.grad[...] = flat[start:start + p.grad.size].reshape(p.grad.shape)
            start += p.grad.size


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "SequenceParallelLinear",
           "TensorParallelLayers", "VocabParallelEmbedding", "column_shard_rows"]
