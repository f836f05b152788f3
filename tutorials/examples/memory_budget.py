"""Where a training step's bytes go: model state, and what each block keeps for backward.

    python tutorials/examples/memory_budget.py [--preset tiny] [--dropout 0.1] [--dtype ...]

Prints the parameters, gradients and AdamW state of the preset's model (4 + 4 + 8 bytes per
parameter in float32), then the arrays one transformer block keeps between its forward and its
backward pass, operation by operation (`mpipar.activations.saved_per_layer`), measured on a
real block in each ``--recompute`` mode (`layer_activation_bytes`), and Korthikanti et al.'s
count for a 16-bit Megatron block of the same shape.
"""

from __future__ import annotations

import argparse

import numpy as np

from mpipar.activations import korthikanti_bytes, layer_activation_bytes, saved_per_layer
from mpipar.model import GPT, PRESETS, RECOMPUTE_MODES, GPTConfig
from mpipar.nn import DropoutKey
from mpipar.trace import human_bytes

VOCAB = 103  # the built-in corpus's characters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args()
    shape = dict(PRESETS[args.preset])
    b = shape.pop("batch_size")
    cfg = GPTConfig(vocab_size=VOCAB, dropout=args.dropout, dtype=args.dtype, **shape)
    e = np.dtype(args.dtype).itemsize
    psi = GPT(cfg).num_parameters()
    print(f"{args.preset}: Ψ = {psi:,} parameters, {args.dtype} ({e} bytes each)")
    for what, k in (("parameters", 1), ("gradients", 1), ("AdamW m and v", 2)):
        print(f"  {what:16} {k * e:2d}Ψ  {human_bytes(k * e * psi):>11}")
    print(f"  {'model state':16} {4 * e:2d}Ψ  {human_bytes(4 * e * psi):>11}")

    s, h, a = cfg.seq_len, cfg.d_model, cfg.n_head
    dropout = args.dropout > 0
    print(f"one block keeps for backward (b={b}, s={s}, h={h}, a={a}"
          f"{', dropout' if dropout else ''}):")
    for what, nbytes in saved_per_layer(b, s, h, a, e, dropout=dropout).items():
        print(f"  {what:36} {human_bytes(nbytes):>11}")
    idx = np.random.default_rng(0).integers(0, VOCAB, (b, s))
    key = DropoutKey(0, 0, b, slice(0, b)) if dropout else None
    for mode in RECOMPUTE_MODES:
        model = GPT(cfg)
        model.initialize(0)
        model.set_recompute(mode)
        measured = layer_activation_bytes(model, idx, key)[0]
        formula = sum(saved_per_layer(b, s, h, a, e, recompute=mode, dropout=dropout).values())
        verdict = "= formula" if measured == formula else f"!= formula {formula}"
        print(f"  --recompute {mode:9} measured {human_bytes(measured):>11} {verdict}, "
              f"{cfg.n_layer} blocks {human_bytes(cfg.n_layer * measured):>11}")
    paper = korthikanti_bytes(b, s, h, a)
    print(f"Korthikanti et al., 16-bit, sbh(34 + 5as/h) = {human_bytes(int(paper))} per block")


if __name__ == "__main__":
    main()
