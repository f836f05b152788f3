"""fp32 against bf16 and fp16 (``--precision``) on one CPU core: time, memory and the loss.

Two measurements:

* **speed and memory** (``--presets``, default ``medium``): for each precision, the median
  step time over ``--steps`` steps after ``--warmup`` (random tokens, vocabulary 65, AdamW,
  one BLAS thread), by the wall clock and in CPU time (which a busy machine disturbs less);
  the bytes of the model state per rank (16-bit or fp32 parameters and gradients, the fp32
  optimizer state with the masters), the activation memory one forward pass keeps for
  backward (every array its autograd graph saved, parameters excluded), and the peak of
  numpy's allocations during a step (``tracemalloc``);
* **tracking** (``--track-steps``, default 300 steps of ``small`` on the built-in corpus): the
  per-step losses of each 16-bit run against the fp32 run, smoothed over ``--window`` steps
  (single steps are noisy: two runs that round differently take different paths through the
  same loss landscape), and the final validation loss.

On a CPU the 16-bit runs are *slower*: numpy has no 16-bit matrix product (mpipar computes
each one in fp32 and rounds it, :func:`mpipar.precision.matmul`), so every 16-bit product
costs the fp32 one plus the casts, and numpy's element-wise float16 and bfloat16 loops
convert each element to float and back. What half precision buys here is memory: half the
activation bytes and half the communicated bytes. On a GPU it also buys speed.

Run: ``python bench/bench_precision.py [--json] [--presets medium] [--steps 5]
[--track-steps 300]`` (``--track-steps 0`` skips the tracking).
"""

from __future__ import annotations

import os

# One BLAS thread: the figures are per core. Set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
from bench_single import random_dataset  # noqa: E402

from mpipar.autograd import graph_nbytes  # noqa: E402
from mpipar.data import CharTokenizer, default_corpus, get_batch, make_dataset  # noqa: E402
from mpipar.grid import ProcessGrid  # noqa: E402
from mpipar.model import PRESETS, GPTConfig  # noqa: E402
from mpipar.parallel.zero import memory_report  # noqa: E402
from mpipar.trace import Tracer  # noqa: E402
from mpipar.training import TrainConfig, Trainer  # noqa: E402

NPROCS = 1  # bench/run_all.py launches this script with one process
PRECISIONS = ("fp32", "bf16", "fp16")
MIB = 2**20


def trainer_for(preset: str, precision: str, steps: int, data=None) -> Trainer:
    """A 1-process trainer of ``preset`` in ``precision`` (random tokens unless ``data``)."""
    shape = dict(PRESETS[preset])
    batch = shape.pop("batch_size")
    data = data if data is not None else random_dataset(400_000)
    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, **shape)
    tc = TrainConfig(steps=steps, batch_size=batch, eval_every=0, precision=precision)
    return Trainer(cfg, tc, ProcessGrid.single(), data, Tracer(0))


def activation_bytes(trainer: Trainer) -> int:
    """Bytes one forward pass of a training batch keeps for backward (parameters excluded)."""
    tc = trainer.tc
    batch = get_batch(trainer.data.train, tc.batch_size, trainer.cfg.seq_len, tc.seed, 0)
    xs, ys = trainer.microbatches(*batch)
    loss = trainer.chunks[0](xs[0], ys[0])
    return graph_nbytes(loss, exclude=[p.data for p in trainer.params])


def bench_speed(preset: str, precision: str, steps: int, warmup: int) -> dict:
    """Median step time, model-state and activation bytes, and a step's allocation peak."""
    trainer = trainer_for(preset, precision, warmup + steps + 1)
    wall, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    tracemalloc.start()
    trainer.train_step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    r = memory_report(trainer.optimizer, trainer.grad_sync, trainer.params)
    n = r["params"]
    params = n * trainer.precision.compute.itemsize
    return {"preset": preset, "precision": precision, "params": n,
            "median_step_time_s": float(np.median(wall)),
            "cpu_median_step_time_s": float(np.median(cpu)),
            "parameter_bytes": params, "gradient_bytes": r["grad_bytes"],
            "optimizer_state_bytes": r["optimizer_state_bytes"],
            "bytes_per_parameter": (params + r["grad_bytes"] + r["optimizer_state_bytes"]) / n,
            "activation_bytes": activation_bytes(trainer), "step_peak_bytes": peak}


def track(steps: int, window: int) -> list[dict]:
    """Losses of ``steps`` steps of ``small`` on the built-in corpus, per precision, compared
    with fp32's: the largest gap of the ``window``-step moving averages, and final val loss."""
    text, _ = default_corpus()
    tok = CharTokenizer.from_text(text)
    data = make_dataset(text, tok, seq_len=PRESETS["small"]["seq_len"])
    runs = {}
    for precision in PRECISIONS:
        trainer = trainer_for("small", precision, steps, data)
        records = [trainer.train_step() for _ in range(steps)]
        runs[precision] = (np.array([m["loss"] for m in records]), trainer.evaluate(),
                           sum(bool(m.get("skipped")) for m in records))
    kernel = np.ones(window) / window
    ref = np.convolve(runs["fp32"][0], kernel, mode="valid")
    out = []
    for precision, (losses, val, skipped) in runs.items():
        smooth = np.convolve(losses, kernel, mode="valid")
        out.append({"precision": precision, "steps": steps, "window": window,
                    "final_loss": float(smooth[-1]), "val_loss": val,
                    "max_smoothed_gap": float(np.max(np.abs(smooth - ref))),
                    "final_gap": float(smooth[-1] - ref[-1]),
                    "val_gap": val - runs["fp32"][1], "skipped_steps": skipped})
    return out


def print_tables(speed: list[dict], tracking: list[dict]) -> None:
    print(f"{'preset':7} {'precision':9} {'step ms':>8} {'cpu ms':>7} {'× fp32':>7} {'params':>9} "
          f"{'grads':>9} {'optimizer':>10} {'B/param':>7} {'activations':>11} {'step peak':>10}")
    base = {r["preset"]: r["cpu_median_step_time_s"] for r in speed if r["precision"] == "fp32"}
    for r in speed:
        print(f"{r['preset']:7} {r['precision']:9} {r['median_step_time_s'] * 1e3:8.0f} "
              f"{r['cpu_median_step_time_s'] * 1e3:7.0f} "
              f"{r['cpu_median_step_time_s'] / base[r['preset']]:7.2f} "
              f"{r['parameter_bytes'] / MIB:7.2f}Mi {r['gradient_bytes'] / MIB:7.2f}Mi "
              f"{r['optimizer_state_bytes'] / MIB:8.2f}Mi {r['bytes_per_parameter']:7.0f} "
              f"{r['activation_bytes'] / MIB:9.1f}Mi {r['step_peak_bytes'] / MIB:8.1f}Mi")
    if tracking:
        print(f"\nsmall, {tracking[0]['steps']} steps, losses smoothed over "
              f"{tracking[0]['window']} steps")
        print(f"{'precision':9} {'final loss':>10} {'val loss':>9} {'max gap':>8} "
              f"{'final gap':>9} {'val gap':>8} {'skipped':>7}")
        for t in tracking:
            print(f"{t['precision']:9} {t['final_loss']:10.4f} {t['val_loss']:9.4f} "
                  f"{t['max_smoothed_gap']:8.4f} {t['final_gap']:+9.4f} {t['val_gap']:+8.4f} "
                  f"{t['skipped_steps']:7d}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["medium"])
    ap.add_argument("--steps", type=int, default=5, help="measured steps per precision")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    ap.add_argument("--track-steps", type=int, default=300,
                    help="steps of the small preset per precision for the loss comparison "
                         "(0: skip it)")
    ap.add_argument("--window", type=int, default=25, help="moving average of the losses")
    ap.add_argument("--json", action="store_true", help="print one JSON record per line")
    args = ap.parse_args(argv)
    speed = [bench_speed(p, precision, args.steps, args.warmup)
             for p in args.presets for precision in PRECISIONS]
    tracking = track(args.track_steps, args.window) if args.track_steps else []
    if args.json:
        for r in speed + tracking:
            print(json.dumps(r))
    else:
        print_tables(speed, tracking)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
