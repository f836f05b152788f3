"""The fused operations one at a time, at each preset's shapes: where a kernel change shows.

    python bench/bench_kernels.py [--presets tiny small medium] [--repeats 50] [--json]

A whole training step moves by several percent from run to run on a shared machine, more
than most changes to one kernel are worth; timed alone, a kernel's median over ``--repeats``
calls resolves a change of a few percent. For each preset (float32, one BLAS thread, the
activations of one training step's batch) it times, forward and backward, each operation of
:mod:`mpipar.fused` at the shapes the GPT gives it:

* ``Linear`` for the four projections of a block (qkv, attention output, MLP in and out),
  with GFLOP/s;
* ``LayerNorm`` over (B·T, d), ``Gelu`` over (B·T, 4d), ``CausalAttention`` over
  (B, T, 3d) with its heads, ``CrossEntropy`` over (B·T, V);
* the embedding's backward (:func:`mpipar.ops.scatter_add_rows`) and one AdamW step over all
  parameters in one flat buffer;

and, as the yardstick of elementwise work, one pass of numpy over the MLP's activation:
an in-place multiply by a scalar and a multiply of two arrays, in ns per element. An
elementwise operation costs about its number of passes times that.

Figures are medians of ``--repeats`` calls after 3 unmeasured ones; the same arrays are
used each time, so they stay in the caches as far as they fit, which a training step, with
every other activation in between, does not allow: these are lower bounds on what the
operations cost inside a step (``train.py --profile`` measures that).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads OpenBLAS

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from bench_single import VOCAB  # noqa: E402
from machine import emit, format_machine, machine_info  # noqa: E402

from mpipar import fused  # noqa: E402
from mpipar.autograd import Context  # noqa: E402
from mpipar.model import GPT, PRESETS, GPTConfig  # noqa: E402
from mpipar.ops import scatter_add_rows  # noqa: E402
from mpipar.optim import AdamW  # noqa: E402

NPROCS = 1


def median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock microseconds of ``fn()`` over ``repeats`` calls, after 3 unmeasured."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def forward_backward(fn: type, inputs: tuple, grad: np.ndarray, repeats: int,
                     **options) -> tuple[float, float]:
    """Median µs of ``fn.forward`` and of ``fn.backward`` (on the context forward left)."""
    ctx = Context(tuple(True for _ in inputs))
    fwd = median_us(lambda: fn.forward(ctx, *inputs, **options), repeats)
    bwd = median_us(lambda: fn.backward(ctx, grad), repeats)
    return fwd, bwd


def preset_rows(name: str, repeats: int, rng: np.random.Generator) -> list[dict]:
    """One row per operation of preset ``name``: its shape, forward and backward µs, and
    GFLOP/s for the products."""
    shape = PRESETS[name]
    b, t, d, h = shape["batch_size"], shape["seq_len"], shape["d_model"], shape["n_head"]
    n = b * t

    def normal(*dims: int) -> np.ndarray:
        return rng.standard_normal(dims).astype(np.float32)

    rows = []
    for label, d_in, d_out in (("linear qkv", d, 3 * d), ("linear proj", d, d),
                               ("linear fc", d, 4 * d), ("linear fc2", 4 * d, d)):
        fwd, bwd = forward_backward(fused.Linear, (normal(n, d_in), normal(d_out, d_in),
                                                   normal(d_out)), normal(n, d_out), repeats)
        flops = 2 * n * d_in * d_out
        rows.append({"op": label, "shape": f"({n}, {d_in}) x ({d_in}, {d_out})",
                     "fwd_us": fwd, "bwd_us": bwd, "fwd_gflops": flops / fwd / 1e3,
                     "bwd_gflops": 2 * flops / bwd / 1e3})
    x = normal(n, d)
    fwd, bwd = forward_backward(fused.LayerNorm, (x, normal(d), normal(d)), normal(n, d),
                                repeats)
    rows.append({"op": "layernorm", "shape": f"({n}, {d})", "fwd_us": fwd, "bwd_us": bwd})
    fwd, bwd = forward_backward(fused.Gelu, (normal(n, 4 * d),), normal(n, 4 * d), repeats)
    rows.append({"op": "gelu", "shape": f"({n}, {4 * d})", "fwd_us": fwd, "bwd_us": bwd})
    fwd, bwd = forward_backward(fused.CausalAttention, (normal(b, t, 3 * d),),
                                normal(b, t, d), repeats, n_head=h)
    flops = 4 * b * t * t * d  # Q Kᵀ and P V over every head, the masked half included
    rows.append({"op": "attention", "shape": f"({b}, {h} heads, {t}, {t})", "fwd_us": fwd,
                 "bwd_us": bwd, "fwd_gflops": flops / fwd / 1e3,
                 "bwd_gflops": 2 * flops / bwd / 1e3})
    targets = rng.integers(0, VOCAB, size=n)
    fwd, bwd = forward_backward(fused.CrossEntropy, (normal(n, VOCAB), targets),
                                np.float32(1.0), repeats)
    rows.append({"op": "cross-entropy", "shape": f"({n}, {VOCAB})", "fwd_us": fwd,
                 "bwd_us": bwd})
    grad_rows = normal(n, d)
    bwd = median_us(lambda: scatter_add_rows((VOCAB, d), targets, grad_rows), repeats)
    rows.append({"op": "embedding", "shape": f"({n} rows into {VOCAB})", "fwd_us": None,
                 "bwd_us": bwd})
    rows.append(adamw_row(shape, d, repeats, rng))
    return rows


def adamw_row(shape: dict, d: int, repeats: int, rng: np.random.Generator) -> dict:
    """One AdamW step over the preset's parameters, held in one flat buffer (as training)."""
    cfg = GPTConfig(vocab_size=VOCAB, dtype="float32",
                    **{k: v for k, v in shape.items() if k != "batch_size"})
    params = GPT(cfg).parameters()
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    opt = AdamW(params, lr=1e-3, flat=True)
    us = median_us(opt.step, repeats)
    total = sum(p.size for p in params)
    return {"op": "adamw", "shape": f"{total:,} parameters", "fwd_us": None, "bwd_us": us}


def pass_ns(elements: int, repeats: int, rng: np.random.Generator) -> tuple[float, float]:
    """ns per element of one in-place scalar multiply, and of one multiply of two arrays."""
    a = rng.standard_normal(elements).astype(np.float32)
    b = rng.standard_normal(elements).astype(np.float32)
    out = np.empty_like(a)
    scalar = median_us(lambda: np.multiply(a, 1.0, out=a), repeats) * 1e3 / elements
    binary = median_us(lambda: np.multiply(a, b, out=out), repeats) * 1e3 / elements
    return scalar, binary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"],
                    choices=sorted(PRESETS))
    ap.add_argument("--repeats", type=int, default=50, help="measured calls per figure")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    info = machine_info()
    print(format_machine(info))
    print(f"each fused operation alone, float32, 1 thread; medians of {args.repeats} calls "
          "(µs), GFLOP/s for the products")
    rng = np.random.default_rng(0)
    everything = {}
    for name in args.presets:
        rows = preset_rows(name, args.repeats, rng)
        shape = PRESETS[name]
        elements = shape["batch_size"] * shape["seq_len"] * 4 * shape["d_model"]
        scalar, binary = pass_ns(elements, args.repeats, rng)
        print(f"\n{name}: one pass over {elements:,} elements (the MLP's activation): "
              f"{scalar:.2f} ns/element in place by a scalar, {binary:.2f} for two arrays")
        print(f"{'op':14} {'shape':32} {'fwd µs':>9} {'bwd µs':>9} {'fwd GF/s':>9} "
              f"{'bwd GF/s':>9}")
        for r in rows:
            cells = [f"{r[k]:9.1f}" if r.get(k) is not None else f"{'-':>9}"
                     for k in ("fwd_us", "bwd_us", "fwd_gflops", "bwd_gflops")]
            print(f"{r['op']:14} {r['shape']:32} {' '.join(cells)}")
            emit("kernels", f"{name} {r['op']}",
                 {k: v for k, v in r.items() if isinstance(v, float)}, info)
        emit("kernels", f"{name} pass", {"scalar_ns_per_element": scalar,
                                         "binary_ns_per_element": binary}, info)
        everything[name] = {"rows": rows, "pass_ns": [scalar, binary]}
    if args.json:
        print(json.dumps(everything))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
