"""Pipeline parallelism on 2 ranks: throughput against 1 process, measured against theoretical
bubble, and the activation memory GPipe and 1F1B hold.

    mpirun -n 2 python bench/bench_pipeline.py [--rounds 6] [--block 5] [--json]

The model is the ``medium`` preset (4 layers, 4 heads, d_model 256, seq_len 128, global batch
32, vocabulary 65, random tokens), float32, AdamW, one BLAS thread per rank.

Configurations:

* **1 process alone**: rank 0 trains the whole model (one microbatch of 32, the default)
  while rank 1 sleeps; the same with **M = 8** microbatches of gradient accumulation, the
  pipeline's arithmetic without the pipeline (smaller matrices run at a different speed, so
  this separates the pipeline's gain from the microbatches'); **side by side**: both ranks
  each train a whole model at once (M = 1), sharing caches and memory bandwidth as the
  pipeline's two ranks do.
* **pp = 2, M = 8** with the GPipe, 1F1B, interleaved (v = 2) and zero-bubble (ZB-H1)
  schedules: 2 blocks per stage (1 per chunk when interleaved), microbatches of 4 sequences.

Every configuration is built first; then each of ``--rounds`` rounds runs ``--block``
consecutive steps of each configuration in turn. Taking turns means a change in the machine's
load (other programs on a shared machine) hits every configuration alike, so the ratios stay
meaningful even when the absolute times drift; running a block of consecutive steps means a
configuration is measured in the steady state of real training, once the first step of the
block has brought its weights and buffers back into the caches. That first step of every
block, and the whole first round, are not measured: 20 measured steps per configuration by
default. Figures are medians over measured steps; a step's time is the slowest rank's.

For each pipeline run: throughput and speedups; the measured bubble (per step,
1 − busy_r / pipeline span, from the executor's compute spans, see
``mpipar.parallel.pipeline.measure``; the median over steps, averaged over the ranks) against
(p − 1)/(m + p − 1) = 1/9 (interleaved: (p − 1)/(v·m + p − 1) = 1/17; ZB-H1 with F = B = W:
(p − 1)/(3m + p − 1) = 1/25); the peak bytes of
activations each rank stashed; where each rank's step goes (forward and backward compute,
idle inside the pipeline, the rest of the step: tied-gradient sum, gradient norm, optimizer);
and the *jitter* of the compute: the spread (90th − 10th percentile, relative to the median)
of the durations of identical forward spans. The theory assumes every stage takes the same,
constant time; in a pipeline every late span delays the rank that waits for it, so jitter
turns directly into extra bubble.

Targets: 1F1B ≥ 1.8× the 1-process throughput; measured bubble within 3
percentage points of theory.

The most a schedule can reach. If the pipeline added nothing but its bubble, p ranks would
run the M microbatches' work in (1-process time) / p / (1 − bubble), a speedup of
p·(1 − bubble) over the same M microbatches in one process: 2·(1 − 1/9) = 16/9 ≈ 1.78× for
GPipe and 1F1B at M = 8, so 1.8× is beyond them by construction (only a 1-process baseline
slower than that bound's, or a larger M, could report it); interleaving (2·16/17 ≈ 1.88×)
and ZB-H1 (2·24/25 = 1.92×) have room above it. The summary prints this bound beside each
schedule's measured speedup.
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
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
from bench_single import VOCAB, random_dataset  # noqa: E402
from machine import emit, format_machine, machine_info  # noqa: E402

from mpipar.comm import Comm, install_excepthook  # noqa: E402
from mpipar.grid import ProcessGrid  # noqa: E402
from mpipar.model import PRESETS, GPTConfig  # noqa: E402
from mpipar.parallel.pipeline.checker import theoretical_bubble  # noqa: E402
from mpipar.parallel.pipeline.measure import (  # noqa: E402
    compute_interval,
    measured_bubble,
    step_extents,
)
from mpipar.trace import Tracer, human_bytes  # noqa: E402
from mpipar.training import TrainConfig, Trainer  # noqa: E402

NPROCS = 2  # bench/run_all.py launches this script with mpirun -n 2

MICROBATCHES = 8
TARGET_SPEEDUP = 1.8
TARGET_BUBBLE_POINTS = 3.0
PIPELINES = (("gpipe", "gpipe", 1), ("1f1b", "1f1b", 1), ("interleaved v=2", "interleaved", 2),
             ("zb-h1", "zb-h1", 1))


def medium() -> tuple[GPTConfig, TrainConfig]:
    shape = dict(PRESETS["medium"])
    batch = shape.pop("batch_size")
    cfg = GPTConfig(vocab_size=VOCAB, dtype="float32", **shape)
    return cfg, TrainConfig(steps=1000, batch_size=batch, optimizer="adamw", eval_every=0)


def on_rank0_while_rank1_sleeps(world: Comm, run: Callable[[], float]) -> float:
    """``run()`` on rank 0 while rank 1 sleeps (polling a receive, not spinning in MPI)."""
    if world.rank == 0:
        result = run()
        world.send(np.ones(1), dest=1)
        return result
    flag = np.zeros(1)
    req = world.irecv(flag, source=0)
    while not req.test():
        time.sleep(0.005)
    return 0.0


def slowest(world: Comm, seconds: float) -> float:
    buf = np.array([seconds])
    world.allreduce(buf, op="max")
    return float(buf[0])


def spread(values: list[float]) -> float:
    """(90th − 10th percentile) / median."""
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return float((p90 - p10) / p50)


def pipeline_figures(world: Comm, trainer: Trainer, times: list[float],
                     measured: list[int]) -> dict:
    """Measured bubble, memory, time split and compute jitter of one pipeline trainer over
    its steps ``measured`` (whose step times are ``times``)."""
    records = [rec for rec in trainer.tracer.records if rec.step in set(measured)]
    spans: dict[tuple[int, int], list[float]] = {}  # (chunk, mb) -> forward durations
    for rec in records:
        iv = compute_interval(rec)
        if iv is not None and iv.kind == "F":
            spans.setdefault((iv.chunk, iv.mb), []).append(iv.end - iv.start)
    jitter = statistics.median(spread(d) for d in spans.values())
    # Point-to-point messages: how many per step, and the fastest one, a bound on what a
    # transfer costs when nobody waits (every other call also includes waiting).
    messages = [rec.end - rec.start for rec in records if rec.group == "pp"]
    transfer = (len(messages) / len(measured), min(messages))
    gathered = world.allgather_object((step_extents(records),
                                       trainer.pipeline.memory_summary(), (jitter, transfer)))
    by_rank = {r: e for r, (e, _, _) in enumerate(gathered)}
    common = sorted(set.intersection(*(set(e) for e in by_rank.values())))
    # The median over steps, like the step times: one step in which the machine stalled a
    # rank (another program, the OS) would otherwise weigh on the figure; the mean is kept too.
    per_step = [measured_bubble(by_rank, steps=[s]) for s in common]
    bubble = {r: statistics.median(b[r] for b in per_step) for r in by_rank}
    bubble_mean = measured_bubble(by_rank, steps=common)
    step = statistics.median(times)
    split = []
    for r, e in by_rank.items():  # medians over steps: compute, idle in the pipeline, rest
        busy = statistics.median(e[s][2] for s in common)
        window = statistics.median(
            max(by_rank[q][s][1] for q in by_rank) - min(by_rank[q][s][0] for q in by_rank)
            for s in common)
        split.append({"rank": r, "compute_s": busy, "pipeline_idle_s": window - busy,
                      "rest_s": step - window})
    tc = trainer.tc
    return {"step_s": step, "bubble": [bubble[r] for r in sorted(bubble)],
            "bubble_mean_over_steps": [bubble_mean[r] for r in sorted(bubble_mean)],
            "memory": [mem for _, mem, _ in gathered], "split": split,
            "jitter": [j for _, _, (j, _) in gathered],
            "messages": [{"per_step": n, "fastest_s": t} for _, _, (_, (n, t)) in gathered],
            "theory": theoretical_bubble(tc.schedule, world.size, tc.microbatches,
                                         tc.virtual_stages)}


def build_trainers(world: Comm, cfg: GPTConfig, tc: TrainConfig
                   ) -> tuple[dict[str, Trainer], Trainer, dict[str, Trainer]]:
    """The 1-process trainers (alone, alone M=8), the side-by-side one and the pipelines."""
    data = random_dataset(200_000)
    single = ProcessGrid.single()
    alone = {label: Trainer(cfg, replace(tc, microbatches=m), single, data, Tracer(0))
             for label, m in (("alone", 1), ("alone M=8", MICROBATCHES))}
    side = Trainer(cfg, tc, single, data, Tracer(0))
    pipes = {}
    for label, schedule, v in PIPELINES:  # each with its own tracer: compute and messages
        tracer = Tracer(world.rank, enabled=True)
        grid = ProcessGrid.build(Comm.world(tracer), 1, 1, world.size)
        pipes[label] = Trainer(cfg, replace(tc, microbatches=MICROBATCHES, schedule=schedule,
                                            virtual_stages=v), grid, data, tracer)
    return alone, side, pipes


def run_rounds(world: Comm, args: argparse.Namespace, alone: dict[str, Trainer], side: Trainer,
               pipes: dict[str, Trainer]) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Every configuration ``--block`` steps in turn, ``--rounds`` times (module docstring).

    Returns the measured step times per configuration and, per pipeline, the indices of its
    measured steps (to pick their records out of its trace).
    """
    def step_of(label: str) -> Callable[[], float]:
        """One training step of configuration ``label``; returns the step time."""
        if label in alone:
            return lambda: on_rank0_while_rank1_sleeps(
                world, lambda: alone[label].train_step()["step_time_s"])
        trainer = side if label == "side by side" else pipes[label]
        return lambda: slowest(world, trainer.train_step()["step_time_s"])

    labels = [*alone, "side by side", *pipes]
    times: dict[str, list[float]] = {k: [] for k in labels}
    measured: dict[str, list[int]] = {k: [] for k in pipes}
    for rnd in range(args.rounds):
        for label in labels:
            run = step_of(label)
            for j in range(args.block):
                index = pipes[label].step if label in pipes else 0
                t = run()
                if rnd > 0 and j > 0:
                    times[label].append(t)
                    if label in pipes:
                        measured[label].append(index)
    return times, measured


def print_throughput(figures: dict[str, dict], base: dict[str, float], tokens: int) -> dict:
    """The table of pipeline runs against the baselines; returns the summary for ``--json``."""
    print(f"\npp=2, M={MICROBATCHES:<9} {'ms/step':>8} {'tokens/s':>9} {'vs alone':>9} "
          f"{'vs M=8':>7} {'vs side':>8} {'bound':>6} {'bubble':>8} {'theory':>7} "
          f"{'per rank':>13}  peak stash per rank (in flight)")
    summary: dict = {"baselines_tokens_per_s": base}
    for label, r in figures.items():
        tps = tokens / r["step_s"]
        mean = sum(r["bubble"]) / len(r["bubble"])
        mem = " / ".join(f"{human_bytes(m['peak_stash_bytes'])} ({m['peak_inflight']})"
                         for m in r["memory"])
        bound = len(r["bubble"]) * (1 - r["theory"])  # p·(1 − bubble): see the docstring
        print(f"{label:18} {r['step_s'] * 1e3:8.1f} {tps:9.0f} {tps / base['alone']:8.2f}× "
              f"{tps / base['alone M=8']:6.2f}× {tps / base['side by side']:7.2f}× "
              f"{bound:5.2f}× {mean:8.1%} {r['theory']:7.1%} "
              f"{' '.join(f'{b:.1%}' for b in r['bubble']):>13}  {mem}")
        summary[label] = {**r, "tokens_per_s": tps, "speedup_alone": tps / base["alone"],
                          "speedup_alone_m8": tps / base["alone M=8"],
                          "speedup_side_by_side": tps / base["side by side"],
                          "bubble_mean": mean, "speedup_bound": bound}
    return summary


def print_time_split(figures: dict[str, dict]) -> None:
    print("\nwhere a step goes, per rank: median ms of compute + idle inside the pipeline + rest "
          "of the step;\nthe spread of identical forward spans (jitter); messages per step × the "
          "fastest one (ms)")
    for label, r in figures.items():
        parts = "   ".join(f"rank {s['rank']}: {s['compute_s'] * 1e3:.0f} + "
                           f"{s['pipeline_idle_s'] * 1e3:.0f} + {s['rest_s'] * 1e3:.0f}"
                           for s in r["split"])
        jitter = " ".join(f"{j:.0%}" for j in r["jitter"])
        msgs = " ".join(f"{m['per_step']:.0f}×{m['fastest_s'] * 1e3:.2f}" for m in r["messages"])
        print(f"{label:18} {parts}   jitter {jitter}   messages {msgs}")


def print_targets(summary: dict) -> None:
    """1F1B against the targets, and the stash GPipe and 1F1B hold."""
    one = summary["1f1b"]
    gap = abs(one["bubble_mean"] - one["theory"]) * 100
    print(f"\n1F1B: {one['speedup_alone']:.2f}× the 1-process throughput (target ≥ "
          f"{TARGET_SPEEDUP}×: {'met' if one['speedup_alone'] >= TARGET_SPEEDUP else 'NOT met'}"
          f"; {one['speedup_alone_m8']:.2f}× the same 8 microbatches in 1 process); bubble "
          f"{one['bubble_mean']:.1%} vs theory {one['theory']:.1%}, {gap:.1f} points "
          f"(target ≤ {TARGET_BUBBLE_POINTS:g}: "
          f"{'met' if gap <= TARGET_BUBBLE_POINTS else 'NOT met'})")
    print(f"1F1B's bound at M = {MICROBATCHES}, p·(1 − bubble), is {one['speedup_bound']:.2f}×: "
          f"the {TARGET_SPEEDUP}× target lies above it (module docstring)")
    pipes = {k: v for k, v in summary.items() if isinstance(v, dict) and "speedup_alone" in v}
    best = max(pipes, key=lambda k: pipes[k]["speedup_alone"])
    b = pipes[best]
    print(f"fastest schedule: {best}, {b['speedup_alone']:.2f}× the 1-process throughput "
          f"(bound {b['speedup_bound']:.2f}×; target ≥ {TARGET_SPEEDUP}×: "
          f"{'met' if b['speedup_alone'] >= TARGET_SPEEDUP else 'NOT met'})")
    g, f = summary["gpipe"]["memory"], one["memory"]
    print("peak stashed activations, GPipe → 1F1B: " + ", ".join(
        f"rank {i} {human_bytes(a['peak_stash_bytes'])} → {human_bytes(b['peak_stash_bytes'])}"
        for i, (a, b) in enumerate(zip(g, f, strict=True))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds; the first is warm-up")
    ap.add_argument("--block", type=int, default=5,
                    help="consecutive steps of a configuration per round; the first is warm-up")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.block < 2:
        raise SystemExit("--rounds and --block must be at least 2 (their first is warm-up)")

    world = Comm.world()
    install_excepthook(world)
    if world.size != 2:
        raise SystemExit(f"run with mpirun -n 2 (got {world.size} processes)")
    cfg, tc = medium()
    tokens = tc.batch_size * cfg.seq_len
    info = machine_info()
    alone, side, pipes = build_trainers(world, cfg, tc)
    times, measured = run_rounds(world, args, alone, side, pipes)
    figures = {label: pipeline_figures(world, trainer, times[label], measured[label])
               for label, trainer in pipes.items()}
    if world.rank != 0:
        return 0
    n_measured = (args.rounds - 1) * (args.block - 1)
    base = {label: tokens / statistics.median(times[label])
            for label in ("alone", "alone M=8", "side by side")}
    print(format_machine(info))
    print(f"medium preset, global batch {tc.batch_size} × {cfg.seq_len} tokens, float32, AdamW, "
          f"1 BLAS thread per rank; medians of {n_measured} steps per configuration, measured "
          f"in {args.rounds - 1} rounds of {args.block - 1} after a warm-up step")
    for label, tps in base.items():
        note = " (each of 2)" if label == "side by side" else ""
        print(f"1 process {label + ':':14} {tokens / tps * 1e3:8.1f} ms/step {tps:8.0f} "
              f"tokens/s{note}")
    summary = print_throughput(figures, base, tokens)
    print_time_split(figures)
    print_targets(summary)
    for label, row in summary.items():
        emit("pipeline", label, {k: v for k, v in row.items() if isinstance(v, int | float)},
             info)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
