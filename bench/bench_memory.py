"""Memory: activation recomputation on `medium`, and ZeRO 0–3 per rank at dp = 2 and 4.

    mpirun -n 4 python bench/bench_memory.py [--steps 5] [--warmup 1] [--json]

The model is the ``medium`` preset (4 layers, 4 heads, d_model 256, seq_len 128, vocabulary
65, random tokens), float32, AdamW, one BLAS thread per rank.

**Recomputation**, on rank 0 alone (the other ranks sleep, polling a receive every 20 ms), the
global batch of 32 sequences, for each ``--recompute`` mode:

* the bytes one block keeps for backward, measured (`activations.layer_activation_bytes`),
  next to mpipar's formula and to Korthikanti et al.'s sbh(34 + 5as/h) for a 16-bit model;
* the whole step's peak of numpy memory (``tracemalloc``, on a trainer of its own: tracing
  slows allocations, so timed steps run untraced);
* the median step time, wall clock and CPU, and the slowdown against ``none`` next to the
  extra forward FLOPs (`activations.recompute_flops_per_token`).

**ZeRO 0–3**, with dp = 2 (ranks 0 and 1; the others sleep) and dp = 4 (all ranks), for each
stage: each rank's bytes of parameters, gradients and AdamW state between steps (the ZeRO
memory report) next to the fp32 formulas 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N (and the paper's
mixed-precision 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N); the peak of numpy memory in a step with
one sequence per rank and full recomputation, so that activations do not hide the model state;
the bytes a rank sends per step (from the trace: a reduce-scatter or in-place all-gather of B
bytes sends (N − 1)/N · B, an all-gather of a B-byte part (N − 1) · B, an all-reduce twice
(N − 1)/N · B); and, at dp = 2, the median step time with the global batch of 32. At dp = 4
four processes share the machine's cores, so no time is given.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads OpenBLAS

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
from bench_data_parallel import idle_until_released, medium  # noqa: E402
from bench_single import random_dataset  # noqa: E402

from mpipar.activations import (  # noqa: E402
    formula_bytes,
    korthikanti_bytes,
    layer_activation_bytes,
    recompute_flops_per_token,
)
from mpipar.comm import Comm, install_excepthook  # noqa: E402
from mpipar.grid import ProcessGrid  # noqa: E402
from mpipar.model import RECOMPUTE_MODES, GPTConfig, flops_per_token  # noqa: E402
from mpipar.parallel.zero import memory_report  # noqa: E402
from mpipar.trace import Tracer, human_bytes  # noqa: E402
from mpipar.training import TrainConfig, Trainer  # noqa: E402

NPROCS = 4  # bench/run_all.py launches this script with mpirun -n 4
MIB = 2**20


def timed_steps(trainer: Trainer, warmup: int, steps: int, world: Comm | None = None) -> dict:
    """Median wall and CPU seconds of ``steps`` steps after ``warmup`` (the slowest rank's)."""
    wall, cpu = [], []
    for k in range(warmup + steps):
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        times = np.array([time.perf_counter() - w0, time.process_time() - c0])
        if world is not None:
            world.allreduce(times, op="max")
        if k >= warmup:
            wall.append(float(times[0]))
            cpu.append(float(times[1]))
    return {"step_s": statistics.median(wall), "cpu_step_s": statistics.median(cpu)}


def step_peak(make: callable) -> int:
    """Peak bytes of numpy (and Python) memory during the second step of ``make()``'s trainer,
    the model state included (traced from before the trainer is built)."""
    tracemalloc.start()
    try:
        trainer = make()
        trainer.train_step()
        tracemalloc.reset_peak()
        trainer.train_step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---- recomputation --------------------------------------------------------------------------


def recompute_rows(cfg: GPTConfig, tc: TrainConfig, data, warmup: int, steps: int) -> list:
    b, s, h, a = tc.batch_size, cfg.seq_len, cfg.d_model, cfg.n_head
    idx = data.train[: b * s].reshape(b, s)
    rows = []
    for mode in RECOMPUTE_MODES:
        mtc = replace(tc, recompute=mode)

        def make(t=mtc):
            return Trainer(cfg, t, ProcessGrid.single(), data, Tracer(0))

        trainer = make()
        layer = layer_activation_bytes(trainer.chunks[0], idx)[0]
        rows.append({
            "mode": mode, "layer_bytes": layer,
            "formula_bytes": formula_bytes(b, s, h, a, 4, recompute=mode),
            "korthikanti_fp16_bytes": korthikanti_bytes(b, s, h, a, recompute=mode),
            "extra_flops": recompute_flops_per_token(cfg, mode) / flops_per_token(cfg),
            **timed_steps(trainer, warmup, steps),
            "peak_bytes": step_peak(make),
        })
    return rows


def print_recompute(rows: list, cfg: GPTConfig, tc: TrainConfig, steps: int) -> None:
    print(f"recomputation, medium: {cfg.n_layer} layers, b={tc.batch_size}, s={cfg.seq_len}, "
          f"h={cfg.d_model}, a={cfg.n_head}, float32, 1 process; medians of {steps} steps")
    print(f"{'mode':10} {'per layer':>11} {'formula':>11} {'paper fp16':>11} {'step peak':>11} "
          f"{'ms/step':>8} {'cpu ms':>8} {'slower':>7} {'cpu':>7} {'+FLOPs':>7}")
    base = rows[0]
    for r in rows:
        print(f"{r['mode']:10} {human_bytes(r['layer_bytes']):>11} "
              f"{human_bytes(r['formula_bytes']):>11} "
              f"{human_bytes(int(r['korthikanti_fp16_bytes'])):>11} "
              f"{human_bytes(r['peak_bytes']):>11} {r['step_s'] * 1e3:8.0f} "
              f"{r['cpu_step_s'] * 1e3:8.0f} {r['step_s'] / base['step_s'] - 1:+7.1%} "
              f"{r['cpu_step_s'] / base['cpu_step_s'] - 1:+7.1%} {r['extra_flops']:+7.1%}")


# ---- ZeRO 0–3 ---------------------------------------------------------------------------------


def sent_bytes(records: list, n: int, step: int) -> float:
    """Bytes this rank sends in the dp group during ``step`` (the module docstring's count)."""
    per = {"reduce_scatter": (n - 1) / n, "iallgather": (n - 1) / n, "allgather": n - 1,
           "allreduce": 2 * (n - 1) / n, "iallreduce": 2 * (n - 1) / n}
    return sum(per[r.op] * r.nbytes for r in records
               if r.group == "dp" and r.step == step and r.op in per)


def formulas(zero: int, psi: int, n: int) -> tuple[float, float]:
    """(fp32 as mpipar trains, the paper's mixed precision) bytes of model state per rank."""
    fp32 = {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}
    mixed = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}
    return fp32[zero], mixed[zero]


def zero_rows(world: Comm, cfg: GPTConfig, tc: TrainConfig, data, warmup: int, steps: int,
              timed: bool) -> list:
    """Every stage on the dp group ``world`` (the rows are the largest over its ranks)."""
    n, rows = world.size, []
    for zero in (0, 1, 2, 3):
        tracer = Tracer(world.rank, enabled=True)
        grid = ProcessGrid.build(Comm(world.mpi, "world", tracer), n, 1, 1)
        trainer = Trainer(cfg, replace(tc, zero=zero), grid, data, tracer)
        report = memory_report(trainer.optimizer, trainer.grad_sync, trainer.params)
        times = timed_steps(trainer, warmup, steps, world) if timed else {}
        if not timed:
            trainer.train_step()
        small = replace(tc, zero=zero, batch_size=n, recompute="full")
        peak = step_peak(lambda t=small: Trainer(cfg, t, ProcessGrid.build(world, n, 1, 1),
                                                 data, Tracer(world.rank)))
        measured = np.array([report["param_bytes"], report["grad_bytes"],
                             report["optimizer_state_bytes"], peak,
                             sent_bytes(tracer.records, n, trainer.step - 1)], dtype=float)
        world.allreduce(measured, op="max")
        fp32, mixed = formulas(zero, report["params"], n)
        rows.append({"zero": zero, "dp": n, "params": report["params"],
                     "param_bytes": int(measured[0]), "grad_bytes": int(measured[1]),
                     "optimizer_state_bytes": int(measured[2]), "peak_bytes": int(measured[3]),
                     "sent_bytes": measured[4], "formula_fp32": fp32, "formula_mixed": mixed,
                     **times})
    return rows


def print_zero(rows: list, n: int) -> None:
    psi = rows[0]["params"]
    print(f"\nZeRO over dp = {n}, medium (Ψ = {psi:,}), float32 AdamW; bytes per rank between "
          f"steps; peak: a step of 1 sequence per rank, full recomputation")
    print(f"{'stage':6} {'params':>10} {'grads':>10} {'m, v':>10} {'total':>10} "
          f"{'fp32 formula':>13} {'paper (mixed)':>14} {'step peak':>10} {'sent/step':>10}"
          + (f" {'ms/step':>8} {'cpu ms':>7}" if "step_s" in rows[0] else ""))
    for r in rows:
        total = r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"]
        line = (f"ZeRO-{r['zero']} {human_bytes(r['param_bytes']):>10} "
                f"{human_bytes(r['grad_bytes']):>10} "
                f"{human_bytes(r['optimizer_state_bytes']):>10} {human_bytes(total):>10} "
                f"{human_bytes(int(r['formula_fp32'])):>13} "
                f"{human_bytes(int(r['formula_mixed'])):>14} {human_bytes(r['peak_bytes']):>10} "
                f"{r['sent_bytes'] / psi / 4:9.2f}Ψ")
        if "step_s" in r:
            line += f" {r['step_s'] * 1e3:8.0f} {r['cpu_step_s'] * 1e3:7.0f}"
        print(line)


# ---- the run ----------------------------------------------------------------------------------


def release(world: Comm, ranks: range) -> None:
    for r in ranks:
        world.send(np.ones(1), dest=r)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    world = Comm.world()
    install_excepthook(world)
    if world.size != 4:
        raise SystemExit(f"run with mpirun -n 4 (got {world.size} processes)")
    cfg, tc = medium()
    data = random_dataset(200_000)
    results: dict = {}
    if world.rank == 0:  # recomputation on one process: the others sleep meanwhile
        results["recompute"] = recompute_rows(cfg, tc, data, args.warmup, args.steps)
        print_recompute(results["recompute"], cfg, tc, args.steps)
        release(world, range(1, 4))
    else:
        idle_until_released(world)
    pair = world.split(0 if world.rank < 2 else None, world.rank, "world")
    if pair is not None:  # dp = 2 on ranks 0 and 1
        results["dp2"] = zero_rows(pair, cfg, tc, data, args.warmup, args.steps, timed=True)
        if world.rank == 0:
            print_zero(results["dp2"], 2)
            release(world, range(2, 4))
    else:
        idle_until_released(world)
    results["dp4"] = zero_rows(world, cfg, tc, data, 0, 1, timed=False)
    if world.rank == 0:
        print_zero(results["dp4"], 4)
        if args.json:
            print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
