"""Serial equivalence (docs/design.md §5) of many parallel layouts in one ``mpirun`` launch.

Usage: ``mpirun -n N python tests/mpi_scripts/equivalence.py '<json>'`` where the JSON is
``{"steps": S, "model": {...GPTConfig overrides}, "train": {...TrainConfig overrides},
"layouts": [{"name": ..., "dp": D, "tp": T, "pp": P, "train": {...overrides}}, ...]}``.

Every rank first trains the 1-process reference in-process (a 1 × 1 × 1 grid of its own, no
communication), then each layout on the whole world, and compares per-step losses and the
final parameters and optimizer state (assembled to full, 1-process shapes) with the
reference. Tolerance: relative 1e-10 in float64 (the reductions are merely reordered, so
differences are a few ulps amplified over a few steps), 1e-5 in float32. One ``VERDICT``
line reports every layout (see verdict.py).

A layout with ``"same_bits_as": NAME`` is also compared with the earlier layout NAME of the
same launch, with no tolerance at all: recomputation must not change a single bit.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
from verdict import Checks

from mpipar.comm import Comm
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid, validate_layout
from mpipar.model import GPTConfig
from mpipar.parallel.full_state import full_state
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow? "
) * 40

# Options that only change how the work is split, or what backward recomputes; the reference
# run uses the defaults.
PARALLEL_ONLY = ("microbatches", "ep", "schedule", "virtual_stages", "zero", "bucket_mb", "overlap",
                 "allreduce", "dp_strategy", "sequence_parallel", "recompute")


def run(cfg: GPTConfig, tc: TrainConfig, grid: ProcessGrid, data, steps: int):
    trainer = Trainer(cfg, tc, grid, data, Tracer(grid.world.rank))
    losses, norms = [], []
    for _ in range(steps):
        m = trainer.train_step()
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    model, optim = full_state(trainer.params, trainer.optimizer, grid, trainer.dtype)
    return np.array(losses), np.array(norms), model, optim, trainer


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def check_same_bits(checks: Checks, name: str, got: tuple, other: str, want: tuple) -> None:
    """Losses, grad norms, parameters and optimizer state of two layouts, bit for bit."""
    with checks.check(f"{name}: same bits as {other}"):
        for what, a, b in (("losses", got[0], want[0]), ("grad norms", got[1], want[1])):
            assert np.array_equal(a, b), f"{what} differ: {a.tolist()} vs {b.tolist()}"
        for what, state, ref in (("parameter", got[2], want[2]),
                                 ("optimizer state", got[3], want[3])):
            differ = [k for k in ref if not np.array_equal(state[k], ref[k])]
            assert not differ, f"{len(differ)} {what} arrays differ, e.g. {differ[:3]}"


def compare_with_reference(checks: Checks, name: str, got: tuple, ref: tuple,
                           tol: float) -> None:
    """Losses, grad norms, parameters and optimizer state against the 1-process run."""
    losses, norms, model, optim = got
    ref_losses, ref_norms, ref_model, ref_optim = ref
    with checks.check(f"{name}: losses"):
        d = rel_diff(losses, ref_losses)
        assert d <= tol, f"per-step losses differ by {d:.2e} (rel): {losses} vs {ref_losses}"
    with checks.check(f"{name}: grad norms"):
        d = rel_diff(norms, ref_norms)
        assert d <= tol, f"grad norms differ by {d:.2e} (rel): {norms} vs {ref_norms}"
    with checks.check(f"{name}: parameters"):
        assert sorted(model) == sorted(ref_model), "parameter names differ"
        worst = max((rel_diff(model[k], ref_model[k]), k) for k in ref_model)
        assert worst[0] <= tol, f"parameter {worst[1]} differs by {worst[0]:.2e} (rel)"
    with checks.check(f"{name}: optimizer state"):
        assert sorted(optim) == sorted(ref_optim), (
            f"optimizer state keys differ: {sorted(set(optim) ^ set(ref_optim))[:4]}")
        worst = max((rel_diff(optim[k], ref_optim[k]), k) for k in ref_optim)
        assert worst[0] <= tol, f"optimizer state {worst[1]} differs by {worst[0]:.2e}"


def setup(spec: dict) -> tuple[GPTConfig, TrainConfig, object]:
    """The model, the base training config and the data of a launch's spec."""
    cfg_kwargs = dict(vocab_size=0, n_layer=4, n_head=4, d_model=16, seq_len=8,
                      dtype="float64")
    cfg_kwargs.update(spec.get("model", {}))
    tok = CharTokenizer.from_text(TEXT)
    cfg_kwargs["vocab_size"] = spec.get("model", {}).get("vocab_size", tok.vocab_size)
    cfg = GPTConfig(**cfg_kwargs)
    data = make_dataset(TEXT, tok, seq_len=cfg.seq_len)
    base = TrainConfig(**{"batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "eval_every": 0,
                          "grad_clip": 1.0, **spec.get("train", {})})
    return cfg, base, data


def main() -> None:
    """``spec["reference"]`` (default true): false skips the 1-process runs, for a launch
    that checks only ``same_bits_as`` (float32, whose AdamW steps on near-zero gradients
    are rounding noise that the 1e-5 tolerance cannot hold)."""
    spec = json.loads(sys.argv[1])
    world = Comm.world(Tracer(0))
    checks = Checks(world)
    cfg, base, data = setup(spec)
    steps = spec.get("steps", 3)
    tol = 1e-10 if cfg.dtype == "float64" else 1e-5
    references, results = {}, {}
    for layout in spec["layouts"]:
        name = layout["name"]
        tc = replace(base, **layout.get("train", {}))
        dp, tp, pp = layout.get("dp", 1), layout.get("tp", 1), layout.get("pp", 1)
        cp = layout.get("cp", 1)  # context parallelism
        validate_layout(world.size, dp, tp, pp, batch_size=tc.batch_size,
                        microbatches=tc.microbatches, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        d_model=cfg.d_model, virtual_stages=tc.virtual_stages,
                        schedule=tc.schedule, zero=tc.zero,
                        sequence_parallel=tc.sequence_parallel, seq_len=cfg.seq_len,
                        allreduce=tc.allreduce, cp=cp)
        results[name] = run(cfg, tc, ProcessGrid.build(world, dp, tp, pp, cp), data,
                            steps)[:4]
        if "same_bits_as" in layout:
            other = layout["same_bits_as"]
            check_same_bits(checks, name, results[name], other, results[other])
        if spec.get("reference", True):
            ref_tc = replace(tc, **{k: getattr(TrainConfig(), k) for k in PARALLEL_ONLY})
            key = json.dumps(ref_tc.to_dict(), sort_keys=True)
            if key not in references:
                references[key] = run(cfg, ref_tc, ProcessGrid.single(), data, steps)[:4]
            compare_with_reference(checks, name, results[name], references[key], tol)
    checks.report()


if __name__ == "__main__":
    main()
