"""`python -m mpipar.plan calibrate`: measure this machine and write the profile `--cluster
this` reads (`mpipar.plan.cluster.profile_path`).

Five measurements, each of what the planner's time model needs (`mpipar.plan.compute`):

1. **matrix products**: float32 products of the model's own shapes, (b·s × h)·(h × 3h),
   (h × h), (h × 4h), (4h × h) and the head (h × V), timed; the rate is their FLOPs, 2·M·N·K
   each, over their time;
2. **the optimizer**: `mpipar.optim.adamw_update` on Ψ float32 elements, seconds per element;
3. **MPI**: a ping-pong between two ranks through `mpipar.comm.Comm` (`send`/`recv`, the calls
   the pipeline uses), over a sweep of message sizes n; half a round trip is t(n) = α + n/β,
   and α and β come from a least-squares fit of that line;
4. **everything else**: one process trains the model for a few steps (`train.py`); what its
   fastest step leaves after (1) and (2) is the non-matrix work (LayerNorm, GELU, softmax,
   the Python between operations), charged per token, block and unit of width;
5. **sharing**: two such runs at once, side by side: their step against the lone one's is
   the fraction of its rate a core keeps while its neighbour works too (shared caches and
   memory bandwidth; on a shared machine, time given to other work), which layouts of more
   than one device are charged.

The machine's "peak" is the measured matrix rate (a CPU has no single published one), so
MFU on it is relative to what its BLAS sustains.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpipar.optim import adamw_update
from mpipar.plan.cluster import Cluster, profile_path, save_cluster
from mpipar.plan.comm import Link
from mpipar.plan.compute import rank_flops
from mpipar.plan.layout import Layout
from mpipar.plan.memory import parameter_count
from mpipar.plan.model_shape import ModelShape, from_preset

ROOT = Path(__file__).resolve().parents[2]


def gemm_rate(shape: ModelShape, tokens: int, reps: int) -> float:
    """FLOP/s of float32 products of the model's shapes on ``tokens`` rows."""
    h, v = shape.d_model, shape.vocab_size
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((tokens, k), dtype=np.float32),
              rng.standard_normal((k, n), dtype=np.float32))
             for k, n in ((h, 3 * h), (h, h), (h, 4 * h), (4 * h, h), (h, v))]
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs)
    for a, b in pairs:  # warm up
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for a, b in pairs:
            a @ b
        best = min(best, time.perf_counter() - t0)
    return flops / best


def optimizer_seconds_per_param(n: int, reps: int) -> float:
    """Seconds of one AdamW update per float32 element, on ``n`` elements."""
    p, g, m, v = (np.ones(n, np.float32) for _ in range(4))
    scratch = np.empty(n, np.float32)
    best = float("inf")
    for step in range(1, reps + 1):
        t0 = time.perf_counter()
        adamw_update(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                     step=step, scratch=scratch)
        best = min(best, time.perf_counter() - t0)
    return best / n


def mpirun() -> str:
    """The launcher beside this Python (a virtual environment's), else the one on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else (shutil.which("mpirun") or "mpirun")


def fit_alpha_beta(points: list[tuple[int, float]]) -> Link:
    """Least-squares t = α + n/β over (bytes, seconds) points; α ≥ 0."""
    n = np.array([p[0] for p in points], float)
    t = np.array([p[1] for p in points], float)
    slope, alpha = np.polyfit(n, t, 1)
    return Link(max(float(alpha), 0.0), 1.0 / max(float(slope), 1e-15))


def pingpong(sizes: list[int], reps: int) -> list[tuple[int, float]]:
    """(bytes, one-way seconds) per size, between ranks 0 and 1 of this MPI job."""
    from mpipar.comm import Comm

    comm = Comm.world()
    out = []
    for n in sizes:
        buf = np.zeros(n, np.uint8)
        best = float("inf")
        for _ in range(reps + 1):  # the first round trip warms the path up
            t0 = time.perf_counter()
            if comm.rank == 0:
                comm.send(buf, 1)
                comm.recv(buf, 1)
            elif comm.rank == 1:
                comm.recv(buf, 0)
                comm.send(buf, 0)
            best = min(best, (time.perf_counter() - t0) / 2)
        out.append((n, best))
    return out


def run_worker(args: list[str], timeout: float) -> object:
    """``python -m mpipar.plan.calibrate ARGS`` under ``mpirun -n 2``: rank 0's JSON."""
    cmd = [mpirun(), "-n", "2", sys.executable, "-m", "mpipar.plan.calibrate", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=ROOT, check=True, start_new_session=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sweep(sizes: list[int], reps: int, timeout: float) -> list[tuple[int, float]]:
    """Run `pingpong` under ``mpirun -n 2`` and read rank 0's points."""
    points = run_worker(["--pingpong", ",".join(map(str, sizes)), "--reps", str(reps)],
                        timeout)
    return [tuple(p) for p in points]


def measured_steps(preset: str, steps: int, copies: int, timeout: float) -> list[float]:
    """The fastest of ``steps`` steps (the first left out) of ``preset`` on one process, for
    each of ``copies`` independent runs started together. The fastest, not the median: on a
    machine shared with other work it is the step least disturbed by it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"m{i}.jsonl" for i in range(copies)]
        procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--preset", preset,
                                   "--steps", str(steps), "--eval-every", "0", "--eval-tokens",
                                   "1", "--quiet", "--metrics", str(path)], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for path in paths]
        for proc in procs:
            if proc.wait(timeout=timeout):
                raise RuntimeError(f"train.py --preset {preset} exited {proc.returncode}")
        out = []
        for path in paths:
            lines = [json.loads(x) for x in path.read_text().splitlines()]
            out.append(min(x["step_time_s"] for x in lines if "step_time_s" in x
                           and x["step"] > 0))
    return out


def calibrate(preset: str = "medium", *, quick: bool = False, power_w: float = 15.0,
              timeout: float = 600.0) -> Cluster:
    """Measure this machine (module docstring) for ``preset``'s shapes; returns its profile."""
    shape = from_preset(preset)
    layout = Layout(batch_size={"tiny": 8, "small": 16, "medium": 32}[preset])
    reps = 3 if quick else 20
    tokens = layout.batch_size * shape.seq_len
    gemm = gemm_rate(shape, tokens, reps)
    opt = optimizer_seconds_per_param(parameter_count(shape), reps)
    sizes = [8, 65536, 1 << 20] if quick else [8 << (2 * k) for k in range(11)]
    link = fit_alpha_beta(sweep(sizes, reps, timeout))
    steps = 3 if quick else 10
    step = measured_steps(preset, steps, 1, timeout)[0]
    together = max(measured_steps(preset, steps, 2, timeout))
    flops, blocks = rank_flops(shape, layout, 0)
    rest = step - flops / gemm - opt * parameter_count(shape)
    overhead = max(rest, 0.0) / (tokens * blocks * shape.d_model)
    cores = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // cores
    return Cluster(name="this", devices=cores, devices_per_node=cores, memory_bytes=memory,
                   peak_flops=gemm, gemm_flops=gemm, intra=link, inter=link,
                   overhead_s_per_token=overhead, optimizer_s_per_param=opt, power_w=power_w,
                   concurrent_fraction=min(1.0, step / together))


def calibrate_main(argv: list[str]) -> int:
    """The ``calibrate`` command line."""
    p = argparse.ArgumentParser(prog="python -m mpipar.plan calibrate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "small", "medium"), default="medium",
                   help="the preset whose shapes and step are measured (medium)")
    p.add_argument("--quick", action="store_true",
                   help="three sizes, three repeats, tiny steps: seconds, for tests")
    p.add_argument("--power-w", type=float, default=15.0,
                   help="stated power per device (core) for energy estimates (15 W)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"profile path (default {profile_path()}, or $MPIPAR_PROFILE)")
    args = p.parse_args(argv)
    if args.power_w <= 0:
        print(f"{p.prog}: error: --power-w must be positive, got {args.power_w}",
              file=sys.stderr)
        return 2
    cluster = calibrate(args.model, quick=args.quick, power_w=args.power_w)
    out = args.out or profile_path()
    save_cluster(cluster, out)
    print(f"matrix products {cluster.gemm_flops / 1e9:.3g} GFLOP/s; AdamW "
          f"{cluster.optimizer_s_per_param * 1e9:.3g} ns per parameter; MPI α "
          f"{cluster.intra.alpha * 1e6:.3g} µs, β {cluster.intra.beta / 1e9:.3g} GB/s; other "
          f"work {cluster.overhead_s_per_token * 1e9:.3g} ns per token·block·width; two "
          f"ranks at once keep {cluster.concurrent_fraction:.0%} of the rate")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # the workers `run_worker` starts under mpirun -n 2
    w = argparse.ArgumentParser()
    w.add_argument("--pingpong", required=True)
    w.add_argument("--reps", type=int, default=10)
    a = w.parse_args()
    points = pingpong([int(x) for x in a.pingpong.split(",")], a.reps)
    if int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))) == 0:
        print(json.dumps(points))
