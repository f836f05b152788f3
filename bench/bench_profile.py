"""What ``train.py --profile`` costs: the same training with and without the profiler.

    python bench/bench_profile.py [--presets tiny small] [--steps 30]

Two trainers of the same preset (float32, AdamW, one BLAS thread) take turns step by step,
one with the plain tracer and one with :class:`mpipar.profile.Profiler`, so that a busy
spell of the machine slows both alike. Reported per preset: the median CPU time of a step
each way, the difference, and that difference per profiled region (operations, spans and
step parts, counted by the profiler). Off, the profiler costs one attribute check per
operation, which no step time resolves.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads OpenBLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from bench_single import VOCAB, random_dataset  # noqa: E402
from machine import emit, format_machine, machine_info  # noqa: E402

from mpipar.grid import ProcessGrid  # noqa: E402
from mpipar.model import PRESETS, GPTConfig  # noqa: E402
from mpipar.profile import Profiler  # noqa: E402
from mpipar.trace import Tracer  # noqa: E402
from mpipar.training import TrainConfig, Trainer  # noqa: E402

NPROCS = 1


def overhead(preset: str, steps: int) -> dict[str, float]:
    shape = dict(PRESETS[preset])
    batch = shape.pop("batch_size")
    cfg = GPTConfig(vocab_size=VOCAB, **shape)
    tc = TrainConfig(steps=steps + 2, batch_size=batch, eval_every=0)
    data = random_dataset(200_000)
    profiler = Profiler(0)
    plain = Trainer(cfg, tc, ProcessGrid.single(), data, Tracer(0))
    profiled = Trainer(cfg, tc, ProcessGrid.single(), data, profiler)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(steps + 2):
        for label, trainer in (("off", plain), ("on", profiled)):
            t0 = time.process_time()
            trainer.train_step()
            if i >= 2:
                times[label].append(time.process_time() - t0)
    summary = profiler.summary()
    regions = sum(r["calls"] for r in summary["rows"].values()) / summary["steps"]
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"step_s_off": off, "step_s_on": on, "overhead": on / off - 1,
            "regions_per_step": regions, "per_region_s": (on - off) / regions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=30, help="measured steps each way")
    args = ap.parse_args(argv)
    info = machine_info()
    print(format_machine(info))
    print(f"{'preset':8} {'off ms':>8} {'on ms':>8} {'overhead':>9} {'regions':>8} "
          f"{'us/region':>10}   (CPU time, medians of {args.steps} steps)")
    for preset in args.presets:
        r = overhead(preset, args.steps)
        emit("profile", preset, r, info)
        print(f"{preset:8} {r['step_s_off'] * 1e3:8.2f} {r['step_s_on'] * 1e3:8.2f} "
              f"{r['overhead']:9.1%} {r['regions_per_step']:8.0f} "
              f"{r['per_region_s'] * 1e6:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
