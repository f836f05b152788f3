"""The GPT of a preset, taken apart: parameters, tensor shapes, FLOPs per token and MFU.

Parameter count, with vocabulary V, context T, width d = d_model and L blocks:

    wte  V·d (shared with the head)     wpe  T·d     ln_f  2d
    per block: ln_1 2d, qkv 3d² + 3d, attn.proj d² + d, ln_2 2d, fc 4d² + 4d, mlp.proj 4d² + d
             = 12d² + 13d

Training FLOPs per token (``mpipar.model.flops_per_token``): 6·N + 6·L·T·d, where N are the
parameters that multiply activations (12·L·d² in the blocks plus V·d in the head).

MFU (model FLOPs utilisation) = tokens/s × FLOPs per token / peak FLOP/s of the hardware. As
the peak this script measures what one large float32 matrix product reaches on the computer
running it, which is what numpy can get out of the CPU rather than its datasheet figure.

    python tutorials/examples/gpt_anatomy.py [--preset tiny]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mpipar import ops
from mpipar.data import CharTokenizer, default_corpus
from mpipar.model import GPT, PRESETS, GPTConfig, flops_per_token, matmul_params
from mpipar.optim import AdamW


def parameter_table(model: GPT, cfg: GPTConfig) -> None:
    print(f"{'parameter':<26}{'shape':>12}{'count':>10}")
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and not name.startswith("blocks.0."):
            continue  # every block is the same; show block 0 only
        print(f"{name:<26}{str(tuple(p.shape)):>12}{p.size:>10,}")
    v, t, d, n_layer = cfg.vocab_size, cfg.seq_len, cfg.d_model, cfg.n_layer
    per_block = sum(p.size for n, p in model.named_parameters() if n.startswith("blocks.0."))
    formula = v * d + t * d + n_layer * (12 * d * d + 13 * d) + 2 * d
    print(f"(blocks 1..{n_layer - 1} repeat block 0: {per_block:,} = 12d² + 13d each)")
    print(f"total {model.num_parameters():,} = V·d + T·d + L·(12d² + 13d) + 2d = {formula:,}")


def shapes(model: GPT, cfg: GPTConfig, b: int) -> None:
    """Run the forward pass step by step, as GPT.forward does, printing each shape."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, size=(b, cfg.seq_len))
    t, h = cfg.seq_len, cfg.n_head

    def show(what: str, symbols: str, shape) -> None:
        print(f"  {what:<38}{symbols:<14}{str(tuple(shape)):>15}")

    show("idx: token ids", "(B, T)", idx.shape)
    x = model.wte(idx) + model.wpe(np.arange(t))
    show("x = wte[idx] + wpe[0..T)", "(B, T, C)", x.shape)
    block = model.blocks[0]
    qkv = block.attn.qkv(block.ln_1(x))
    show("qkv = ln_1(x) W_qkvᵀ + b", "(B, T, 3C)", qkv.shape)
    show("  inside attention: scores Q Kᵀ/√D", "(B, H, T, T)", (b, h, t, t))
    y = ops.causal_attention(qkv, h)
    show("y = attention, heads side by side", "(B, T, C)", y.shape)
    x = x + block.attn.proj(y)
    show("x = x + attn.proj(y)", "(B, T, C)", x.shape)
    hidden = ops.gelu(block.mlp.fc(block.ln_2(x)))
    show("gelu(ln_2(x) W_fcᵀ + b)", "(B, T, 4C)", hidden.shape)
    x = x + block.mlp.proj(hidden)
    show("x = x + mlp.proj(...)", "(B, T, C)", x.shape)
    layout = model.layers.sequence_layout(t)  # the whole sequence, on one process
    for later in list(model.blocks)[1:]:
        x = later(x, layout)
    show(f"... {cfg.n_layer - 1} more blocks", "(B, T, C)", x.shape)
    logits = ops.linear(model.ln_f(x), model.wte.weight)
    show("logits = ln_f(x) wteᵀ (tied head)", "(B, T, V)", logits.shape)


def measured_peak_flops(n: int = 1024) -> float:
    """FLOP/s of one float32 n×n matrix product (2n³ FLOPs), best of 3."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def training_throughput(model: GPT, cfg: GPTConfig, b: int, steps: int = 6) -> float:
    """Tokens per second of forward + backward + AdamW, median over ``steps`` steps."""
    rng = np.random.default_rng(0)
    opt = AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        idx = rng.integers(0, cfg.vocab_size, size=(b, cfg.seq_len + 1))
        start = time.perf_counter()
        opt.zero_grad()
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return b * cfg.seq_len / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    args = ap.parse_args()
    shape = dict(PRESETS[args.preset])
    b = shape.pop("batch_size")
    vocab = CharTokenizer.from_text(default_corpus()[0]).vocab_size  # what train.py will use
    cfg = GPTConfig(vocab_size=vocab, **shape)
    model = GPT(cfg)
    model.initialize(seed=1337)
    print(f"preset {args.preset}: L={cfg.n_layer} blocks, H={cfg.n_head} heads of D="
          f"{cfg.head_dim}, C=d_model={cfg.d_model}, T=seq_len={cfg.seq_len}, V={vocab}, B={b}\n")
    parameter_table(model, cfg)
    print("\nshapes through the forward pass:")
    shapes(model, cfg, b)

    n = matmul_params(cfg)
    attention = 6 * cfg.n_layer * cfg.seq_len * cfg.d_model
    f = flops_per_token(cfg)
    print(f"\nFLOPs per token: 6·N = 6·{n:,} = {6 * n:,}  +  6·L·T·d = {attention:,}  "
          f"=  {f:,}")
    tps = training_throughput(model, cfg, b)
    peak = measured_peak_flops()
    achieved = tps * f
    print(f"training: {tps:,.0f} tokens/s × {f:,} FLOPs/token = {achieved / 1e9:.2f} GFLOP/s")
    print(f"peak (one float32 1024×1024 matmul, measured now): {peak / 1e9:.1f} GFLOP/s")
    print(f"MFU = {achieved / 1e9:.2f} / {peak / 1e9:.1f} = {100 * achieved / peak:.1f}%")


if __name__ == "__main__":
    main()
