"""Activation memory: what a transformer block keeps for backward, counted and measured.

Between a block's forward and its backward, the autograd graph keeps the arrays its operations
saved (`mpipar.autograd.saved_arrays`). Walking through a block of mpipar (`mpipar.model.Block`)
operation by operation, with b sequences of s tokens, width h, a heads and e bytes per element,
and every array kept in the model's dtype (dropout masks too):

    ln_1          x̂ (b, s, h) and 1/σ (b, s, 1)                 bsh + bs
    qkv linear    its input, ln_1's output                      bsh
    attention     q, k, v (views of the qkv output)             3bsh
                  P = softmax(QKᵀ/√d)                           abs²
                  with dropout: the mask and P ⊙ mask           + 2abs²
    proj linear   its input, the attention output               bsh
    ln_2, fc      as ln_1 and qkv                               bsh + bs, bsh
    gelu          its input and 1 + tanh(u) (b, s, 4h) each     8bsh
    proj linear   its input, gelu's output                      4bsh
    dropout       the two residual masks (with dropout)         + 2bsh

so a block keeps e·(20bsh + 2bs + abs²) bytes, e·(22bsh + 2bs + 3abs²) with dropout
(`saved_per_layer` itemises it). Korthikanti et al. (2022) count sbh(34 + 5as/h) for
Megatron's block in 16-bit with 1-byte masks: the same arrays but for two, so at their
precision mpipar's structure would need sbh(42 + 5as/h) + 4sb. The GELU here keeps 1 + tanh(u)
(8sbh at 2 bytes) to spare recomputing it in backward, and each LayerNorm keeps 1/σ, one
number per token. In float32 every element, masks included, takes 4 bytes.

Recomputation (`mpipar.model.GPT.set_recompute`) trades these bytes for compute:

* ``selective`` drops the attention core's (b, a, s, s) arrays, the terms that grow with s²
  (abs², or 3abs² with dropout): backward computes P again from q and k;
* ``full`` keeps only the block's input, bsh, and runs the whole block forward again in
  backward: one more forward pass of every block, about a third more training FLOPs
  (`recompute_flops_per_token`).

With tensor parallelism over t ranks the attention, the GELU and the projections' inputs are
split (16bsh/t and abs²/t) while the LayerNorms, the linear layers' inputs and the residual
masks stay whole on every rank; sequence parallelism splits those along s as well, so the
whole block's memory is divided by t, as in the paper's sbh(10 + 24/t + 5as/ht) and
sbh(34 + 5as/h)/t. `layer_activation_bytes` measures what a model's blocks really keep, which
the tests compare with `saved_per_layer` to the byte.
"""

from __future__ import annotations

from typing import Any

from mpipar.autograd import Tensor, graph_nbytes, no_grad
from mpipar.model import GPT, RECOMPUTE_MODES, GPTConfig, matmul_params
from mpipar.nn import DropoutKey


def saved_per_layer(b: int, s: int, h: int, a: int, itemsize: int, *, recompute: str = "none",
                    dropout: bool = False, tp: int = 1,
                    sequence_parallel: bool = False) -> dict[str, int]:
    """Bytes one block keeps for backward, by what keeps them (see the module docstring).

    ``b`` sequences of ``s`` tokens, width ``h``, ``a`` heads, ``itemsize`` bytes per element,
    on one rank of ``tp`` tensor-parallel ranks (with ``sequence_parallel`` the parts outside
    the split layers are cut along the sequence too).
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    r = tp if sequence_parallel else 1  # what divides the parts that tp alone leaves whole
    whole, tokens = b * (s // r) * h, b * (s // r)  # bsh and bs of the replicated parts
    split, core = b * s * h // tp, a * b * s * s // tp  # bsh/t and abs²/t
    if recompute == "full":
        return {"block input": whole * itemsize}
    items = {
        "ln_1: (x − μ)/σ and 1/σ": whole + tokens,
        "qkv input (ln_1 output)": whole,
        "attention: q, k, v": 3 * split,
        "attention: P": core,
        "attention: dropout mask, P ⊙ mask": 2 * core if dropout else 0,
        "proj input (attention output)": split,
        "residual dropout masks": 2 * whole if dropout else 0,
        "ln_2: (x − μ)/σ and 1/σ": whole + tokens,
        "fc input (ln_2 output)": whole,
        "gelu: input and 1 + tanh": 8 * split,
        "proj input (gelu output)": 4 * split,
    }
    if recompute == "selective":
        items = {k: v for k, v in items.items() if not k.startswith("attention: P")
                 and not k.startswith("attention: dropout")}
    return {k: v * itemsize for k, v in items.items() if v}


def formula_bytes(b: int, s: int, h: int, a: int, itemsize: int, **options: Any) -> int:
    """The total of `saved_per_layer`: bytes one block keeps for backward."""
    return sum(saved_per_layer(b, s, h, a, itemsize, **options).values())


def korthikanti_bytes(b: int, s: int, h: int, a: int, *, recompute: str = "none", tp: int = 1,
                      sequence_parallel: bool = False) -> float:
    """Korthikanti et al. (2022), Table 2: bytes per layer in 16-bit with dropout.

    sbh(34 + 5as/h) on one rank; sbh(10 + 24/t + 5as/ht) with tensor parallelism;
    sbh(34 + 5as/h)/t with sequence parallelism too; selective recomputation drops the
    5as/h term; full keeps the 2-byte input, 2sbh (divided by t under sequence parallelism).
    """
    sbh, t = s * b * h, tp
    core = 0.0 if recompute == "selective" else 5 * a * s / h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    if sequence_parallel:
        return sbh * (34 + core) / t
    return sbh * (10 + 24 / t + core / t)


def layer_activation_bytes(model: GPT, idx: Any, key: DropoutKey | None = None) -> list[int]:
    """Bytes each block of ``model`` keeps for backward on the batch ``idx`` (B, T), measured.

    Each block runs on a leaf holding its input, and its graph's saved arrays are counted
    (`mpipar.autograd.graph_nbytes`, parameters left out): with ``full`` recomputation that
    is the input alone. ``model`` holds the embedding (a whole model or a first stage).
    """
    layout = model.layers.sequence_layout(idx.shape[1])
    with no_grad():
        x = model.embed(idx, layout, key)
    sizes = []
    for block in model.blocks:
        leaf = Tensor(x.data, requires_grad=True)
        out = block(leaf, layout, key)
        sizes.append(graph_nbytes(out, exclude=[p.data for p in block.parameters()]))
        x = out.detach()
    return sizes


def recompute_flops_per_token(cfg: GPTConfig, recompute: str) -> int:
    """Forward FLOPs per token that recomputation adds, as `mpipar.model.flops_per_token`
    counts them (2 per matmul parameter per token, causal attention at half of T × T).

    full: every block's forward again, L·(2·12h² + 2sh), about a third of 6·Ψ_matmul + 6Lsh;
    selective: QKᵀ again, L·sh; none: 0. The head and the embedding are not recomputed.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    h, s, n = cfg.d_model, cfg.seq_len, cfg.n_layer
    block = (matmul_params(cfg) - cfg.vocab_size * h) // n  # 12h², the block's matrices
    return {"none": 0, "selective": n * s * h, "full": n * (2 * block + 2 * s * h)}[recompute]


__all__ = ["formula_bytes", "korthikanti_bytes", "layer_activation_bytes",
           "recompute_flops_per_token", "saved_per_layer"]
