"""Inference on 2 processes: the KV cache's speed-up, and latency under tp = 2 and pp = 2.

    mpirun -n 2 python bench/bench_inference.py [--presets small medium] [--batches 1 16]
                                                [--json]

For each preset (random weights, vocabulary 65, float32, one BLAS thread per rank) and batch
size, a prompt of seq_len/2 tokens is continued by seq_len/2 greedy tokens, so the context
ends full. Three layouts take turns: rank 0 alone (rank 1 waits off the CPU, polling every
10 ms), tp = 2 and pp = 2; each with the KV cache and without it (every token recomputes the
whole context). Per configuration, the best of ``--repeats`` runs:

- **first token**: the prefill of the prompt and the first draw (time to first token);
- **per token**: the median time of each later step (one decode pass and a draw);
- **tokens/s**: batch × generated tokens ÷ the whole generation's time.

Then the communication of one decode step, from the trace of rank 0: tp = 2 all-reduces
(B, 1, d) twice per layer (after attention and after the MLP) plus once in the embedding and
all-gathers the logits; pp = 2 sends one (B, 1, d) activation per stage boundary and
broadcasts the logits (B, V).

What to expect on a CPU: decoding one token reads every weight to multiply one row, so it is
bound by memory bandwidth and per-call overheads, and the cache saves the recomputation of the
context, which grows with it. Splitting a tiny model over 2 processes adds a collective per
layer (tp) or a message per stage (pp) to every token, whose fixed cost can exceed the
arithmetic saved; a single sequence gains nothing from a pipeline (the stages wait for each
other), only the memory of holding half the weights.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
from machine import emit, format_machine, machine_info  # noqa: E402

from mpipar.comm import Comm, install_excepthook  # noqa: E402
from mpipar.decoding import Generator, SamplingConfig  # noqa: E402
from mpipar.grid import ProcessGrid  # noqa: E402
from mpipar.inference import InferenceModel  # noqa: E402
from mpipar.model import GPT, PRESETS, GPTConfig  # noqa: E402
from mpipar.trace import Tracer  # noqa: E402

NPROCS = 2  # bench/run_all.py launches this script with mpirun -n 2
VOCAB = 65
LAYOUTS = (("1 proc", 1, 1), ("tp 2", 2, 1), ("pp 2", 1, 2))


def model_state(preset: str) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    shape = {k: v for k, v in PRESETS[preset].items() if k != "batch_size"}
    cfg = GPTConfig(vocab_size=VOCAB, **shape)
    gpt = GPT(cfg)
    gpt.initialize(0)
    return cfg, {name: p.data for name, p in gpt.named_parameters()}


def timed(model: InferenceModel, prompts: list[list[int]], n: int, cache: bool,
          repeats: int) -> dict[str, float]:
    best = None
    for _ in range(repeats):
        gen = Generator(model, SamplingConfig(greedy=True), use_cache=cache)
        gen.run(prompts, n)
        s = gen.stats
        if best is None or s.total_s < best.total_s:
            best = s
    return {"first_token_ms": best.first_token_s * 1e3,
            "per_token_ms": statistics.median(best.step_s) * 1e3,
            "tokens_per_s": best.tokens / best.total_s}


def alone(world: Comm, run) -> dict | None:
    """``run()`` on rank 0 while rank 1 waits off the CPU; the result on rank 0."""
    done = np.zeros(1)
    if world.rank == 0:
        result = run()
        world.send(done, 1)
        return result
    request = world.irecv(done, 0)
    while not request.test():
        time.sleep(0.01)
    return None


def measure(world: Comm, cfg: GPTConfig, state, batch: int, cache: bool,
            repeats: int) -> list[dict]:
    """One row per layout for (cfg, batch, cache), on rank 0."""
    half = cfg.seq_len // 2
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, VOCAB, size=half).tolist() for _ in range(batch)]
    rows = []
    for name, tp, pp in LAYOUTS:
        if tp * pp == 1:
            def run():
                model = InferenceModel(cfg, ProcessGrid.single())
                model.load(state)
                return timed(model, prompts, half, cache, repeats)
            figures = alone(world, run)
        else:
            model = InferenceModel(cfg, ProcessGrid.build(world, 1, tp, pp))
            model.load(state)
            figures = timed(model, prompts, half, cache, repeats)
        rows.append({"layout": name, "batch": batch, "cache": cache, **(figures or {})})
    return rows


def decode_step_traffic(world: Comm, cfg: GPTConfig, state) -> dict[str, str]:
    """Rank 0's calls in one decode step of batch 1, for tp 2 and pp 2."""
    out = {}
    for name, tp, pp in LAYOUTS[1:]:
        model = InferenceModel(cfg, ProcessGrid.build(world, 1, tp, pp))
        model.load(state)
        world.tracer.records.clear()
        world.tracer.enabled = True
        Generator(model, SamplingConfig(greedy=True)).run([[1, 2, 3]], 3)
        world.tracer.enabled = False
        calls = Counter((r.op, r.group, tuple(r.shape), r.nbytes)
                        for r in world.tracer.records if r.step == 1 and r.op != "compute")
        out[name] = ", ".join(f"{n} × {op} {group} {list(shape)} ({nbytes} B)"
                              for (op, group, shape, nbytes), n in sorted(calls.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["small", "medium"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration (best)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args()
    world = Comm.world(Tracer(0))
    world.tracer.rank = world.rank
    install_excepthook(world)
    if world.size != 2:
        raise SystemExit("run with mpirun -n 2")
    if world.rank == 0:
        print(format_machine(machine_info()))
    for preset in args.presets:
        cfg, state = model_state(preset)
        rows = [row for batch in args.batches for cache in (True, False)
                for row in measure(world, cfg, state, batch, cache, args.repeats)]
        traffic = decode_step_traffic(world, cfg, state)
        if world.rank == 0:
            report(preset, cfg, rows, traffic, args.json)


def report(preset: str, cfg: GPTConfig, rows: list[dict], traffic: dict, as_json: bool) -> None:
    half = cfg.seq_len // 2
    print(f"\n{preset}: {cfg.n_layer} layers, d_model {cfg.d_model}; prompt {half} tokens, "
          f"{half} generated (greedy)")
    print(f"{'batch':>5}  {'layout':<7} {'cache':<5} {'first token':>12} {'per token':>10} "
          f"{'tokens/s':>9}  {'cache speed-up':>14}")
    uncached = {(r["batch"], r["layout"]): r for r in rows if not r["cache"]}
    for r in rows:
        speedup = ""
        if r["cache"]:
            ref = uncached[(r["batch"], r["layout"])]
            speedup = f"{r['tokens_per_s'] / ref['tokens_per_s']:.1f}×"
        print(f"{r['batch']:>5}  {r['layout']:<7} {'on' if r['cache'] else 'off':<5} "
              f"{r['first_token_ms']:>9.1f} ms {r['per_token_ms']:>7.2f} ms "
              f"{r['tokens_per_s']:>9.0f}  {speedup:>14}")
        if as_json:
            print(json.dumps({"preset": preset, **r}))
        emit("inference", f"{preset} batch {r['batch']} {r['layout']} cache "
             f"{'on' if r['cache'] else 'off'}", r)
    for name, calls in traffic.items():
        print(f"one decode step, rank 0, {name}: {calls}")


if __name__ == "__main__":
    main()
