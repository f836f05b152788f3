"""A GPT-2 style language model: pre-LayerNorm blocks, tanh-GELU MLP, learned positions.

    idx (B, T) ─► wte[idx] + wpe[0..T) ─► dropout ─► n_layer × Block ─► ln_f ─► x·wteᵀ ─► logits
    Block:  x = x + dropout(attn(ln_1(x)));   x = x + dropout(mlp(ln_2(x)))

The lm_head is tied to the token embedding (the same matrix wte is used to embed and to score).
With ``n_expert`` > 0 each block's mlp is a mixture of experts (:class:`mpipar.moe.MoE`).

Generation passes a :class:`mpipar.kv_cache.KVCache` (``cache=``): the embedding then starts
each row at its cached length, and each attention layer attends over, and appends to, its
cached keys and values instead of recomputing the prefix.

Recomputation (``GPT.set_recompute``): ``"full"`` keeps only each block's input during the
forward pass and runs the block again during backward (:func:`mpipar.autograd.checkpoint`);
``"selective"`` keeps everything but the attention core, whose (B, H, T, T) probabilities are
computed again in backward. Losses and gradients are the same bits as without it.

The same classes serve every parallel layout. Which linear and embedding layers are built
comes from a ``layers`` object: ``SerialLayers`` here, a tensor-parallel one elsewhere with the
same methods (column-/row-parallel linears, vocab-parallel embedding and loss). A pipeline
stage builds only its share: ``first_layer``..``last_layer`` and, on the first and last
stage, the embedding (``pre``) and the final norm and head (``post``).

Each forward pass first asks the layers how it holds the sequence axis of the residual
stream, a :class:`SequenceLayout` (the whole sequence here; one piece per rank under sequence
parallelism), and passes it down to every block and linear layer with the activations. The
layers object itself keeps no state of a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from mpipar import ops
from mpipar.autograd import Tensor, checkpoint
from mpipar.backend import get_xp
from mpipar.kv_cache import KVCache
from mpipar.moe import MoE
from mpipar.nn import (
    Dropout,
    DropoutKey,
    Embedding,
    Init,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    Parameter,
)


@dataclass(frozen=True)
class GPTConfig:
    """Model shape. ``seq_len`` is the context length (block size)."""

    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    seq_len: int = 32
    dropout: float = 0.0
    dtype: str = "float32"
    # Mixture of experts (`mpipar.moe`): 0 experts is the dense MLP.
    n_expert: int = 0
    moe_top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        for field in ("vocab_size", "n_layer", "n_head", "d_model", "seq_len"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head {self.n_head} does not divide d_model {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.n_expert < 0 or (self.n_expert and not 1 <= self.moe_top_k <= self.n_expert):
            raise ValueError(f"a mixture of {self.n_expert} experts cannot route each token to "
                             f"its top {self.moe_top_k}: need 1 <= top-k <= experts")
        if not self.capacity_factor > 0 or self.aux_loss_coef < 0:
            raise ValueError(f"capacity_factor must be > 0 and aux_loss_coef >= 0, got "
                             f"{self.capacity_factor} and {self.aux_loss_coef}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """The fields; a dense model (no experts) leaves out the mixture-of-experts ones, so
        its configuration (and a checkpoint's ``meta.json``) reads as before they existed."""
        out = asdict(self)
        if not self.n_expert:
            for key in MOE_FIELDS:
                del out[key]
        return out

    def with_(self, **changes: Any) -> GPTConfig:
        return replace(self, **changes)


MOE_FIELDS = ("n_expert", "moe_top_k", "capacity_factor", "aux_loss_coef")

# What a block keeps for backward (docs/design.md §2 --recompute).
RECOMPUTE_MODES = ("none", "selective", "full")

# docs/design.md §2 presets: model shape and the default global batch size (sequences).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, d_model=64, seq_len=32, batch_size=8),
    "small": dict(n_layer=2, n_head=4, d_model=128, seq_len=64, batch_size=16),
    "medium": dict(n_layer=4, n_head=4, d_model=256, seq_len=128, batch_size=32),
}


def residual_std(n_layer: int) -> float:
    """GPT-2 scales the init of projections into the residual stream by 1/√(2·n_layer)."""
    return 0.02 / math.sqrt(2 * n_layer)


@dataclass(frozen=True)
class SequenceLayout:
    """How one forward pass holds the sequence axis of the residual stream (B, T, d).

    ``length`` is T, the whole sequence; ``parts`` the number of pieces it is cut into between
    the embedding and the head (the tensor-parallel size under sequence parallelism, else 1);
    ``index`` this rank's piece as an index of the sequence axis (empty: all of it), so a
    dropout mask drawn for the whole sequence can be sliced to match the 1-process model.
    """

    length: int
    parts: int = 1
    index: tuple = ()

    @property
    def split(self) -> bool:
        """Whether the blocks see one piece of the sequence rather than all of it."""
        return self.parts > 1

    @property
    def local_length(self) -> int:
        """Positions of the sequence this rank holds between embedding and head: T / parts."""
        return self.length // self.parts


class SerialLinear(Linear):
    """``Linear`` called the way the GPT calls all its linears, ``(x, layout)``.

    It acts on every position alone, so how the sequence is laid out changes nothing and the
    layout may be left out; the tensor-parallel linears need it to choose their communication.
    """

    def forward(self, x: Tensor, layout: SequenceLayout | None = None) -> Tensor:
        return super().forward(x)


class SerialLayers:
    """Layer choices for the 1-process model; tensor parallelism supplies parallel versions.

    ``column_linear`` maps the replicated input to an output a tensor-parallel rank would hold a
    slice of (columns); ``row_linear`` maps such a slice back to a full, replicated output.
    ``head_index`` and the ``index`` of a :class:`SequenceLayout` say which part of a full
    activation this rank holds (empty here: all of it), so dropout masks can be sliced to
    match the 1-process model.
    """

    tp_size = 1
    # Context parallelism (mpipar.parallel.context_parallel.ContextParallel), set by the
    # trainer with --cp > 1: the sequence is split over the cp group, attention is a ring.
    context: Any = None

    def __init__(self, dtype: Any = np.float32, expert_dispatch: Any = None) -> None:
        self.dtype = dtype
        # Where a mixture of experts keeps its experts (`mpipar.moe`): None, all of them here.
        self.expert_dispatch = expert_dispatch

    def sequence_layout(self, length: int) -> SequenceLayout:
        """A forward pass over sequences of ``length`` tokens holds all of them."""
        return SequenceLayout(length)

    def head_index(self, n_head: int) -> tuple:
        return ()

    def local_heads(self, n_head: int) -> int:
        return n_head

    def column_linear(self, d_in: int, d_out: int, std: float, *, qkv: bool = False) -> Module:
        return SerialLinear(d_in, d_out, std=std, dtype=self.dtype)

    def row_linear(self, d_in: int, d_out: int, std: float) -> Module:
        return SerialLinear(d_in, d_out, std=std, dtype=self.dtype)

    def token_embedding(self, vocab_size: int, d_model: int) -> Module:
        return Embedding(vocab_size, d_model, dtype=self.dtype)

    def enter_blocks(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        """Between the embedding and the first block (sequence parallelism splits here)."""
        return x

    def exit_blocks(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        """Between the final LayerNorm and the head (sequence parallelism gathers here)."""
        return x

    def lm_loss(self, h: Tensor, wte: Parameter, targets: Any,
                layout: SequenceLayout) -> Tensor:
        """Mean cross-entropy of the tied head: logits = h · wteᵀ, (B, T, V)."""
        return ops.cross_entropy(ops.linear(h, wte), targets)

    def lm_logits(self, h: Tensor, wte: Parameter, layout: SequenceLayout) -> Tensor:
        """Full logits (B, T, V) for generation."""
        return ops.linear(h, wte)


class CausalSelfAttention(Module):
    """Multi-head attention; the qkv projection packs [q | k | v] as (B, T, 3·d_model)."""

    def __init__(self, cfg: GPTConfig, layers: SerialLayers, site: int, layer: int) -> None:
        d = cfg.d_model
        self.layer = layer  # the block's index: its place in a KV cache
        self.n_head = cfg.n_head
        self.n_local_heads = layers.local_heads(cfg.n_head)
        self.head_index = layers.head_index(cfg.n_head)
        self.qkv = layers.column_linear(d, 3 * d, 0.02, qkv=True)
        self.proj = layers.row_linear(d, d, residual_std(cfg.n_layer))
        self.attn_drop = Dropout(cfg.dropout, site)
        self.context = layers.context  # with --cp: this rank's queries against the ring
        self.recompute_core = False  # selective recomputation: P is computed again in backward

    def forward(self, x: Tensor, layout: SequenceLayout, key: DropoutKey | None = None,
                cache: KVCache | None = None) -> Tensor:
        qkv = self.qkv(x, layout)  # (B, T, 3·C_local)
        if cache is not None:  # this rank's heads, over the cached positions and the new ones
            return self.proj(cache.attend(self.layer, qkv, self.n_local_heads), layout)
        if self.context is not None:  # no dropout under --cp (train.py refuses it)
            return self.proj(self.context.attention(qkv, self.n_local_heads), layout)
        mask = None
        if self.attn_drop.active(key):
            draw = self.mask_drawer(key, x.shape[0], qkv)
            # With selective recomputation the mask is drawn again in backward, not kept.
            mask = draw if self.recompute_core else draw()
        y = ops.causal_attention(qkv, self.n_local_heads, mask,
                                 recompute=self.recompute_core)  # (B, T, C_local)
        return self.proj(y, layout)

    def mask_drawer(self, key: DropoutKey, b: int, qkv: Tensor) -> Any:
        """A function returning this rank's scaled dropout mask of the probabilities.

        Attention probabilities are (B, H, T, T); under sequence parallelism the queries'
        sequence axis is gathered back inside qkv, so T is the full length.
        """
        t = qkv.shape[1]
        full = (key.global_batch, self.n_head, t, t)

        def draw() -> Any:
            mask = self.attn_drop.mask_from_full(key, full, self.head_index)
            assert mask.shape[0] == b
            return mask.astype(qkv.dtype, copy=False)

        return draw


class MLP(Module):
    """x ↦ W₂ gelu(W₁ x + b₁) + b₂ with hidden width 4·d_model."""

    def __init__(self, cfg: GPTConfig, layers: SerialLayers) -> None:
        d = cfg.d_model
        self.fc = layers.column_linear(d, 4 * d, 0.02)
        self.proj = layers.row_linear(4 * d, d, residual_std(cfg.n_layer))

    def forward(self, x: Tensor, layout: SequenceLayout) -> Tensor:
        return self.proj(ops.gelu(self.fc(x, layout)), layout)


def residual_dropout(drop: Dropout, x: Tensor, key: DropoutKey | None,
                     layout: SequenceLayout) -> Tensor:
    """Dropout on a (B, T, d) activation of the residual stream, masked as the serial model.

    Under sequence parallelism x holds piece ``layout.index`` of ``layout.parts``.
    """
    if not drop.active(key):
        return x
    full = (key.global_batch, x.shape[1] * layout.parts, *x.shape[2:])
    mask = drop.mask_from_full(key, full, layout.index)
    return ops.dropout(x, mask.astype(x.dtype, copy=False))


class Block(Module):
    """Pre-LayerNorm transformer block; dropout sites 3·i (attention), 3·i+1, 3·i+2 (residual)."""

    def __init__(self, cfg: GPTConfig, layers: SerialLayers, index: int) -> None:
        self.ln_1 = LayerNorm(cfg.d_model, dtype=layers.dtype)
        self.attn = CausalSelfAttention(cfg, layers, site=3 * index + 1, layer=index)
        self.ln_2 = LayerNorm(cfg.d_model, dtype=layers.dtype)
        self.mlp = (MLP(cfg, layers) if not cfg.n_expert else
                    MoE(cfg, layers.dtype, residual_std(cfg.n_layer),
                        getattr(layers, "expert_dispatch", None)))
        self.drop_attn = Dropout(cfg.dropout, site=3 * index + 2)
        self.drop_mlp = Dropout(cfg.dropout, site=3 * index + 3)
        self.recompute = "none"  # one of RECOMPUTE_MODES (GPT.set_recompute)

    def forward(self, x: Tensor, layout: SequenceLayout, key: DropoutKey | None = None,
                cache: KVCache | None = None) -> Tensor:
        """x (B, T/parts, d) → the same shape. With ``recompute == "full"`` (and no cache)
        only x is kept for backward, which runs the block again (`autograd.checkpoint`)."""
        if self.recompute == "full" and cache is None:
            return checkpoint(lambda h: self.residual_branches(h, layout, key), x,
                              self.parameters())
        return self.residual_branches(x, layout, key, cache)

    def residual_branches(self, x: Tensor, layout: SequenceLayout,
                          key: DropoutKey | None = None, cache: KVCache | None = None) -> Tensor:
        """x + attn(ln_1(x)), then + mlp(ln_2(·)), each branch through its dropout."""
        x = x + residual_dropout(self.drop_attn, self.attn(self.ln_1(x), layout, key, cache),
                                 key, layout)
        x = x + residual_dropout(self.drop_mlp, self.mlp(self.ln_2(x), layout), key, layout)
        return x


class GPT(Module):
    """The model, or one pipeline stage of it (``first_layer``..``last_layer``, pre, post)."""

    def __init__(self, cfg: GPTConfig, layers: SerialLayers | None = None, *,
                 first_layer: int = 0, last_layer: int | None = None,
                 pre: bool = True, post: bool = True) -> None:
        layers = layers if layers is not None else SerialLayers(np.dtype(cfg.dtype))
        # The layers' dtype is the compute dtype: cfg.dtype, or 16 bits under mixed precision.
        dtype = layers.dtype
        last_layer = cfg.n_layer if last_layer is None else last_layer
        self.cfg = cfg
        self.layers = layers
        self.pre, self.post = pre, post
        if pre or post:
            # The tied matrix: used by the embedding (first stage) and the head (last stage).
            self.wte = layers.token_embedding(cfg.vocab_size, cfg.d_model)
            self.wte.weight.tied_embedding = True  # embeds on the first stage, scores on the last
        if pre:
            self.wpe = Embedding(cfg.seq_len, cfg.d_model, std=0.01, dtype=dtype)
            self.wpe.weight.before_sequence_split = True  # added to the whole sequence (embed)
            self.drop = Dropout(cfg.dropout, site=0)
        self.blocks = ModuleList(
            [Block(cfg, layers, i) for i in range(first_layer, last_layer)], start=first_layer
        )
        if post:
            self.ln_f = LayerNorm(cfg.d_model, dtype=dtype)
        self.name_parameters()
        if pre and post:
            self.wte.weight.tied = True

    def moe_layers(self) -> list[MoE]:
        """The mixture-of-experts MLPs of this chunk's blocks (none in a dense model), found
        among the sub-modules wherever a wrapper (ZeRO-3's sharded blocks) put them."""
        found, todo = [], [self.blocks]
        while todo:
            module = todo.pop()
            if isinstance(module, MoE):
                found.append(module)
            else:
                todo.extend(child for _, child in module.children())
        return found

    def set_recompute(self, mode: str) -> None:
        """What each block keeps for backward: ``"none"`` (every array its operations save),
        ``"selective"`` (all but the attention core's (B, H, T, T) arrays) or ``"full"`` (its
        input only). The numbers computed are the same in every mode."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
        for block in self.blocks:
            block.recompute = mode
            block.attn.recompute_core = mode == "selective"

    def embed(self, idx: Any, layout: SequenceLayout, key: DropoutKey | None = None,
              cache: KVCache | None = None) -> Tensor:
        """(B, T) token ids → (B, T/parts, d_model) hidden states entering the first block.

        Positions are 0 .. T−1, or with a cache each row's next T positions (B, T), or under
        context parallelism the global positions of this rank's two chunks.
        """
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of length {t} exceeds seq_len {self.cfg.seq_len}")
        if cache is not None:
            positions = cache.positions(t)
        elif self.layers.context is not None:
            positions = self.layers.context.positions(t)
        else:
            positions = get_xp().arange(t)
        x = self.wte(idx) + self.wpe(positions)
        x = self.layers.enter_blocks(x, layout)
        return residual_dropout(self.drop, x, key, layout)

    def forward(self, x: Any, targets: Any = None, key: DropoutKey | None = None, *,
                seq_len: int | None = None, cache: KVCache | None = None) -> Tensor:
        """Token ids (first stage) or hidden states → loss (with targets), logits, or hidden.

        The loss is the mean cross-entropy over every position of this batch. ``seq_len`` is
        the full sequence length T: a stage without the embedding must be told, since under
        sequence parallelism its input holds only T/t positions. With a ``cache`` the T
        positions follow those the cache holds (generation; the caller advances it).
        """
        if seq_len is None:
            if not self.pre:
                raise ValueError("a model chunk without the embedding needs seq_len, the full "
                                 "length of the sequences its input activations belong to")
            seq_len = x.shape[1]
        layout = self.layers.sequence_layout(seq_len)
        if self.pre:
            x = self.embed(x, layout, key, cache)
        for block in self.blocks:
            x = block(x, layout, key, cache)
        if not self.post:
            return x
        x = self.layers.exit_blocks(self.ln_f(x), layout)
        if targets is None:
            return self.layers.lm_logits(x, self.wte.weight, layout)
        return self.layers.lm_loss(x, self.wte.weight, targets, layout)


def matmul_params(cfg: GPTConfig) -> int:
    """Parameters that take part in a matrix multiply per token: blocks and the tied head."""
    d = cfg.d_model
    return cfg.n_layer * 12 * d * d + cfg.vocab_size * d


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs per token: 6·(matmul parameters) + 6·n_layer·seq_len·d_model."""
    return 6 * matmul_params(cfg) + 6 * cfg.n_layer * cfg.seq_len * cfg.d_model


def build_model(cfg: GPTConfig, seed: int, layers: SerialLayers | None = None,
                **stage: Any) -> GPT:
    """A GPT (or stage) with every parameter at its seed-determined initial value."""
    model = GPT(cfg, layers, **stage)
    model.initialize(seed)
    return model


__all__ = ["GPT", "GPTConfig", "PRESETS", "RECOMPUTE_MODES", "SequenceLayout", "SerialLayers",
           "SerialLinear", "Init", "build_model", "flops_per_token", "matmul_params"]
