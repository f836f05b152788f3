"""Data parallelism and ZeRO beyond the float64 matrix: ``mpirun -n N python dp_checks.py``.

With dp = N (the whole world) this checks, in one launch:

* serial equivalence in float32 (relative 1e-5) and with dropout on (float64, 1e-10), for
  layouts the float64 matrix of ``equivalence.py`` cannot express (its model is fixed);
* every strategy, with and without overlap, and the ring compute exactly what the simplest
  data parallelism computes, one all-reduce per parameter (``allreduce_gradients``);
* communication volume read back from the trace, against the arithmetic of
  ``tutorials/02_data_parallel.md``: calls per step for each strategy, bytes per step (each
  gradient element once for MPI's all-reduce, 2(n−1)/n of the buffer for the ring, the
  padded buffer for ZeRO's reduce-scatter and 1/n of it for its all-gather), phases, and no
  communication at all on microbatches other than the last;
* the overlap: with buckets, the first all-reduce starts before backward ends;
* replicas start identical (a perturbed rank is overwritten by the broadcast);
* ZeRO memory: optimizer state (ZeRO-1/2) and gradients (ZeRO-2) are 1/dp of ZeRO-0's;
* a sharded optimizer state saved in one layout and loaded in another continues the run
  exactly as the 1-process run.

Prints a VERDICT (see verdict.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from equivalence import TEXT, rel_diff, run
from verdict import Checks

from mpipar.comm import Comm, install_excepthook
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig
from mpipar.nn import Init, Parameter
from mpipar.optim import AdamW
from mpipar.parallel.data_parallel import MIB, DataParallel, allreduce_gradients, assign_buckets
from mpipar.parallel.full_state import full_state, load_full_state
from mpipar.parallel.zero import ZeroAdamW, memory_report
from mpipar.trace import COMPUTE, Tracer
from mpipar.training import TrainConfig, Trainer

STEPS = 2
MICRO = 2  # microbatches in the trace checks: the first must be silent


def base_setup(dtype: str = "float64", dropout: float = 0.0):
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=16, seq_len=8,
                    dtype=dtype, dropout=dropout)
    data = make_dataset(TEXT, tok, seq_len=cfg.seq_len)
    tc = TrainConfig(batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, grad_clip=1.0,
                     steps=3)
    return cfg, tc, data


def equivalence(checks: Checks, world: Comm) -> None:
    """float32 and dropout layouts against the 1-process run."""
    n = world.size
    for label, dtype, dropout, tol, overrides in (
        ("float32 bucketed mb2", "float32", 0.0, 1e-5, {"microbatches": 2, "bucket_mb": 0.001}),
        ("float32 zero2 ring", "float32", 0.0, 1e-5, {"zero": 2, "allreduce": "ring"}),
        ("dropout bucketed mb2", "float64", 0.1, 1e-10, {"microbatches": 2}),
        ("dropout zero1", "float64", 0.1, 1e-10, {"zero": 1, "dp_strategy": "flat"}),
    ):
        cfg, tc, data = base_setup(dtype, dropout)
        ref = run(cfg, tc, ProcessGrid.single(), data, 3)
        got = run(cfg, replace(tc, **overrides), ProcessGrid.build(world, n, 1, 1), data, 3)
        with checks.check(f"equivalence {label}"):
            for what, a, b in (("losses", got[0], ref[0]), ("grad norms", got[1], ref[1])):
                d = rel_diff(a, b)
                assert d <= tol, f"{what} differ by {d:.2e} (rel > {tol}): {a} vs {b}"
            model, ref_model = dict(got[2]), dict(ref[2])
            if dtype == "float32":
                check_key_bias(model, ref_model, cfg, lr=tc.lr, steps=3)
            for state, ref_state in ((model, ref_model), (got[3], ref[3])):
                worst = max((rel_diff(state[k], ref_state[k]), k) for k in ref_state)
                assert worst[0] <= tol, f"{worst[1]} differs by {worst[0]:.2e} (rel > {tol})"


def check_key_bias(model: dict, ref_model: dict, cfg: GPTConfig, lr: float, steps: int) -> None:
    """Compare the attention key biases apart, and drop them from ``model``/``ref_model``.

    Softmax is invariant to adding a constant to a row of scores, and the key bias adds
    q·b_k to a whole row, so its exact gradient is 0 and the float32 one is rounding noise
    (~1e-12). AdamW divides m by √v + ε with √v ≪ ε, turning that noise into steps of
    ~lr·1e-4 whose sign depends on the summation order. So these elements are held to an
    absolute bound far below the lr-sized steps a real gradient makes.
    """
    d = cfg.d_model
    for k in [k for k in ref_model if k.endswith("attn.qkv.bias")]:
        got_k, ref_k = model[k][d:2 * d], ref_model[k][d:2 * d]  # (d,) the key third
        worst = float(np.max(np.abs(got_k - ref_k)))
        assert worst <= 1e-3 * lr * steps, f"{k} key part differs by {worst:.2e} (abs)"
        model[k], ref_model[k] = np.delete(model[k], np.s_[d:2 * d]), np.delete(
            ref_model[k], np.s_[d:2 * d])


def traced_run(world: Comm, **overrides) -> tuple[Trainer, list]:
    """Train STEPS steps with a recording tracer; return the trainer and its records."""
    cfg, tc, data = base_setup()
    tracer = Tracer(world.rank, enabled=True)
    grid = ProcessGrid.build(Comm(world.mpi, "world", tracer), world.size, 1, 1)
    trainer = Trainer(cfg, replace(tc, microbatches=MICRO, **overrides), grid, data, tracer)
    for _ in range(STEPS):
        trainer.train_step()
    return trainer, tracer.records


def dp_records(records: list, step: int) -> list:
    return [r for r in records if r.group == "dp" and r.step == step and r.phase != "other"]


def communication(checks: Checks, world: Comm) -> None:
    """Calls, bytes and phases of the gradient communication, from the trace."""
    n = world.size
    for strategy in ("per_param", "flat", "bucketed"):
        for overlap in (True, False):
            name = f"volume {strategy} overlap={overlap}"
            trainer, records = traced_run(world, dp_strategy=strategy, overlap=overlap,
                                          bucket_mb=0.004)
            with checks.check(name):
                sync = trainer.grad_sync
                item = np.dtype(trainer.cfg.dtype).itemsize
                psi = sum(p.size for p in trainer.params)
                sizes = [p.size * item for p in trainer.params]
                expected_calls = {"per_param": len(trainer.params), "flat": 1,
                                  "bucketed": len(assign_buckets(sizes, 0.004 * MIB))}[strategy]
                if strategy == "bucketed":
                    assert expected_calls >= 3, f"only {expected_calls} buckets: test too weak"
                op = "iallreduce" if overlap else "allreduce"
                for step in range(STEPS):
                    recs = dp_records(records, step)
                    assert len(recs) == expected_calls, (
                        f"step {step}: {len(recs)} dp calls, theory {expected_calls}")
                    assert {r.op for r in recs} == {op}, {r.op for r in recs}
                    total = sum(r.nbytes for r in recs)
                    assert total == psi * item, f"step {step}: {total} bytes, theory {psi * item}"
                    assert all(r.phase == "backward" for r in recs), {r.phase for r in recs}
                    # Launched in the hooks of the last microbatch, or in finish() (None).
                    mbs = {r.microbatch for r in recs}
                    assert mbs == ({MICRO - 1} if overlap else {None}), mbs
                    if overlap and strategy != "flat":
                        backward_end = max(r.end for r in records if r.op == COMPUTE
                                           and r.name == "backward" and r.step == step)
                        first = min(r.start for r in recs)
                        assert first < backward_end, "no all-reduce started during backward"
                assert len(sync.buckets) == expected_calls

    # The ring: 2(n-1) sendrecvs per bucket carrying 2(n-1)/n of the gradient bytes.
    trainer, records = traced_run(world, dp_strategy="flat", allreduce="ring")
    with checks.check("volume ring all-reduce"):
        item = np.dtype(trainer.cfg.dtype).itemsize
        psi = sum(p.size for p in trainer.params)
        assert psi % n == 0, f"Ψ = {psi} not divisible by {n}: pick another model"
        for step in range(STEPS):
            recs = dp_records(records, step)
            assert len(recs) == 2 * (n - 1), f"{len(recs)} sendrecvs, theory {2 * (n - 1)}"
            assert {r.op for r in recs} == {"sendrecv"}
            total = sum(r.nbytes for r in recs)
            theory = 2 * (n - 1) * psi * item // n
            assert total == theory, f"ring sent {total} bytes per rank, theory {theory}"
            assert {r.microbatch for r in recs} == {None}

    # ZeRO: reduce-scatter of the padded buffer in backward, all-gather of a shard after.
    for allreduce in ("mpi", "ring"):
        for zero in (1, 2):
            trainer, records = traced_run(world, zero=zero, allreduce=allreduce)
            with checks.check(f"volume zero{zero} {allreduce}"):
                sync = trainer.grad_sync
                item = np.dtype(trainer.cfg.dtype).itemsize
                padded = sync.padded
                assert padded % n == 0 and padded - sync.numel < n, (padded, sync.numel)
                for step in range(STEPS):
                    recs = dp_records(records, step)
                    back = [r for r in recs if r.phase == "backward"]
                    opt = [r for r in recs if r.phase == "optimizer"]
                    assert len(back) + len(opt) == len(recs), {r.phase for r in recs}
                    assert {r.microbatch for r in back} == {None}
                    if allreduce == "mpi":
                        assert [(r.op, r.nbytes) for r in back] == [
                            ("reduce_scatter", padded * item)], back
                        assert [(r.op, r.nbytes) for r in opt] == [
                            ("allgather", padded // n * item)], opt
                    else:  # the two halves of the ring all-reduce
                        for half in (back, opt):
                            assert [r.op for r in half] == ["sendrecv"] * (n - 1), half
                            assert sum(r.nbytes for r in half) == (n - 1) * padded // n * item
                if zero == 2:
                    assert sync.flat_grads is None and all(p.grad is None for p in trainer.params)

    with checks.check("broadcast at start"):
        recs = [r for r in records if r.op == "broadcast"]
        psi = trainer.grad_sync.numel
        item = np.dtype(trainer.cfg.dtype).itemsize
        assert [(r.group, r.phase, r.nbytes) for r in recs] == [("dp", "other", psi * item)]


def integer_grads(shapes: list[tuple[int, ...]], seed: int) -> list[Parameter]:
    """Parameters (equal on every rank) whose gradients are integers that differ by rank."""
    rng = np.random.default_rng(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = Parameter(shape, Init("zeros"), np.float64)
        p.name = f"p{i}"
        p.grad = rng.integers(-50, 50, shape).astype(np.float64)
        params.append(p)
    return params


def simplest_allreduce(checks: Checks, world: Comm) -> None:
    """DataParallel in every set-up gives what the per-parameter loop gives, bit for bit.

    Integer-valued gradients make every sum exact whatever order MPI or the ring adds in, and
    dividing by dp = 2 or 4 is exact too, so any difference is a real one.
    """
    shapes = [(7, 5), (5,), (300,), (3, 4)]  # bucket_mb below: two buckets
    reference = integer_grads(shapes, seed=world.rank)
    allreduce_gradients(reference, Comm(world.mpi, "dp"))
    for strategy, overlap, allreduce in [(s, o, "mpi") for s in ("per_param", "flat", "bucketed")
                                         for o in (True, False)] + [("bucketed", False, "ring")]:
        with checks.check(f"per-parameter all-reduce = {strategy} overlap={overlap} {allreduce}"):
            params = integer_grads(shapes, seed=world.rank)
            grads = [p.grad for p in params]
            sync = DataParallel(params, Comm(world.mpi, "dp"), strategy=strategy,
                                bucket_mb=300 / MIB, overlap=overlap, allreduce=allreduce)
            assert len(sync.buckets) == {"per_param": 4, "flat": 1, "bucketed": 2}[strategy]
            for p, g in zip(params, grads, strict=True):
                p.grad[...] = g  # into the flat buffer
            sync.finish()
            for p, q in zip(params, reference, strict=True):
                np.testing.assert_array_equal(p.grad, q.grad, err_msg=p.name)


def replicas_start_identical(checks: Checks, world: Comm) -> None:
    cfg, tc, data = base_setup()
    from mpipar.model import GPT

    model = GPT(cfg)
    model.initialize(tc.seed)
    if world.rank == 1:
        model.blocks[0].attn.qkv.weight.data += 1.0  # a replica that drifted
    DataParallel(model.parameters(), Comm(world.mpi, "dp"))
    reference = GPT(cfg)
    reference.initialize(tc.seed)
    with checks.check("replicas start identical"):
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            np.testing.assert_array_equal(p.data, q.data, err_msg=name)


def memory(checks: Checks, world: Comm) -> None:
    n = world.size
    reports, kinds = {}, {}
    for zero in (0, 1, 2):
        trainer, _ = traced_run(world, zero=zero)
        reports[zero] = memory_report(trainer.optimizer, trainer.grad_sync, trainer.params)
        kinds[zero] = type(trainer.optimizer)
    with checks.check("zero memory is 1/dp"):
        assert kinds[0] is AdamW and kinds[1] is kinds[2] is ZeroAdamW, kinds
        item = 8  # float64
        psi = reports[0]["params"]
        padded = -(-psi // n) * n
        assert reports[0]["optimizer_state_bytes"] == 2 * psi * item, reports[0]
        assert reports[0]["grad_bytes"] == psi * item, reports[0]
        for zero in (1, 2):
            r = reports[zero]
            assert r["baseline_optimizer_state_bytes"] == reports[0]["optimizer_state_bytes"]
            assert r["baseline_grad_bytes"] == reports[0]["grad_bytes"]
            # 1/dp of zero 0, up to the padding of Ψ to a multiple of dp
            assert r["optimizer_state_bytes"] == 2 * padded // n * item, r
            assert abs(r["optimizer_state_bytes"] * n - 2 * psi * item) < 2 * n * item, r
        assert reports[2]["grad_bytes"] == padded // n * item, reports[2]
        assert reports[1]["grad_bytes"] == padded * item, reports[1]  # ZeRO-1 keeps them


def checkpoint_across_layouts(checks: Checks, world: Comm) -> None:
    """ZeRO-2 state after 2 steps, loaded into a ZeRO-1 ring layout, then one more step."""
    n = world.size
    cfg, tc, data = base_setup()
    ref_losses, _, ref_model, ref_optim, _ = run(cfg, tc, ProcessGrid.single(), data, 3)
    first = Trainer(cfg, replace(tc, zero=2), ProcessGrid.build(world, n, 1, 1), data,
                    Tracer(world.rank))
    for _ in range(2):
        first.train_step()
    model_state, opt_state = full_state(first.params, first.optimizer, first.grid,
                                        first.dtype)
    second = Trainer(cfg, replace(tc, zero=1, allreduce="ring", dp_strategy="per_param"),
                     ProcessGrid.build(world, n, 1, 1), data, Tracer(world.rank))
    assert isinstance(second.optimizer, ZeroAdamW)
    load_full_state(second.params, second.optimizer, model_state, opt_state)
    second.step = 2
    loss = second.train_step()["loss"]
    model, optim = full_state(second.params, second.optimizer, second.grid, second.dtype)
    with checks.check("zero checkpoint across layouts"):
        assert sorted(opt_state) == sorted(ref_optim), "state keys differ from AdamW's"
        d = rel_diff([loss], [ref_losses[2]])
        assert d <= 1e-10, f"step 2 loss after loading differs by {d:.2e}"
        worst = max((rel_diff(model[k], ref_model[k]), k) for k in ref_model)
        assert worst[0] <= 1e-10, f"parameter {worst[1]} differs by {worst[0]:.2e}"
        worst = max((rel_diff(optim[k], ref_optim[k]), k) for k in ref_optim)
        assert worst[0] <= 1e-10, f"optimizer state {worst[1]} differs by {worst[0]:.2e}"


def main() -> None:
    world = Comm.world(Tracer(0))
    install_excepthook(world)
    checks = Checks(world)
    equivalence(checks, world)
    simplest_allreduce(checks, world)
    communication(checks, world)
    replicas_start_identical(checks, world)
    memory(checks, world)
    checkpoint_across_layouts(checks, world)
    checks.report()


if __name__ == "__main__":
    main()
