"""Tensor parallelism on 2 processes: throughput against 1 process, communication, memory.

    mpirun -n 2 python bench/bench_tensor_parallel.py [--preset medium] [--steps 20] [--json]
    mpirun -n 2 python bench/bench_tensor_parallel.py --memory-only [--preset tiny]
    python bench/bench_tensor_parallel.py --memory-only      (computed figures only)

1. **Throughput.** The ``medium`` preset (vocabulary 65, random tokens, float32, AdamW, one
   BLAS thread per rank) is trained three ways, taking turns step by step: by rank 0 alone
   (the 1-process baseline) while rank 1 sleeps (it polls for rank 0's "done" every 10 ms
   rather than spinning inside MPI, so the baseline has a core to itself), by both ranks
   with tp = 2, and with tp = 2 and sequence parallelism. ``--warmup`` unmeasured steps, then
   ``--steps`` measured ones; the figures are medians of whole training steps (forward,
   backward, gradient norm, optimizer), in wall-clock and in CPU time. Target: tp = 2 at
   ≥ 1.8× the 1-process tokens/s.
2. **Communication share.** From the tp = 2 run's trace: per measured step, the seconds rank 0
   spent inside tensor-parallel collectives, split by phase, as a share of its step time. A
   blocking collective's time includes waiting for the other rank to arrive, so load
   imbalance shows up here too.
3. **Memory per rank** for tp = 1, 2, 4, with and without sequence parallelism: parameter
   bytes (rank 0's shards, padding included; built without communicating) and the bytes of
   activations kept for backward. Those are computed from :func:`activation_bytes_formula`
   and, where this job can run the layout (tp = 1 and 2), also measured by walking the
   autograd graph of a real forward pass and adding up every distinct array saved for
   backward (:func:`mpipar.autograd.graph_nbytes`); the two columns must agree.

One BLAS thread per rank is set before numpy is imported, as ``train.py`` does under MPI.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from machine import emit, format_machine, machine_info  # noqa: E402

from mpipar.autograd import graph_nbytes  # noqa: E402
from mpipar.comm import Comm, install_excepthook  # noqa: E402
from mpipar.data import CharTokenizer, Dataset, get_batch  # noqa: E402
from mpipar.grid import ProcessGrid  # noqa: E402
from mpipar.model import GPT, PRESETS, GPTConfig  # noqa: E402
from mpipar.parallel.tensor_parallel import TensorParallelLayers  # noqa: E402
from mpipar.trace import COMPUTE, Tracer  # noqa: E402
from mpipar.training import TrainConfig, Trainer  # noqa: E402

NPROCS = 2  # bench/run_all.py launches this script with mpirun -n 2
VOCAB = 65
TARGET = 1.8
MIB = 2**20


def random_dataset(n_tokens: int, seed: int = 0) -> Dataset:
    """Uniformly random tokens over a 65-character vocabulary (speed does not depend on text)."""
    tokens = np.random.default_rng(seed).integers(0, VOCAB, size=n_tokens).astype(np.int32)
    chars = [chr(c) for c in range(32, 32 + VOCAB)]
    split = n_tokens * 9 // 10
    return Dataset(train=tokens[:split], val=tokens[split:],
                   tokenizer=CharTokenizer.from_chars(chars))


def preset_config(name: str, dtype: str = "float32") -> tuple[GPTConfig, int]:
    shape = dict(PRESETS[name])
    batch = shape.pop("batch_size")
    return GPTConfig(vocab_size=VOCAB, dtype=dtype, **shape), batch


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def activation_bytes_formula(cfg: GPTConfig, batch: int, tp: int, sp: bool) -> int:
    """Bytes that one rank's forward pass keeps for backward (no dropout), term by term.

    With B = batch, T = seq_len, d = d_model, H = heads, t = tp and s = t under sequence
    parallelism (else 1), a layer keeps, per rank, in elements of the model's dtype:

        2 LayerNorms: normalised input (B, T/s, d) and 1/σ (B, T/s, 1)     2·(BTd + BT)/s
        inputs of qkv and fc (the LayerNorm outputs; under sequence
          parallelism only this rank's piece, all-gathered again)          2·BTd/s
        q, k, v (B, T, 3d/t); probabilities (B, H/t, T, T)                  3·BTd/t + BHT²/t
        attention output, input of proj (B, T, d/t)                         BTd/t
        GELU input and 1 + tanh, input of the MLP's proj (B, T, 4d/t) each  12·BTd/t

    i.e. BTd·(4/s + 16/t) + 2BT/s + BHT²/t. Without tensor parallelism that is
    20·BTd + 2BT + BHT²; tensor parallelism divides all but the LayerNorm part, 4·BTd + 2BT;
    sequence parallelism divides that too (Korthikanti et al. 2022 count the same terms, in
    16-bit numbers with 1-byte dropout masks, as sbh(10 + 24/t + 5as/(ht)) and
    sbh(34/t + 5as/(ht))). Around the blocks: ln_f like a LayerNorm above; the head's input
    h (B, T, d), whole on every rank; the softmax over this rank's padded vocabulary
    (B·T, V'/t); and integer token indices (8 bytes) and masks (1 byte).
    """
    e = np.dtype(cfg.dtype).itemsize
    b, t_len, d, h = batch, cfg.seq_len, cfg.d_model, cfg.n_head
    s = tp if sp and tp > 1 else 1
    btd, bt = b * t_len * d, b * t_len
    layer = btd * (4 / s + 16 / tp) + 2 * bt / s + b * h * t_len * t_len / tp
    v_local = math.ceil(cfg.vocab_size / tp)
    around = (btd + bt) / s + btd + bt * v_local  # ln_f, head input, softmax
    floats = cfg.n_layer * layer + around
    if tp == 1:  # wte and wpe lookups keep their indices; the loss its targets and row numbers
        ints = 8 * (bt + t_len) + 8 * (bt + bt)
    else:  # the vocab-split lookup keeps local indices and a mask; so does the loss
        ints = (8 * bt + bt) + 8 * t_len + (8 * bt + bt)
    return int(round(floats * e + ints))


def parameter_bytes(cfg: GPTConfig, tp: int, sp: bool) -> int:
    """Bytes of the parameters rank 0 holds (built with a stand-in group: no communication)."""
    if tp == 1:
        model = GPT(cfg)
    else:
        group = SimpleNamespace(size=tp, rank=0)
        model = GPT(cfg, TensorParallelLayers(group, np.dtype(cfg.dtype), sequence_parallel=sp))
    return sum(p.data.nbytes for p in model.parameters())


def measured_activation_bytes(trainer: Trainer, cfg: GPTConfig, batch: int) -> int:
    """One forward pass of ``trainer``'s model on a real batch; bytes saved for backward."""
    x, y = get_batch(trainer.data.train, batch, cfg.seq_len, 0, 0)
    model = trainer.chunks[0]
    loss = model(x, y)
    return graph_nbytes(loss, exclude=[p.data for p in model.parameters()])


# ---------------------------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------------------------
def timed_step(trainer: Trainer, tracer: Tracer | None = None) -> dict[str, Any]:
    """One training step: its metrics, CPU seconds and (traced) tp communication seconds."""
    if tracer is not None:
        tracer.records.clear()
        tracer.enabled = True
    cpu = time.process_time()
    m = trainer.train_step()
    m["cpu_s"] = time.process_time() - cpu
    if tracer is not None:
        tracer.enabled = False
        for phase in ("forward", "backward"):
            m[f"tp_{phase}_s"] = sum(r.duration for r in tracer.records
                                     if r.op != COMPUTE and r.group == "tp" and r.phase == phase)
    return m


def serial_step_on_rank0(world: Comm, trainer: Trainer | None) -> dict[str, Any] | None:
    """Rank 0 trains one 1-process step while the other ranks sleep until it is done."""
    flag = np.zeros(1, dtype=np.int64)
    if world.rank == 0:
        m = timed_step(trainer)
        for dest in range(1, world.size):
            world.send(flag, dest)
        return m
    request = world.irecv(flag, 0)
    while not request.test():  # sleep instead of spinning in MPI: leave rank 0 its core
        time.sleep(0.01)
    return None


def serial_trainer(cfg: GPTConfig, batch: int, data: Dataset, steps: int) -> Trainer:
    """The 1-process model on this rank alone (a 1 × 1 × 1 grid: no communication)."""
    tc = TrainConfig(steps=steps, batch_size=batch, eval_every=0)
    return Trainer(cfg, tc, ProcessGrid.single(), data, Tracer(0))


def tp_trainer(world: Comm, cfg: GPTConfig, batch: int, data: Dataset, steps: int,
               sp: bool) -> Trainer:
    """tp = world size (collective: every rank calls it)."""
    tc = TrainConfig(steps=steps, batch_size=batch, eval_every=0, sequence_parallel=sp)
    grid = ProcessGrid.build(world, 1, world.size, 1)
    return Trainer(cfg, tc, grid, data, world.tracer)


def interleaved_runs(world: Comm, cfg: GPTConfig, batch: int, data: Dataset, warmup: int,
                     steps: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int | None]]:
    """Train the three layouts a step at a time in turn: 1 process, tp 2, tp 2 + sequence
    parallelism. Taking turns step by step, rather than one layout after the other, means a
    change in what else the machine is doing affects all three alike."""
    n = warmup + steps
    trainers = {"tp1": serial_trainer(cfg, batch, data, n) if world.rank == 0 else None,
                "tp2": tp_trainer(world, cfg, batch, data, n, sp=False),
                "tp2_sp": tp_trainer(world, cfg, batch, data, n, sp=True)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trainers}
    for i in range(n):
        results = {"tp1": serial_step_on_rank0(world, trainers["tp1"]),
                   "tp2": timed_step(trainers["tp2"], world.tracer),
                   "tp2_sp": timed_step(trainers["tp2_sp"], world.tracer)}
        if i >= warmup:
            for name, m in results.items():
                runs[name].append(m)
    activations = {name: None if t is None else measured_activation_bytes(t, cfg, batch)
                   for name, t in trainers.items()}
    return runs, activations


def median(metrics: list[dict[str, Any]], key: str) -> float:
    return float(np.median([m[key] for m in metrics]))


# ---------------------------------------------------------------------------------------------
def memory_table(cfg: GPTConfig, batch: int, measured: dict[tuple[int, bool], int]) -> list:
    rows = []
    for tp in (1, 2, 4):
        for sp in ((False,) if tp == 1 else (False, True)):
            rows.append({"tp": tp, "sequence_parallel": sp,
                         "parameter_bytes": parameter_bytes(cfg, tp, sp),
                         "activation_bytes": activation_bytes_formula(cfg, batch, tp, sp),
                         "activation_bytes_measured": measured.get((tp, sp))})
    return rows


def print_memory(rows: list[dict[str, Any]], cfg: GPTConfig, batch: int) -> None:
    print(f"memory per rank, {cfg.n_layer} layers, d_model {cfg.d_model}, seq_len "
          f"{cfg.seq_len}, batch {batch}, {cfg.dtype}:")
    print(f"{'tp':>3} {'seq-par':>8} {'params MiB':>11} {'activations MiB':>16} "
          f"{'measured MiB':>13} {'vs tp 1':>8}")
    base = rows[0]["activation_bytes"]
    for r in rows:
        meas = r["activation_bytes_measured"]
        meas_text = f"{meas / MIB:13.2f}" if meas is not None else f"{'-':>13}"
        print(f"{r['tp']:3d} {'yes' if r['sequence_parallel'] else 'no':>8} "
              f"{r['parameter_bytes'] / MIB:11.3f} {r['activation_bytes'] / MIB:16.2f} "
              f"{meas_text} {r['activation_bytes'] / base:8.1%}")


def throughput_figures(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict]:
    """Medians per layout: step and CPU seconds, speedup, tp communication by phase."""
    t1 = median(runs["tp1"], "step_time_s")
    fig: dict[str, dict] = {"step_time_s": {}, "cpu_time_s": {}, "speedup": {},
                            "tp_comm_s": {}}
    for name, metrics in runs.items():
        t = median(metrics, "step_time_s")
        fig["step_time_s"][name] = t
        fig["cpu_time_s"][name] = median(metrics, "cpu_s")
        if name != "tp1":
            fig["speedup"][name] = t1 / t
            fig["tp_comm_s"][name] = {"forward": median(metrics, "tp_forward_s"),
                                      "backward": median(metrics, "tp_backward_s")}
    return fig


def print_throughput(fig: dict[str, dict], tokens: int, load: tuple[float, float]) -> None:
    t1, c1 = fig["step_time_s"]["tp1"], fig["cpu_time_s"]["tp1"]
    print(f"{'layout':18} {'step ms':>8} {'tokens/s':>9} {'vs 1 proc':>9} {'cpu ms':>7} "
          f"{'(ratio)':>8} {'tp comm ms':>11} {'fwd':>6} {'bwd':>6} {'share':>6}")
    print(f"{'1 process':18} {t1 * 1e3:8.1f} {tokens / t1:9.0f} {1.0:8.2f}x {c1 * 1e3:7.1f} "
          f"{1.0:7.2f}x")
    for name, key in (("tp 2", "tp2"), ("tp 2 seq-parallel", "tp2_sp")):
        t, c, r = fig["step_time_s"][key], fig["cpu_time_s"][key], fig["speedup"][key]
        f, b = fig["tp_comm_s"][key]["forward"], fig["tp_comm_s"][key]["backward"]
        print(f"{name:18} {t * 1e3:8.1f} {tokens / t:9.0f} {r:8.2f}x {c * 1e3:7.1f} "
              f"{c1 / c:7.2f}x {(f + b) * 1e3:11.1f} {f * 1e3:6.1f} {b * 1e3:6.1f} "
              f"{(f + b) / t:6.1%}")
    print(f"cpu ms: rank 0's CPU time per step (MPI's busy waiting included), roughly what "
          f"the step takes when each rank has a core of its own. Load average "
          f"{load[0]:.1f} before, {load[1]:.1f} after: above ~2 on 2 cores, other "
          f"programs shared the cores, and the wall-clock figures are suspect.")
    ratio = fig["speedup"]["tp2"]
    verdict = "meets" if ratio >= TARGET else "misses"
    print(f"tp 2 runs at {ratio:.2f}x the 1-process throughput: {verdict} the {TARGET}x target")


def memory_only(world: Comm, cfg: GPTConfig, batch: int, data: Dataset) -> None:
    """The memory table with activations measured for tp = 1 and tp = 2 (with and without
    sequence parallelism)."""
    act1 = measured_activation_bytes(serial_trainer(cfg, batch, data, 1), cfg, batch)
    measured = {(1, False): act1}
    for sp in (False, True):
        trainer = tp_trainer(world, cfg, batch, data, 1, sp)
        measured[(2, sp)] = measured_activation_bytes(trainer, cfg, batch)
    if world.rank == 0:
        print_memory(memory_table(cfg, batch, measured), cfg, batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per layout")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the memory table (measured too under mpirun -n 2)")
    ap.add_argument("--json", action="store_true", help="also print one JSON summary line")
    args = ap.parse_args(argv)
    cfg, batch = preset_config(args.preset)

    world = Comm.world(Tracer(0))
    install_excepthook(world)
    if args.memory_only and world.size == 1:  # computed only: nothing to measure it with
        print_memory(memory_table(cfg, batch, {}), cfg, batch)
        return 0
    if world.size != 2:
        if world.rank == 0:
            print(f"bench_tensor_parallel.py needs mpirun -n 2, got {world.size} processes")
        return 2
    world.tracer.rank = world.rank
    data = random_dataset(400_000)
    if args.memory_only:
        memory_only(world, cfg, batch, data)
        return 0

    load_before = os.getloadavg()[0]
    info = machine_info()
    runs, acts = interleaved_runs(world, cfg, batch, data, args.warmup, args.steps)
    if world.rank != 0:
        return 0
    fig = throughput_figures(runs)
    emit("tensor_parallel", args.preset, {
        **{f"step_time_s_{k}": v for k, v in fig["step_time_s"].items()},
        **{f"cpu_time_s_{k}": v for k, v in fig["cpu_time_s"].items()},
        **{f"speedup_{k}": v for k, v in fig["speedup"].items()}}, info)
    print(format_machine(info))
    rows = memory_table(cfg, batch, {(1, False): acts["tp1"], (2, False): acts["tp2"],
                                     (2, True): acts["tp2_sp"]})
    print(f"tensor parallelism, preset {args.preset} (vocab {VOCAB}, batch {batch}, "
          f"{cfg.dtype}, AdamW), 1 BLAS thread per rank; medians of {args.steps} steps after "
          f"{args.warmup} warm-up, the layouts taking turns step by step")
    load = (load_before, os.getloadavg()[0])
    print_throughput(fig, batch * cfg.seq_len, load)
    print()
    print_memory(rows, cfg, batch)
    if args.json:
        print(json.dumps({"preset": args.preset, "batch_size": batch, "steps": args.steps,
                          **fig, "load_average": list(load), "memory": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
