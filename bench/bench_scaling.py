"""How the cost of a training step grows: with the model, and with the number of processes.

    python bench/bench_scaling.py [--steps 4] [--nprocs 1 2 4 8] [--out bench/figures]

Trains, through ``train.py`` (float32, AdamW, one BLAS thread per process, the built-in
corpus), the presets ``tiny`` → ``small`` → ``medium`` and a larger model (6 layers, 6 heads,
d_model 384, seq_len 256, batch 16), each with data parallelism over 1, 2, 4 and 8
processes, and records the median step time and tokens/s (the first step left out) against
the model's training FLOPs per token (:func:`mpipar.model.flops_per_token`).

On a machine with fewer cores than processes the extra processes share cores: those runs are
labelled *oversubscribed*. They show what sharing costs (every data-parallel step waits for
the slowest rank, and a rank waiting in MPI spins on its core), not how the code scales.

Writes ``scaling.png`` (tokens/s and step time against FLOPs per token, one line per
process count; needs matplotlib, the ``viz`` extra) and ``scaling.jsonl`` (one line per run)
into ``--out``, prints the table, and appends each run to the results file of
``bench/run_all.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import emit, format_machine, machine_info
from run_all import mpirun

NPROCS = 1  # the script starts its own runs of train.py
REPO = Path(__file__).resolve().parent.parent
LARGER = {"n_layer": 6, "n_head": 6, "d_model": 384, "seq_len": 256, "batch_size": 16}


def models() -> dict[str, dict[str, int]]:
    """The model shapes measured, smallest first (``PRESETS`` plus :data:`LARGER`)."""
    from mpipar.model import PRESETS

    return {**PRESETS, "larger": LARGER}


def shape_flags(shape: dict[str, int]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]


def run_train(shape: dict[str, int], nprocs: int, steps: int) -> dict:
    """The summary line of one ``train.py`` run (``median_step_time_s``, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        args = [sys.executable, str(REPO / "train.py"), *shape_flags(shape), "--steps",
                str(steps), "--eval-every", "0", "--eval-tokens", "1", "--quiet",
                "--metrics", metrics]
        cmd = args if nprocs == 1 else [mpirun(), "-n", str(nprocs), *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=str(REPO))
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(metrics, encoding="utf-8") as f:
            return [json.loads(line) for line in f][-1]


def measure(names: list[str], nprocs: list[int], steps: int) -> list[dict]:
    from mpipar.model import GPTConfig, flops_per_token

    cores = os.cpu_count() or 1
    rows = []
    for name in names:
        shape = models()[name]
        cfg = GPTConfig(**{k: v for k, v in shape.items() if k != "batch_size"})
        for n in nprocs:
            summary = run_train(shape, n, steps)
            rows.append({"model": name, "processes": n, "oversubscribed": n > cores,
                         "flops_per_token": flops_per_token(cfg),
                         "step_time_s": summary["median_step_time_s"],
                         "tokens_per_s": summary["tokens_per_s"]})
            print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict) -> str:
    label = f"{r['processes']}" + (" (oversubscribed)" if r["oversubscribed"] else "")
    return (f"{r['model']:8} {r['flops_per_token'] / 1e6:12.2f} {label:>20} "
            f"{r['step_time_s'] * 1e3:10.1f} {r['tokens_per_s']:10.0f}")


def plot(rows: list[dict], path: Path, machine: str) -> bool:
    """tokens/s and step time against FLOPs per token; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in sorted({r["processes"] for r in rows}):
        mine = [r for r in rows if r["processes"] == n]
        x = [r["flops_per_token"] for r in mine]
        label = f"{n} process{'es' if n > 1 else ''}" + (
            " (oversubscribed)" if mine[0]["oversubscribed"] else "")
        style = "--" if mine[0]["oversubscribed"] else "-"
        axes[0].plot(x, [r["tokens_per_s"] for r in mine], style, marker="o", label=label)
        axes[1].plot(x, [r["step_time_s"] for r in mine], style, marker="o", label=label)
    for r in rows:
        if r["processes"] == rows[0]["processes"]:
            axes[0].annotate(r["model"], (r["flops_per_token"], r["tokens_per_s"]),
                             textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, what in zip(axes, ("tokens/s", "step time (s)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training FLOPs per token")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mpipar data parallelism, float32, 1 BLAS thread per process; {machine}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first left out)")
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--models", nargs="+", default=list(models()), choices=list(models()))
    ap.add_argument("--out", default=str(REPO / "bench" / "figures"),
                    help="directory for scaling.png and scaling.jsonl")
    args = ap.parse_args(argv)
    info = machine_info()
    print(format_machine(info))
    print(f"{'model':8} {'MFLOP/token':>12} {'processes':>20} {'ms/step':>10} {'tokens/s':>10}")
    rows = measure(args.models, args.nprocs, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scaling.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({**r, "machine": info}) + "\n")
            emit("scaling", f"{r['model']} x{r['processes']}", r, info)
    machine = (f"{info['cpu']}, {info['cores']} cores, {info['blas'].get('kernel') or 'BLAS'}, "
               f"load average {info['load_avg'][0]:.1f} at the start")
    drawn = plot(rows, out / "scaling.png", machine)
    print(f"wrote {out / 'scaling.jsonl'}" + (f" and {out / 'scaling.png'}" if drawn else
                                              " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
