"""The zero-bubble schedule ZB-H1: the split backward, the schedule, its checker and bubble,
and its runs.

Without MPI: the B/W split of the autograd gives the fused backward's gradients bit for bit
(one process, float64); the checker proves ZB-H1 for many (p, m), holds it to 1F1B's peak
memory and rejects broken variants (a W before its B, a W missing); the simulated bubble is
the paper's (p − 1)(F + B − W) for F = B = W.

With MPI (``mpi_scripts/equivalence.py``): ZB-H1 equals the 1-process run to 1e-10 relative
in float64 and 1F1B bit for bit, for pp2 (M = 4, also with full recomputation), pp4 (M = 8,
oversubscribed), dp2 × pp2 (also ZeRO-2), tp2 × pp2 with sequence parallelism; ``train.py``
reports the predicted peak in flight and rejects what zb-h1 does not take with exit 2.

The planner: zb-h1's bubble is the simulator's, its stages hold p stashes each.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import check_ok, describe_run, train_subprocess
from mpi_util import assert_check_passed, equivalence_checks, run_equivalence

from mpipar.autograd import Tensor, WeightGradients, defer_weight_grads
from mpipar.model import GPT, GPTConfig
from mpipar.nn import Linear
from mpipar.parallel.pipeline.checker import (
    ScheduleError,
    check_schedule,
    simulate,
    theoretical_bubble,
    zero_bubble_h1_bubble,
)
from mpipar.parallel.pipeline.instructions import BackwardWeight
from mpipar.parallel.pipeline.schedules import build_schedule, format_schedule
from mpipar.plan.cluster import A100_CLUSTER
from mpipar.plan.compute import bubble_fraction
from mpipar.plan.layout import Layout
from mpipar.plan.memory import in_flight_layers
from mpipar.plan.model_shape import ModelShape
from mpipar.plan.search import candidate_layouts, evaluate

# ---- the split backward, in one process -------------------------------------------------

CFG = GPTConfig(vocab_size=11, n_layer=2, n_head=2, d_model=8, seq_len=6, dtype="float64")


def _gradients(model: GPT, split: bool, idx, targets) -> dict[str, np.ndarray]:
    """Two microbatches' accumulated gradients, with one backward each or split in B and W."""
    for p in model.parameters():
        p.grad = None
    for _ in range(2):
        loss = model(idx, targets)
        if not split:
            loss.backward()
            continue
        store = WeightGradients()
        with defer_weight_grads(store):
            loss.backward()
        assert len(store) > 0
        store.run()
        assert len(store) == 0
    return {name: p.grad.copy() for name, p in model.named_parameters()}


def test_split_backward_gives_the_fused_gradients():
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, (3, 6)), rng.integers(0, 11, (3, 6))
    model = GPT(CFG)
    model.initialize(1)
    fused = _gradients(model, False, idx, targets)
    split = _gradients(model, True, idx, targets)
    assert fused.keys() == split.keys()
    for name in fused:  # the same operations in the same order: equal to the last bit
        assert np.array_equal(fused[name], split[name]), name


def test_b_computes_the_input_gradient_and_leaves_the_weights_to_w():
    """For a Linear y = x Wᵀ + b: B gives dx = dy W at once, W gives dW = dyᵀ x, db = Σ dy."""
    rng = np.random.default_rng(1)
    layer = Linear(4, 3, dtype=np.float64)
    layer.weight.data[...] = rng.normal(size=(3, 4))
    layer.bias.data[...] = rng.normal(size=3)
    x = Tensor(rng.normal(size=(5, 4)), requires_grad=True)
    dy = rng.normal(size=(5, 3))
    store = WeightGradients()
    with defer_weight_grads(store):
        layer(x).backward(dy)
    np.testing.assert_allclose(x.grad, dy @ layer.weight.data, rtol=1e-14)
    assert layer.weight.grad is None and layer.bias.grad is None and len(store) == 1
    store.run()
    np.testing.assert_allclose(layer.weight.grad, dy.T @ x.data, rtol=1e-14)
    np.testing.assert_allclose(layer.bias.grad, dy.sum(axis=0), rtol=1e-14)


# ---- the schedule and the checker -------------------------------------------------------

SIZES = [(1, 1), (1, 3), (2, 2), (2, 4), (2, 7), (3, 3), (3, 8), (4, 4), (4, 8), (4, 13),
         (6, 9), (8, 8), (8, 16)]


@pytest.mark.parametrize("p,m", SIZES)
def test_checker_proves_zb_h1_and_its_bubble_is_the_papers(p, m):
    report = check_schedule(build_schedule("zb-h1", p, m), name="zb-h1")
    # forward 1, backward 2 = B 1 + W 1: F = B = W, so the bubble is (p − 1)/(3m + p − 1)
    assert report.makespan == 3 * m + p - 1
    assert report.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
    assert report.theoretical_bubble == pytest.approx(report.bubble_fraction, abs=1e-12)
    one_f_one_b = check_schedule(build_schedule("1f1b", p, m), name="1f1b")
    # the paper's memory bound: no rank holds more than 1F1B's busiest rank
    assert max(report.peak_inflight) == max(one_f_one_b.peak_inflight) == min(p, m)
    if p > 1:  # idle time (p − 1)(F + B − W) = p − 1 against 1F1B's 3(p − 1)
        idle_zb = report.makespan - 3 * m
        idle_1f1b = one_f_one_b.makespan - 3 * m
        assert (idle_zb, idle_1f1b) == (p - 1, 3 * (p - 1))


def test_zb_h1_order_on_four_ranks():
    text = format_schedule(build_schedule("zb-h1", 4, 8), compute_only=True)
    assert text.splitlines()[0] == ("rank 0: F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 "
                                    "B4 W4 B5 W5 B6 W6 B7 W7")
    assert text.splitlines()[3] == ("rank 3: F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 F6 "
                                    "B6 W3 F7 B7 W4 W5 W6 W7")


def _without(program, cls, mb):
    return [x for x in program if not (isinstance(x, cls) and x.mb == mb)]


def test_checker_rejects_a_w_before_its_b():
    schedule = build_schedule("zb-h1", 2, 4)
    program = schedule[0]
    w = program.index(BackwardWeight(1))
    program.insert(0, program.pop(w))
    with pytest.raises(ScheduleError, match=r"W\(mb=1, chunk=0\) comes before its "
                                            r"input-gradient half BI\(mb=1"):
        check_schedule(schedule, name="zb-h1")


def test_checker_rejects_a_missing_w_and_a_second_w():
    schedule = build_schedule("zb-h1", 2, 4)
    schedule[1] = _without(schedule[1], BackwardWeight, 3)
    with pytest.raises(ScheduleError, match=r"rank 1: W\(mb=3, chunk=0\) never runs"):
        check_schedule(schedule)
    schedule = build_schedule("zb-h1", 2, 4)
    schedule[0].insert(-2, BackwardWeight(0))
    with pytest.raises(ScheduleError, match="runs a second time"):
        check_schedule(schedule)


def test_checker_holds_zb_h1_to_1f1b_peak_memory():
    """Postponing every W to the end (all m stashes alive) breaks the bound min(p, m)."""
    schedule = build_schedule("zb-h1", 2, 4)
    weights = [x for x in schedule[1] if isinstance(x, BackwardWeight)]
    program = [x for x in schedule[1] if not isinstance(x, BackwardWeight)]
    schedule[1] = program[:-2] + weights + program[-2:]
    check_schedule(schedule)  # still runs ...
    with pytest.raises(ScheduleError, match="rank 1 holds 4 microbatches' activations"):
        check_schedule(schedule, name="zb-h1")  # ... but not as ZB-H1


def test_zb_h1_needs_as_many_microbatches_as_ranks():
    with pytest.raises(ValueError, match=r"m=3 < p=4"):
        build_schedule("zb-h1", 4, 3)
    with pytest.raises(ValueError, match="only 'interleaved' uses v > 1"):
        build_schedule("zb-h1", 2, 4, v=2)


def test_simulator_splits_the_backward_by_weight_time():
    schedule = build_schedule("zb-h1", 4, 8)
    t = simulate(schedule, forward_time=1.0, backward_time=2.0, weight_time=1.0)
    rows = t.intervals
    assert {iv.kind for row in rows for iv in row} == {"F", "B", "W"}
    assert all(iv.end - iv.start == 1.0 for row in rows for iv in row)
    assert zero_bubble_h1_bubble(4, 8) == theoretical_bubble("zb-h1", 4, 8) == 3 / 27
    assert theoretical_bubble("1f1b", 4, 8) == pytest.approx(9 / 33)
    with pytest.raises(ValueError, match="weight_time"):
        simulate(schedule, backward_time=2.0, weight_time=3.0)


# ---- with MPI ---------------------------------------------------------------------------

ZB = {"schedule": "zb-h1"}
EQUIVALENCE = {
    "pp2": (2, {"dropout": 0.1}, [
        {"name": "pp2 1f1b m4", "pp": 2, "train": {"schedule": "1f1b", "microbatches": 4}},
        {"name": "pp2 zb-h1 m4", "pp": 2, "train": {**ZB, "microbatches": 4},
         "same_bits_as": "pp2 1f1b m4"},
        {"name": "pp2 zb-h1 m4 full recompute", "pp": 2,
         "train": {**ZB, "microbatches": 4, "recompute": "full"},
         "same_bits_as": "pp2 1f1b m4"},
    ]),
    "pp4": (4, {"n_layer": 8}, [
        {"name": "pp4 1f1b m8", "pp": 4, "train": {"schedule": "1f1b", "microbatches": 8}},
        {"name": "pp4 zb-h1 m8", "pp": 4, "train": {**ZB, "microbatches": 8},
         "same_bits_as": "pp4 1f1b m8"},
    ]),
    "pp2 x dp/tp": (4, {"dropout": 0.1}, [
        {"name": "pp2 dp2 zb-h1 m2", "pp": 2, "dp": 2, "train": {**ZB, "microbatches": 2}},
        {"name": "pp2 dp2 zb-h1 m4 zero2", "pp": 2, "dp": 2,
         "train": {**ZB, "microbatches": 4, "zero": 2}},
        {"name": "pp2 tp2 sp zb-h1 m4", "pp": 2, "tp": 2,
         "train": {**ZB, "microbatches": 4, "sequence_parallel": True}},
    ]),
    "moe pp2": (2, {"n_expert": 4, "capacity_factor": 1.0}, [
        {"name": "moe pp2 zb-h1 m4", "pp": 2, "train": {**ZB, "microbatches": 4}},
    ]),
}
EQUIVALENCE_CHECKS = [(launch, check)
                      for launch, (_, _, layouts) in EQUIVALENCE.items()
                      for layout in layouts
                      for check in equivalence_checks(layout)]


@pytest.fixture(scope="module")
def equivalence_verdicts():
    cache: dict[str, dict] = {}

    def get(launch: str) -> dict:
        if launch not in cache:
            n, model, layouts = EQUIVALENCE[launch]
            cache[launch] = run_equivalence(n, {"steps": 2, "model": model,
                                                "layouts": layouts})
        return cache[launch]

    return get


@pytest.mark.parametrize("launch,name", EQUIVALENCE_CHECKS,
                         ids=[f"{launch}: {name}" for launch, name in EQUIVALENCE_CHECKS])
def test_zb_h1_serial_equivalence(equivalence_verdicts, launch, name):
    assert_check_passed(equivalence_verdicts(launch), name)


RUN_ARGS = ["--preset", "tiny", "--steps", "2", "--eval-every", "0", "--log-every", "1"]


def test_train_reports_zb_h1_bubble_theory_and_memory():
    proc = check_ok(train_subprocess([*RUN_ARGS, "--pp", "2", "--microbatches", "4",
                                      "--schedule", "zb-h1"], n=2, timeout=90))
    # theory (p − 1)/(3m + p − 1) = 1/13; both ranks hold min(p, m) = 2 stashes at the peak
    assert "pipeline zb-h1 (p=2, m=4, v=1): bubble theory 7.7%" in proc.stdout, proc.stdout
    assert re.search(r"peak stashed activations per rank: \S+ \S+ \(2 in flight\), "
                     r"\S+ \S+ \(2 in flight\)", proc.stdout), proc.stdout


@pytest.mark.parametrize("flags,fragment", [
    (["--microbatches", "1"], "--schedule zb-h1 needs --microbatches >= --pp: got "
                              "--microbatches 1 < --pp 2"),
    (["--dp", "1", "--microbatches", "2", "--zero", "3"], "--schedule zb-h1 does not take "
                                                          "--zero 3"),
], ids=["m<p", "zero3"])
def test_bad_zb_h1_config_exits_2(flags, fragment):
    proc = train_subprocess([*RUN_ARGS, "--pp", "2", "--schedule", "zb-h1", *flags], n=2,
                            timeout=60)
    assert proc.returncode == 2, describe_run(proc)
    assert fragment in proc.stderr, describe_run(proc)
    assert "Traceback" not in proc.stderr, describe_run(proc)


# ---- the planner ------------------------------------------------------------------------


def test_planner_charges_zb_h1_the_simulated_bubble_and_p_stashes_per_stage():
    lay = Layout(pp=4, microbatches=8, batch_size=8, schedule="zb-h1")
    timeline = simulate(build_schedule("zb-h1", 4, 8), 1.0, 2.0)  # F = B = W = 1
    assert bubble_fraction(lay) == pytest.approx(1 - 3 * 8 / timeline.makespan)
    shape = ModelShape(8, 64, 4, 32, 103)  # 8 blocks: 2 per stage
    one = Layout(pp=4, microbatches=8, batch_size=8, schedule="1f1b")
    for r in range(4):  # (blocks, head copies, stage inputs) at the peak
        assert in_flight_layers(shape, lay, r) == (2 * 4, 4 * (r == 3), 4)
        assert in_flight_layers(shape, one, r) == (2 * (4 - r), r == 3, 4 - r)
    cluster = A100_CLUSTER.with_(devices=4)
    assert any(x.schedule == "zb-h1" for x in candidate_layouts(
        shape, cluster, 8, precision="fp32", schedules=("1f1b", "zb-h1")))
    bad = evaluate(shape, Layout(dp=2, pp=2, microbatches=4, batch_size=8, zero=3,
                                 schedule="zb-h1"), cluster)
    assert "--schedule zb-h1 does not take --zero 3" in bad.problems
