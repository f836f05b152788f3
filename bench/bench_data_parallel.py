"""Data-parallel scaling efficiency on 2 ranks, and ring vs MPI all-reduce bandwidth.

    mpirun -n 2 python bench/bench_data_parallel.py [--steps 20] [--warmup 3] [--json]

The model is the ``medium`` preset (4 layers, 4 heads, d_model 256, seq_len 128, global batch
32, vocabulary 65, random tokens), float32, AdamW, one BLAS thread per rank. Each
configuration takes ``--warmup`` unmeasured steps, then ``--steps`` measured ones, run in
``--rounds`` interleaved rounds (all configurations a few steps each, then again), so that a
busy spell of the machine slows all of them rather than one; figures are medians. Every step
is also timed in CPU seconds of the process: other programs on the machine slow the wall
clock but hardly the CPU time (MPI's busy-waiting counts as CPU time, so waiting for a peer
is still charged), so the "by CPU time" efficiency is the one to trust on a shared machine.

Scaling efficiency = dp=2 throughput ÷ (2 × 1-process throughput), on the same global batch
(strong scaling: each dp rank computes 16 of the 32 sequences). What "1-process
throughput" should be is a real question on a small machine, so two are measured:

* **alone**: rank 0 trains the 1-process model while rank 1 sleeps (it polls a receive
  every 20 ms, using no CPU to speak of). This is the textbook T₁: one process with the
  whole machine, its caches and memory bandwidth to itself.
* **side by side**: both ranks train their own 1-process model at the same time, sharing
  caches and memory bandwidth exactly as the dp=2 ranks do, but never communicating. The
  efficiency against this baseline isolates what data parallelism itself costs
  (communication and waiting for the slower rank); the gap between the two baselines is
  the cost of sharing the machine, which no communication scheme can remove.

The dp=2 step time is the slowest rank's. Three dp=2 variants are run: bucketed all-reduce
overlapped with backward (the default), the same without polling MPI from the gradient hooks
(``DataParallel.progress = False``: in-flight all-reduces then advance only when backward is
over), and ``--no-overlap`` (one blocking all-reduce per bucket after backward). For each,
"exposed comm" is the median time of the step's ``finish_gradients``: the communication
backward did not hide.

Finally the all-reduce bandwidth table of ``bench_allreduce.py`` (reused, not re-written) for
1–16 MiB float32 buffers, ring vs MPI, and the all-reduce of the whole gradient at once: the
work that overlap would have to hide. On one machine an MPI all-reduce is memory copies
through shared memory made by the ranks' own cores (no network card, no spare core on a
2-core machine), and MPICH advances a non-blocking one only inside MPI calls; overlap can hide
the time one rank waits for the other, not the copying itself. The last line puts the two
side by side.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads OpenBLAS

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
from bench_allreduce import MIB, time_allreduce  # noqa: E402
from bench_single import VOCAB, random_dataset  # noqa: E402
from machine import emit, format_machine, machine_info  # noqa: E402

from mpipar.comm import Comm, install_excepthook  # noqa: E402
from mpipar.grid import ProcessGrid  # noqa: E402
from mpipar.model import PRESETS, GPTConfig  # noqa: E402
from mpipar.parallel.ring import ring_allreduce  # noqa: E402
from mpipar.trace import Tracer  # noqa: E402
from mpipar.training import TrainConfig, Trainer  # noqa: E402

NPROCS = 2  # bench/run_all.py launches this script with mpirun -n 2


def medium() -> tuple[GPTConfig, TrainConfig]:
    shape = dict(PRESETS["medium"])
    batch = shape.pop("batch_size")
    cfg = GPTConfig(vocab_size=VOCAB, dtype="float32", **shape)
    return cfg, TrainConfig(steps=1000, batch_size=batch, optimizer="adamw", eval_every=0)


class Timed:
    """A trainer whose steps are timed by the wall clock and by this process's CPU time.

    Its ``finish_gradients`` is timed too: the communication the step waited for at the end.
    With ``world``, a step's times are the slowest rank's (the step is over when the last
    rank is done); that costs one small all-reduce after the step, outside the timed region.
    """

    def __init__(self, trainer: Trainer, world: Comm | None = None) -> None:
        self.trainer, self.world = trainer, world
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.finish: list[float] = []
        finish = trainer.finish_gradients

        def timed_finish() -> None:
            t0 = time.perf_counter()
            finish()
            self._finish = time.perf_counter() - t0

        trainer.finish_gradients = timed_finish  # this instance only
        self._finish = 0.0

    def steps(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            w0, c0 = time.perf_counter(), time.process_time()
            self.trainer.train_step()
            times = np.array([time.perf_counter() - w0, time.process_time() - c0,
                              self._finish])
            if self.world is not None:
                self.world.allreduce(times, op="max")
            if record:
                self.wall.append(float(times[0]))
                self.cpu.append(float(times[1]))
                self.finish.append(float(times[2]))

    def medians(self) -> dict[str, float]:
        return {"step_s": statistics.median(self.wall), "cpu_step_s": statistics.median(self.cpu),
                "exposed_comm_s": statistics.median(self.finish)}


def idle_until_released(world: Comm) -> None:
    """Sleep (not spin: a blocking MPI wait would busy-poll a core) until rank 0 is done."""
    flag = np.zeros(1)
    req = world.irecv(flag, source=0)
    while not req.test():
        time.sleep(0.02)


DP_VARIANTS = (("overlap", {}, True), ("overlap, no polling", {}, False),
               ("no overlap", {"overlap": False}, True))


def measure(world: Comm, cfg: GPTConfig, tc: TrainConfig, data, warmup: int, steps: int,
            rounds: int) -> dict[str, dict[str, float]]:
    """Every configuration, in ``rounds`` interleaved rounds (a slow spell of the machine
    then hits all of them alike rather than one)."""
    alone = Timed(Trainer(cfg, tc, ProcessGrid.single(), data, Tracer(0))) \
        if world.rank == 0 else None
    side = Timed(Trainer(cfg, tc, ProcessGrid.single(), data, Tracer(0)), world)
    dp = {}
    for label, overrides, progress in DP_VARIANTS:
        grid = ProcessGrid.build(world, world.size, 1, 1)
        trainer = Trainer(cfg, replace(tc, **overrides), grid, data, Tracer(world.rank))
        trainer.grad_sync.progress = progress
        dp[label] = Timed(trainer, world)
    per_round = -(-steps // rounds)
    for k in range(rounds):
        n = per_round if k < rounds - 1 else steps - per_round * (rounds - 1)
        if world.rank == 0:  # 1 process alone: rank 1 sleeps meanwhile
            if k == 0:
                alone.steps(warmup, record=False)
            alone.steps(n)
            world.send(np.ones(1), dest=1)
        else:
            idle_until_released(world)
        for timed in (side, *dp.values()):
            if k == 0:
                timed.steps(warmup, record=False)
            timed.steps(n)
    results = {"side by side": side.medians(), **{k: t.medians() for k, t in dp.items()}}
    results["alone"] = world.bcast_object(alone.medians() if alone is not None else None)
    return results


def allreduce_table(world: Comm, sizes_mb: list[int], repeats: int) -> list[dict]:
    """Median ms of ring and MPI all-reduce per size (bench_allreduce.time_allreduce)."""
    rows = []
    for mb in sizes_mb:
        template = ((np.arange(mb * MIB // 4) % 7) + world.rank).astype(np.float32)
        times = {
            "ring": time_allreduce(world, lambda b: ring_allreduce(world, b), template,
                                   repeats, 3),
            "mpi": time_allreduce(world, world.allreduce, template, repeats, 3),
        }
        rows.append({"mib": mb, **{f"{k}_ms": statistics.median(v) * 1e3
                                   for k, v in times.items()}})
    return rows


def gradient_allreduce(world: Comm, cfg: GPTConfig, repeats: int) -> dict[str, float]:
    """Median seconds of one MPI all-reduce of the whole float32 gradient (both ranks
    arriving together), and its size."""
    from mpipar.model import GPT

    n = GPT(cfg).num_parameters()
    template = ((np.arange(n) % 7) + world.rank).astype(np.float32)
    times = time_allreduce(world, world.allreduce, template, repeats, 3)
    return {"mib": n * 4 / MIB, "allreduce_s": statistics.median(times)}


def overlap_note(results: dict[str, dict[str, float]], grad: dict[str, float]) -> str:
    """Why overlap does or does not pay here, from the measured figures."""
    hidden = results["no overlap"]["exposed_comm_s"] - results["overlap"]["exposed_comm_s"]
    with_, without = results["overlap"]["step_s"], results["no overlap"]["step_s"]
    return (f"\noverlap: all-reducing the whole gradient ({grad['mib']:.1f} MiB) takes "
            f"{grad['allreduce_s'] * 1e3:.1f} ms of both cores when the ranks arrive together. "
            f"Overlap cut the exposed communication by {hidden * 1e3:.1f} ms; the step took "
            f"{with_ * 1e3:.1f} ms with it, {without * 1e3:.1f} ms without (CPU time: "
            f"{results['overlap']['cpu_step_s'] * 1e3:.1f} and "
            f"{results['no overlap']['cpu_step_s'] * 1e3:.1f} ms). On one machine the "
            "all-reduce is copies made by the ranks' "
            "own cores (no network card or spare core works on it while backward computes, "
            "and MPICH moves it only inside MPI calls), so overlap can hide waiting for the "
            "other rank, not the copying.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds of steps")
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=20, help="all-reduce repeats per size")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)

    world = Comm.world()
    install_excepthook(world)
    if world.size != 2:
        raise SystemExit(f"run with mpirun -n 2 (got {world.size} processes)")
    cfg, tc = medium()
    data = random_dataset(200_000)
    tokens = tc.batch_size * cfg.seq_len
    info = machine_info()
    results = measure(world, cfg, tc, data, args.warmup, args.steps, args.rounds)
    table = allreduce_table(world, args.sizes_mb, args.repeats)
    grad = gradient_allreduce(world, cfg, args.repeats)
    if world.rank != 0:
        return 0
    print(format_machine(info))

    print(f"medium preset, global batch {tc.batch_size} × {cfg.seq_len} tokens, float32, "
          f"1 BLAS thread per rank; medians of {args.steps} steps in {args.rounds} rounds, "
          f"after {args.warmup} warm-up steps")
    print(f"{'':25} {'ms/step':>8} {'tokens/s':>9} {'exposed':>8} {'efficiency vs':>14} "
          f"{'vs side':>8} {'by CPU time':>12}")
    print(f"{'':25} {'':>8} {'':>9} {'comm ms':>8} {'alone':>14} {'by side':>8} "
          f"{'vs alone':>12}")
    summary: dict = {}
    t1 = tokens / results["alone"]["step_s"]
    t1_side = tokens / results["side by side"]["step_s"]
    t1_cpu = tokens / results["alone"]["cpu_step_s"]
    for label in ("alone", "side by side"):
        r = results[label]
        print(f"{'1 process ' + label:25} {r['step_s'] * 1e3:8.1f} "
              f"{tokens / r['step_s']:9.0f}")
        summary[label] = {**r, "tokens_per_s": tokens / r["step_s"]}
    for label, _, _ in DP_VARIANTS:
        r = results[label]
        tps, tps_cpu = tokens / r["step_s"], tokens / r["cpu_step_s"]
        eff, eff_side, eff_cpu = tps / (2 * t1), tps / (2 * t1_side), tps_cpu / (2 * t1_cpu)
        print(f"{'dp=2 ' + label:25} {r['step_s'] * 1e3:8.1f} {tps:9.0f} "
              f"{r['exposed_comm_s'] * 1e3:8.1f} {eff:14.1%} {eff_side:8.1%} {eff_cpu:12.1%}")
        summary[label] = {**r, "tokens_per_s": tps, "efficiency": eff,
                          "efficiency_side_by_side": eff_side, "efficiency_cpu": eff_cpu}
    print("\nall-reduce of float32 buffers on 2 ranks (busbw = bytes × 2(n−1)/n ÷ time)")
    print(f"{'size':>8} {'ring ms':>9} {'ring GB/s':>10} {'mpi ms':>9} {'mpi GB/s':>9} "
          f"{'ring/mpi':>9}")
    for row in table:
        nbytes = row["mib"] * MIB  # busbw for n = 2: 2(n−1)/n = 1
        print(f"{row['mib']:>4} MiB {row['ring_ms']:9.3f} {nbytes / row['ring_ms'] / 1e6:10.2f} "
              f"{row['mpi_ms']:9.3f} {nbytes / row['mpi_ms'] / 1e6:9.2f} "
              f"{row['ring_ms'] / row['mpi_ms']:9.2f}")
    summary["allreduce"] = table
    print(overlap_note(results, grad))
    for label, row in summary.items():
        if isinstance(row, dict):
            emit("data_parallel", label, row, info)
    emit("data_parallel", "gradient allreduce", grad, info)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
