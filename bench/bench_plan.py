"""The planner against the clock: predicted and measured step time of medium on this machine.

    python bench/bench_plan.py [--steps 8] [--calibrate] [--preset medium]

Uses this machine's profile (`python -m mpipar.plan calibrate`, run first with --calibrate or
when there is none), predicts the step time of the preset on 1 process and of every 2-rank
layout that changes what a step does (dp with each ZeRO stage and the ring, tp with and
without sequence parallelism, pp with each schedule), runs each with `train.py` for --steps
steps, and prints the table of predicted against measured step times (the fastest step and
the median) and the worst relative errors. The target is ±20%; the table says where it is
missed.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one BLAS thread per rank: two ranks share the two cores

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from machine import emit, format_machine, machine_info  # noqa: E402

from mpipar.model import PRESETS  # noqa: E402
from mpipar.plan.calibrate import calibrate, mpirun  # noqa: E402
from mpipar.plan.cluster import load_cluster, profile_path, save_cluster  # noqa: E402
from mpipar.plan.compute import step_estimate  # noqa: E402
from mpipar.plan.layout import Layout  # noqa: E402
from mpipar.plan.model_shape import from_preset  # noqa: E402
from mpipar.plan.search import command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NPROCS = 1  # bench/run_all.py launches this script alone; it starts each layout's mpirun

# Every 2-rank layout that changes the step's work or traffic, and the 1-process run.
LAYOUTS = [dict(), dict(dp=2), dict(dp=2, allreduce="ring"), dict(dp=2, zero=1),
           dict(dp=2, zero=2), dict(dp=2, zero=3), dict(tp=2),
           dict(tp=2, sequence_parallel=True), dict(pp=2, microbatches=2),
           dict(pp=2, microbatches=4), dict(pp=2, microbatches=4, schedule="gpipe"),
           dict(pp=2, microbatches=4, schedule="interleaved", virtual_stages=2)]


def measure(preset: str, layout: Layout, steps: int) -> tuple[float, float]:
    """(median, fastest) step time of ``layout`` over ``steps`` steps of ``train.py``, the
    first step left out. On a machine shared with other work the fastest step is the one
    least disturbed, the closest to the dedicated machine the planner assumes."""
    shape = from_preset(preset)
    argv = command(shape, layout, steps=steps).split()[4:]  # after "mpirun -n N python"
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        cmd = [mpirun(), "-n", str(layout.world), sys.executable, *argv, "--quiet",
               "--eval-every", "0", "--eval-tokens", "1", "--metrics", str(metrics)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900,
                       start_new_session=True)
        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    times = [x["step_time_s"] for x in lines if "step_time_s" in x and x["step"] > 0]
    return next(x for x in lines if x.get("event") == "summary")["median_step_time_s"], \
        min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="medium")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--calibrate", action="store_true", help="measure the profile first")
    args = p.parse_args()
    if args.calibrate or not profile_path().exists():
        save_cluster(calibrate(args.preset), profile_path())
    cluster = load_cluster(profile_path())
    print(format_machine(machine_info()))
    print(f"profile {profile_path()}: GEMM {cluster.gemm_flops / 1e9:.3g} GFLOP/s, α "
          f"{cluster.intra.alpha * 1e6:.3g} µs, β {cluster.intra.beta / 1e9:.3g} GB/s")
    shape, batch = from_preset(args.preset), PRESETS[args.preset]["batch_size"]
    print(f"{'layout':<36} {'predicted ms':>12} {'fastest ms':>11} {'error':>7} "
          f"{'median ms':>10} {'error':>7}")
    worst = worst_median = 0.0
    for kw in LAYOUTS:
        layout = Layout(batch_size=batch, **kw)
        predicted = step_estimate(shape, layout, cluster).step_s
        median, fastest = measure(args.preset, layout, args.steps)
        error, error_median = predicted / fastest - 1, predicted / median - 1
        worst, worst_median = max(worst, abs(error)), max(worst_median, abs(error_median))
        name = layout.describe() + (" ring" if layout.allreduce == "ring" else "")
        print(f"{name:<36} {predicted * 1e3:>12.1f} {fastest * 1e3:>11.1f} {error:>+7.1%} "
              f"{median * 1e3:>10.1f} {error_median:>+7.1%}")
        emit("plan", name, {"predicted_s": predicted, "fastest_s": fastest,
                            "median_s": median, "error": error})
    for what, value in (("fastest", worst), ("median", worst_median)):
        verdict = "within" if value <= 0.20 else "OUTSIDE"
        print(f"worst error against the {what} step {value:.1%} ({verdict} the ±20% target)")
    print(f"load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
