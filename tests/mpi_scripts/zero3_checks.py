"""ZeRO-3 beyond serial equivalence: ``mpirun -n N python zero3_checks.py``, dp = N.

* traffic: per step, the dp group's calls, phases and bytes from the trace, against the
  theory: each block all-gathered in forward and again in backward and its gradient
  reduce-scattered (3Ψ), the parameters outside the blocks reduce-scattered and all-gathered
  (2Ψ), against ZeRO-2's one reduce-scatter and one all-gather of everything (2Ψ);
* checkpoints: a ZeRO-3 run's state resumes under ZeRO-1 with the ring and on one process,
  and a ZeRO-2 run's under ZeRO-3, each continuing exactly as the uninterrupted 1-process run;
* memory: each rank's bytes of parameters, gradients and AdamW state against the layout
  (1/N of every unit, padded to a multiple of N; two block buffers; the rest whole).

float64, the same small model as dp_checks.py. Serial references are computed in-process.
"""

from __future__ import annotations

from dataclasses import replace

from dp_checks import base_setup, rel_diff, run
from verdict import Checks

from mpipar.comm import Comm, install_excepthook
from mpipar.grid import ProcessGrid
from mpipar.parallel.full_state import full_state, load_full_state
from mpipar.parallel.zero import memory_report
from mpipar.parallel.zero3 import ShardedParameters
from mpipar.trace import Tracer
from mpipar.training import Trainer

STEPS = 2


def traced(world: Comm, **overrides) -> tuple[Trainer, list]:
    cfg, tc, data = base_setup()
    tracer = Tracer(world.rank, enabled=True)
    grid = ProcessGrid.build(Comm(world.mpi, "world", tracer), world.size, 1, 1)
    trainer = Trainer(cfg, replace(tc, **overrides), grid, data, tracer)
    for _ in range(STEPS):
        trainer.train_step()
    return trainer, tracer.records


def step_calls(records: list, step: int) -> list[tuple[str, str, int]]:
    """(op, phase, bytes) of the dp group's calls of one step, in the order they completed."""
    return [(r.op, r.phase, r.nbytes) for r in records
            if r.group == "dp" and r.step == step and r.phase != "other"]


def traffic(calls: list[tuple[str, str, int]], n: int) -> float:
    """Bytes a rank sends (as many as it receives) for these calls, by the usual count: an
    in-place all-gather or a reduce-scatter of B bytes moves (n − 1)/n · B, an all-gather
    of a B-byte contribution (n − 1) · B."""
    per = {"iallgather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "allgather": n - 1}
    return sum(per[op] * nbytes for op, _, nbytes in calls)


def check_traffic(checks: Checks, world: Comm) -> None:
    n, item = world.size, 8
    zero3, records3 = traced(world, zero=3)
    zero2, records2 = traced(world, zero=2)
    sharded: ShardedParameters = zero3.grad_sync
    blocks = [u.padded * item for u in sharded.block_units]
    rest = sharded.rest.padded * item
    flat = zero2.grad_sync.padded * item  # ZeRO-2's one flat buffer, Ψ padded
    with checks.check("zero3 traffic: calls, phases and bytes per step"):
        forward = [("iallgather", "forward", b) for b in blocks]
        backward = [x for b in blocks for x in (("iallgather", "backward", b),
                                                 ("reduce_scatter", "backward", b))]
        outside = [("reduce_scatter", "backward", rest), ("iallgather", "optimizer", rest)]
        for step in range(STEPS):
            got = step_calls(records3, step)
            assert sorted(got) == sorted(forward + backward + outside), f"step {step}: {got}"
    with checks.check("zero3 traffic: 3Ψ for the blocks and 2Ψ for the rest vs ZeRO-2's 2Ψ"):
        for step in range(STEPS):
            t3, t2 = traffic(step_calls(records3, step), n), traffic(step_calls(records2, step), n)
            assert t3 == (n - 1) / n * (3 * sum(blocks) + 2 * rest), (step, t3)
            assert t2 == (n - 1) / n * 2 * flat, (step, t2)
            assert 1.4 < t3 / t2 < 1.5, f"ZeRO-3 / ZeRO-2 traffic {t3 / t2:.3f}"


def check_checkpoints(checks: Checks, world: Comm) -> None:
    """ZeRO-3 → ZeRO-1 ring, ZeRO-3 → 1 process, ZeRO-2 → ZeRO-3: step 3 after loading
    step 2's state equals the uninterrupted 1-process run's step 3."""
    n = world.size
    cfg, tc, data = base_setup()
    ref_losses, _, ref_model, ref_optim, _ = run(cfg, tc, ProcessGrid.single(), data, 3)
    for label, first, second in (
        ("zero3 -> zero1 ring", {"zero": 3}, {"zero": 1, "allreduce": "ring"}),
        ("zero3 -> 1 process", {"zero": 3}, None),
        ("zero2 -> zero3", {"zero": 2}, {"zero": 3, "microbatches": 2}),
    ):
        trainer = Trainer(cfg, replace(tc, **first), ProcessGrid.build(world, n, 1, 1), data,
                          Tracer(world.rank))
        for _ in range(2):
            trainer.train_step()
        state = full_state(trainer.params, trainer.optimizer, trainer.grid, trainer.dtype)
        grid = ProcessGrid.single() if second is None else ProcessGrid.build(world, n, 1, 1)
        resumed = Trainer(cfg, replace(tc, **(second or {})), grid, data, Tracer(world.rank))
        load_full_state(resumed.params, resumed.optimizer, *state)
        resumed.step = 2
        loss = resumed.train_step()["loss"]
        model, optim = full_state(resumed.params, resumed.optimizer, grid, resumed.dtype)
        with checks.check(f"zero3 checkpoint {label}"):
            assert sorted(state[1]) == sorted(ref_optim), "state keys differ from AdamW's"
            d = rel_diff([loss], [ref_losses[2]])
            assert d <= 1e-10, f"step 2 loss after loading differs by {d:.2e}"
            for what, got, ref in (("parameter", model, ref_model), ("state", optim, ref_optim)):
                worst = max((rel_diff(got[k], ref[k]), k) for k in ref)
                assert worst[0] <= 1e-10, f"{what} {worst[1]} differs by {worst[0]:.2e}"


def check_memory(checks: Checks, world: Comm) -> None:
    """Bytes per rank: 1/N of every unit for the shard, its gradient and m, v; the buffers."""
    n, item = world.size, 8
    trainer, _ = traced(world, zero=3)
    report = memory_report(trainer.optimizer, trainer.grad_sync, trainer.params)
    sharded: ShardedParameters = trainer.grad_sync
    with checks.check("zero3 memory: 16Ψ/N and the gather buffers"):
        psi = sum(p.size for p in trainer.params)
        shard = sum(u.width for u in sharded.units)
        assert report["params"] == psi and abs(shard * n - psi) < n * len(sharded.units)
        assert report["optimizer_state_bytes"] == 2 * shard * item, report
        assert report["grad_bytes"] == shard * item, report
        largest = max(u.padded for u in sharded.block_units)
        buffers = (2 * largest + sharded.rest.padded) * item
        assert report["param_buffer_bytes"] == buffers, report
        assert report["param_bytes"] == shard * item + buffers, report
        assert sharded.rest_grads is None and all(p.grad is None for p in trainer.params)


def main() -> None:
    world = Comm.world(Tracer(0))
    install_excepthook(world)
    checks = Checks(world)
    check_traffic(checks, world)
    check_checkpoints(checks, world)
    check_memory(checks, world)
    checks.report()


if __name__ == "__main__":
    main()
