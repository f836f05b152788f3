"""Mixed precision on 2 ranks: the parallel runs against the 1-process run, the overflow vote,
the halved gradient bytes and bfloat16 collectives, in one ``mpirun -n 2`` launch.

Usage: ``mpirun -n 2 python tests/mpi_scripts/precision_checks.py``; one ``VERDICT`` line
(see verdict.py).

Equivalence. A parallel mixed-precision run is compared with the 1-process run *of the same
rounding points* where one exists: the reference accumulates the same dp × M microbatches one
after the other, so each gradient is the 16-bit sum of the same 16-bit terms (a sum of two is
the same in either order) and the halving that averages two replicas is exact (a power of
two). bf16 with dp = 2 is then float-exact: losses, fp32 masters and moments equal the
reference's bit for bit. Elsewhere some rounding point moves:

* fp16, dp = 2: halving a gradient is exact in bf16 but not for fp16's subnormals (below
  6.1e-5, which have fewer bits), so those elements differ by one unit;
* ZeRO: the squares of the gradient norm are summed in another order (float64), so the
  clipping factor, and then a few fp32 masters, differ in their last bit;
* pp = 2: the tied embedding's two gradient terms are summed per stage first, then across
  stages, where one process adds each microbatch's two terms first;
* tp = 2: each rank rounds its partial product to 16 bits before the all-reduce adds them,
  where one process rounds the whole sum once.

For these the losses must agree within one unit in the last place of the compute dtype,
relative (2⁻⁸ in bf16, 2⁻¹¹ in fp16): what a lost all-reduce or a wrong scale would break by
orders of magnitude. The masters may differ more where a gradient element is near 0: AdamW
divides by its running size, so any difference can flip the sign of that element's update,
which is at most about lr per step; they must agree within 2 Σₜ lrₜ.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np
from verdict import Checks

from mpipar.comm import Comm
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig
from mpipar.precision import BFLOAT16, FLOAT32
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow? "
) * 40
STEPS = 4

EXACT = {("bf16", "dp2")}  # the same rounding points as the reference (module docstring)
UNIT = {"bf16": 2.0**-8, "fp16": 2.0**-11}  # a unit in the last place, relative


def setup() -> tuple[GPTConfig, object]:
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=16, seq_len=8)
    return cfg, make_dataset(TEXT, tok, seq_len=cfg.seq_len)


def base_config(**changes) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "eval_every": 0,
                          "steps": STEPS, **changes})


def run(cfg, tc, grid, data, before_update=None):
    """Train STEPS steps; (losses, masters, optimizer state, metrics, trainer)."""
    grid.world.tracer.records.clear()  # the trace of this run alone
    trainer = Trainer(cfg, tc, grid, data, grid.world.tracer)
    if before_update is not None:
        finish = trainer.finish_gradients

        def finish_then_hook():
            finish()
            before_update(trainer)

        trainer.finish_gradients = finish_then_hook
    records = [trainer.train_step() for _ in range(tc.steps)]
    model, optim = trainer.full_state()
    return np.array([r["loss"] for r in records]), model, optim, records, trainer


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def worst(state, ref) -> tuple[float, str]:
    assert sorted(state) == sorted(ref), f"keys differ: {sorted(set(state) ^ set(ref))[:4]}"
    return max((rel_diff(state[k], ref[k]), k) for k in ref)


LAYOUTS = [  # name, (dp, tp, pp), parallel-only settings
    ("pp2", (1, 1, 2), {"microbatches": 2}),
    ("dp2", (2, 1, 1), {}),
    ("tp2", (1, 2, 1), {}),
    ("dp2 zero1", (2, 1, 1), {"zero": 1}),
    ("dp2 zero2 ring", (2, 1, 1), {"zero": 2, "allreduce": "ring"}),
    ("tp2 sequence-parallel", (1, 2, 1), {"sequence_parallel": True}),
]


def check_equivalence(checks: Checks, world: Comm, cfg, data) -> None:
    for precision in ("bf16", "fp16"):
        for name, (dp, tp, pp), extra in LAYOUTS:
            tc = base_config(precision=precision, **extra)
            # The same rounding points: one process accumulating all dp × M microbatches.
            ref_tc = replace(tc, microbatches=dp * tc.microbatches, zero=0)
            ref = run(cfg, ref_tc, ProcessGrid.single(), data)
            got = run(cfg, tc, ProcessGrid.build(world, dp, tp, pp), data)
            if (precision, name) in EXACT:
                with checks.check(f"{precision} {name}: bit for bit the 1-process run"):
                    assert np.array_equal(got[0], ref[0]), f"losses {got[0]} vs {ref[0]}"
                    d, key = worst(got[1], ref[1])
                    assert d == 0.0, f"master {key} differs by {d:.2e} (rel)"
                    d, key = worst(got[2], ref[2])
                    assert d == 0.0, f"optimizer state {key} differs by {d:.2e} (rel)"
                continue
            with checks.check(f"{precision} {name}: within a 16-bit unit of the 1-process run"):
                d = rel_diff(got[0], ref[0])
                assert d <= UNIT[precision], f"losses differ by {d:.2e} (rel): {got[0]} vs " \
                                             f"{ref[0]}, bound {UNIT[precision]:.2e}"
                bound = 2 * sum(r["lr"] for r in got[3])
                d, key = max((float(np.max(np.abs(got[1][k] - ref[1][k]))), k) for k in ref[1])
                assert d <= bound, f"master {key} differs by {d:.2e}, bound 2·Σ lr = {bound:.3f}"


def check_overflow_vote(checks: Checks, world: Comm, cfg, data) -> None:
    """fp16, pp = 2: an inf in one gradient of the last stage only, at step 1."""
    grid = ProcessGrid.build(world, 1, 1, 2)
    snapshots = {}

    def inject(trainer):
        snapshots[trainer.step] = [p.data.copy() for p in trainer.params]
        if trainer.step == 1 and world.rank == 1:
            trainer.params[-1].grad[...] = np.inf  # on this rank's last parameter alone

    tc = base_config(precision="fp16", microbatches=2)
    _, _, _, records, trainer = run(cfg, tc, grid, data, before_update=inject)
    with checks.check("fp16 overflow on one rank: every rank skips that step"):
        assert [r["skipped"] for r in records] == [False, True, False, False], records
        scales = [r["loss_scale"] for r in records]
        assert scales == [2.0**16, 2.0**16, 2.0**15, 2.0**15], scales
        assert math.isnan(records[1]["grad_norm"]), records[1]
        unchanged = all(np.array_equal(a, b) for a, b in zip(snapshots[1], snapshots[2],
                                                              strict=True))
        assert unchanged, f"rank {world.rank} changed its parameters in the skipped step"
        assert trainer.optimizer.inner.step_count == STEPS - 1
    with checks.check("fp16 overflow vote: one 4-byte all-reduce over the world per step"):
        votes = [r for r in trainer.tracer.records
                 if r.op == "allreduce" and r.group == "world" and r.nbytes == 4]
        assert [r.step for r in votes] == list(range(STEPS)), [r.step for r in votes]
        assert all(r.dtype == "float32" and r.phase == "optimizer" for r in votes), votes


def gradient_bytes(trainer) -> tuple[int, set]:
    grads = [r for r in trainer.tracer.records
             if r.group == "dp" and r.op in ("allreduce", "iallreduce") and r.step == 1]
    return sum(r.nbytes for r in grads), {r.dtype for r in grads}


def check_gradient_bytes(checks: Checks, world: Comm, cfg, data) -> None:
    """dp = 2: the gradient all-reduces of a step carry 2 bytes per parameter, not 4."""
    grid = ProcessGrid.build(world, 2, 1, 1)
    full, dtypes32 = gradient_bytes(run(cfg, base_config(steps=2), grid, data)[4])
    for precision, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        trainer = run(cfg, base_config(steps=2, precision=precision), grid, data)[4]
        half, dtypes = gradient_bytes(trainer)
        with checks.check(f"{precision}: gradients all-reduced in half the bytes"):
            assert dtypes32 == {"float32"} and dtypes == {dtype}, (dtypes32, dtypes)
            assert 2 * half == full, f"{half} bytes in {precision}, {full} in fp32"


def check_bfloat16_collectives(checks: Checks, world: Comm) -> None:
    """Sums and maxima of bfloat16 buffers are fp32 results rounded once (2 ranks)."""
    rng = np.random.default_rng(world.rank)
    mine = rng.standard_normal(1000).astype(BFLOAT16)
    both = np.empty((2, 1000), dtype=BFLOAT16)
    world.allgather(mine, both)
    total = world.allreduce(mine.copy())
    biggest = world.allreduce(mine.copy(), op="max")
    part = np.empty(500, dtype=BFLOAT16)
    world.reduce_scatter(mine, part)
    with checks.check("bfloat16 all-reduce, reduce-scatter and all-gather"):
        want = (both[0].astype(FLOAT32) + both[1].astype(FLOAT32)).astype(BFLOAT16)
        assert np.array_equal(both[world.rank], mine)
        assert np.array_equal(total, want), "sum differs from the fp32 sum rounded once"
        assert np.array_equal(biggest, np.maximum(both[0], both[1]))
        assert np.array_equal(part, want[world.rank * 500:(world.rank + 1) * 500])


def main() -> None:
    world = Comm.world(Tracer(0, enabled=True))
    if world.size != 2:
        sys.exit("precision_checks.py runs on 2 ranks")
    checks = Checks(world)
    cfg, data = setup()
    check_bfloat16_collectives(checks, world)
    check_gradient_bytes(checks, world, cfg, data)
    check_overflow_vote(checks, world, cfg, data)
    check_equivalence(checks, world, cfg, data)
    checks.report()


if __name__ == "__main__":
    main()
