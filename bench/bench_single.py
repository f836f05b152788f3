"""Single-process training throughput and model FLOPs utilisation (MFU) on one CPU core.

For each preset (``small`` and ``medium`` by default) this trains the GPT with vocabulary 65
on random tokens — float32, AdamW, one BLAS thread — for a few warm-up steps and then
``--steps`` measured ones, and reports

* the median step time (a whole step: batch, forward, backward, clipping, optimizer);
* tokens/s = batch × seq_len / median step time;
* MFU = flops_per_token(cfg) × tokens/s ÷ the float32 GEMM speed of this machine,
  measured in the same run (median over square matrix products of size 1024–2048).

MFU compares the model's useful arithmetic (6 FLOPs per matmul parameter per token, plus the
attention scores and weighted sums, see :func:`mpipar.model.flops_per_token`) with what the
BLAS does on a large matrix product: 100 % would mean every step runs at GEMM speed. The gap is
time spent in small matrix products, elementwise numpy work, and Python.

Every time is taken twice: by the wall clock (the headline figures) and as this process's CPU
time. On a quiet machine the two agree; on a shared one other programs slow the wall-clock
figures, while the CPU-time ones (``cpu_*`` and ``mfu_cpu`` in ``--json``) stay close to what
the process would do alone. Compare them to see whether a measurement was disturbed.

How far the arithmetic itself can go is measured too: the **GEMM ceiling** times the
model's own matrix products alone, at their shapes (the forward x Wᵀ, the backward g W and
gᵀ x of every linear layer and of the tied head, and attention's batched Q Kᵀ, P V and their
gradients), and divides the model's FLOPs by that time. It is the MFU a step would reach if
everything but its matrix products took no time: products with an inner dimension of 128 or
256 run below the rate of large square ones, so the ceiling is below 100 %, and no
elementwise work or Python can be removed to pass it.

Targets (read against the figures of a quiet machine): ``small`` ≥ 65 % and ``medium``
≥ 85 % of the GEMM rate. The output says for each whether it is met and how it compares with
the ceiling. The machine, the BLAS library and its kernel, and environment overrides such as
``OPENBLAS_CORETYPE`` are printed first (``bench/machine.py``), since the GEMM rate depends
on them.

Run: ``python bench/bench_single.py [--json] [--presets tiny small medium] [--steps 20]``.
"""

from __future__ import annotations

import os

# One BLAS thread: the measured figure is per core, and the GEMM reference must match it.
# Set before numpy is imported, since OpenBLAS reads them when it loads.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from machine import emit, format_machine, machine_info  # noqa: E402

from mpipar.data import CharTokenizer, Dataset  # noqa: E402
from mpipar.grid import ProcessGrid  # noqa: E402
from mpipar.model import PRESETS, GPTConfig, flops_per_token  # noqa: E402
from mpipar.trace import Tracer  # noqa: E402
from mpipar.training import TrainConfig, Trainer  # noqa: E402

NPROCS = 1  # bench/run_all.py launches this script with one process
VOCAB = 65  # the size of a Shakespeare-like character vocabulary
TARGETS = {"small": 0.65, "medium": 0.85}  # fraction of the GEMM rate


class Clock:
    """Wall-clock and CPU seconds of a block: ``with Clock() as c: ...; c.wall, c.cpu``."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def gemm_gflops(sizes: tuple[int, ...] = (1024, 1536, 2048), repeats: int = 3,
                dtype: type = np.float32) -> tuple[float, float]:
    """Median GFLOP/s of ``a @ b`` for square n × n matrices (2·n³ FLOPs each), by the wall
    clock and by CPU time.

    Every size is run once unmeasured first (page faults, OpenBLAS buffers), then
    ``repeats`` times; the median of all timed products is robust to a stray slow one.
    """
    rng = np.random.default_rng(0)
    wall, cpu = [], []
    for n in sizes:
        a = rng.standard_normal((n, n)).astype(dtype)
        b = rng.standard_normal((n, n)).astype(dtype)
        out = np.empty((n, n), dtype=dtype)
        np.matmul(a, b, out=out)
        for _ in range(repeats):
            with Clock() as c:
                np.matmul(a, b, out=out)
            wall.append(2 * n**3 / c.wall / 1e9)
            cpu.append(2 * n**3 / max(c.cpu, 1e-9) / 1e9)
    return float(np.median(wall)), float(np.median(cpu))


def random_dataset(n_tokens: int, seed: int = 0) -> Dataset:
    """Uniformly random tokens over a 65-character vocabulary (speed does not depend on text)."""
    rng = np.random.default_rng(seed)
    chars = [chr(c) for c in range(32, 32 + VOCAB)]
    tokens = rng.integers(0, VOCAB, size=n_tokens).astype(np.int32)
    split = n_tokens * 9 // 10
    return Dataset(train=tokens[:split], val=tokens[split:],
                   tokenizer=CharTokenizer.from_chars(chars))


def model_products(cfg: GPTConfig, batch: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (a, b) shapes of every matrix product of one training step, forward and backward.

    A linear layer of rows R = batch·seq_len, d_in → d_out: x Wᵀ (R×d_in)(d_in×d_out), then
    g W (R×d_out)(d_out×d_in) and gᵀ x (d_out×R)(R×d_in). Attention per layer, batched over
    batch·heads: Q Kᵀ (T×D)(D×T) and P V (T×T)(T×D) forward, four products of the same
    shapes backward.
    """
    rows, d, t = batch * cfg.seq_len, cfg.d_model, cfg.seq_len
    linears = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * cfg.n_layer + [(d, cfg.vocab_size)]
    shapes = []
    for d_in, d_out in linears:
        shapes += [((rows, d_in), (d_in, d_out)), ((rows, d_out), (d_out, d_in)),
                   ((d_out, rows), (rows, d_in))]
    bh, hd = batch * cfg.n_head, cfg.head_dim
    per_layer = [((bh, t, hd), (bh, hd, t)), ((bh, t, t), (bh, t, hd))] * 3
    return shapes + per_layer * cfg.n_layer


def gemm_ceiling(cfg: GPTConfig, batch: int, repeats: int = 3) -> float:
    """Seconds the matrix products of one step take alone (the best of ``repeats``)."""
    rng = np.random.default_rng(0)
    operands = [(rng.standard_normal(a).astype(np.float32),
                 rng.standard_normal(b).astype(np.float32)) for a, b in model_products(cfg, batch)]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        with Clock() as c:
            for a, b in operands:
                np.matmul(a, b)
        best = min(best, c.cpu)
    return best


def bench_preset(name: str, steps: int, warmup: int, gemm: tuple[float, float]) -> dict:
    """Train preset ``name`` for ``warmup + steps`` steps; return the figures of the last
    ``steps``. ``gemm`` is the (wall, CPU) GEMM GFLOP/s that MFU is relative to."""
    shape = dict(PRESETS[name])
    batch = shape.pop("batch_size")
    cfg = GPTConfig(vocab_size=VOCAB, dtype="float32", **shape)
    tc = TrainConfig(steps=warmup + steps, batch_size=batch, optimizer="adamw", eval_every=0)
    trainer = Trainer(cfg, tc, ProcessGrid.single(), random_dataset(200_000), Tracer(0))
    wall, cpu = [], []
    for i in range(warmup + steps):
        with Clock() as c:
            trainer.train_step()
        if i >= warmup:
            wall.append(c.wall)
            cpu.append(c.cpu)
    tokens = batch * cfg.seq_len
    fpt = flops_per_token(cfg)
    median, median_cpu = float(np.median(wall)), float(np.median(cpu))
    tps, tps_cpu = tokens / median, tokens / median_cpu
    return {
        "preset": name, "n_layer": cfg.n_layer, "d_model": cfg.d_model,
        "seq_len": cfg.seq_len, "batch_size": batch, "vocab_size": VOCAB,
        "dtype": cfg.dtype, "steps_measured": steps,
        "median_step_time_s": median, "min_step_time_s": float(np.min(wall)),
        "tokens_per_s": tps, "flops_per_token": fpt,
        "model_gflops": fpt * tps / 1e9, "gemm_gflops": gemm[0],
        "mfu": fpt * tps / (gemm[0] * 1e9),
        "cpu_median_step_time_s": median_cpu, "cpu_tokens_per_s": tps_cpu,
        "cpu_gemm_gflops": gemm[1], "mfu_cpu": fpt * tps_cpu / (gemm[1] * 1e9),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS),
                    default=["tiny", "small", "medium"])
    ap.add_argument("--steps", type=int, default=20, help="measured steps per preset")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    ap.add_argument("--json", action="store_true", help="print one JSON record per preset")
    args = ap.parse_args(argv)

    info = machine_info()
    gemm = gemm_gflops()
    results = [bench_preset(p, args.steps, args.warmup, gemm) for p in args.presets]
    # The GEMM again afterwards: if the machine got slower or faster meanwhile, MFU is suspect.
    gemm_after = gemm_gflops()
    for r in results:
        r["gemm_gflops_after"], r["cpu_gemm_gflops_after"] = gemm_after
        r["machine"] = platform.processor() or platform.machine()
        shape = dict(PRESETS[r["preset"]])
        batch = shape.pop("batch_size")
        cfg = GPTConfig(vocab_size=VOCAB, **shape)
        flops = flops_per_token(cfg) * batch * cfg.seq_len
        r["gemm_ceiling_mfu"] = flops / gemm_ceiling(cfg, batch) / (gemm[1] * 1e9)
        emit("single", r["preset"], r, info)
    if args.json:
        for r in results:
            print(json.dumps({**r, "machine_info": info}))
        return 0
    print(format_machine(info))
    print(f"float32 GEMM, 1 thread: {gemm[0]:.1f} GFLOP/s (at the end: {gemm_after[0]:.1f}; "
          f"by CPU time {gemm[1]:.1f} and {gemm_after[1]:.1f})")
    print(f"{'preset':8} {'layers':>6} {'d_model':>7} {'seq':>4} {'batch':>5} "
          f"{'step ms':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6} {'MFU(cpu)':>8} "
          f"{'ceiling':>8}")
    for r in results:
        print(f"{r['preset']:8} {r['n_layer']:6d} {r['d_model']:7d} {r['seq_len']:4d} "
              f"{r['batch_size']:5d} {r['median_step_time_s'] * 1e3:8.1f} "
              f"{r['tokens_per_s']:9.0f} {r['model_gflops']:8.1f} {r['mfu']:6.1%} "
              f"{r['mfu_cpu']:8.1%} {r['gemm_ceiling_mfu']:8.1%}")
    print("ceiling: the MFU of the step's matrix products alone, at their shapes (CPU time)")
    for r in results:
        if r["preset"] in TARGETS:
            target = TARGETS[r["preset"]]
            verdict = "met" if r["mfu_cpu"] >= target else "NOT met"
            print(f"{r['preset']}: {r['mfu_cpu']:.1%} of the GEMM rate by CPU time "
                  f"(target >= {target:.0%}: {verdict}; the products alone reach "
                  f"{r['gemm_ceiling_mfu']:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
