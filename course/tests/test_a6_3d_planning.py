"""A6, three dimensions and planning (tutorials/05_3d_parallelism.md, 06_choosing_a_layout.md).

The grid is checked without MPI (each rank's coordinates, and the groups ``Split`` makes from
each rank's (color, key), against the definition: the ranks equal in the two other
coordinates, ordered by the third) and on 8 real ranks for six layouts. The planner's
estimates are checked against a measurement (``mpi/a6.py``): one traced training step of a
small GPT in each of sixteen layouts on 4 ranks. Per rank and group, the calls and bytes the
planner estimates must be those the trace recorded; the parameter, gradient and optimizer
bytes those ``memory_report`` counts; the activations within 10% of the bytes the autograd
graph (or a pipeline's stash) really kept for backward.
"""

from __future__ import annotations

import pytest
from course_mpi import launch, measure, passed

from mpipar.grid import ProcessGrid, rank_coords, split_colors
from mpipar.parallel.pipeline.checker import check_schedule
from mpipar.parallel.pipeline.schedules import build_schedule
from mpipar.plan.comm import dp_calls, pp_calls, tp_calls
from mpipar.plan.layout import Layout
from mpipar.plan.memory import activation_bytes, in_flight_layers, stage_chunks, state_bytes
from mpipar.plan.model_shape import ModelShape

GRIDS = [(2, 2, 2), (4, 8, 2), (3, 1, 2), (1, 2, 4), (2, 3, 1), (5, 1, 1), (1, 1, 3)]
REAL_GRIDS = [[2, 2, 2], [1, 2, 4], [4, 2, 1], [2, 1, 4], [8, 1, 1], [1, 1, 8]]
# The measured layouts (4 ranks each): train.py's flags, as the planner's Layout takes them.
LAYOUTS = {
    "dp4": dict(dp=4),
    "dp4 ring": dict(dp=4, allreduce="ring"),
    "dp4 z1": dict(dp=4, zero=1),
    "dp4 z2": dict(dp=4, zero=2),
    "dp4 z3": dict(dp=4, zero=3),
    "dp4 z1 bf16": dict(dp=4, zero=1, precision="bf16"),
    "tp4": dict(tp=4),
    "dp2 tp2 sp": dict(dp=2, tp=2, sequence_parallel=True),
    "dp2 tp2 m2 full": dict(dp=2, tp=2, microbatches=2, recompute="full"),
    "dp2 tp2 bf16": dict(dp=2, tp=2, precision="bf16"),
    "dp2 tp2 z3": dict(dp=2, tp=2, zero=3),
    "pp4 m4 1f1b": dict(pp=4, microbatches=4, schedule="1f1b"),
    "dp2 pp2 m4 gpipe": dict(dp=2, pp=2, microbatches=4, schedule="gpipe"),
    "dp2 pp2 m2 interleaved": dict(dp=2, pp=2, microbatches=2, schedule="interleaved",
                                   virtual_stages=2),
    "tp2 pp2 m2 selective": dict(tp=2, pp=2, microbatches=2, schedule="1f1b",
                                 recompute="selective"),
    "dp2 pp2 m2 z2": dict(dp=2, pp=2, microbatches=2, schedule="1f1b", zero=2),
}


def defined_groups(dp: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Each kind's groups by definition, each ordered by the coordinate that varies."""

    def at(p: int, d: int, t: int) -> int:
        return (p * dp + d) * tp + t

    return {
        "tp": [[at(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[at(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[at(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "embed": [[at(0, d, t), at(pp - 1, d, t)] for d in range(dp) for t in range(tp)],
    }


def split_by_colors(dp: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """What ``Split`` makes of every rank's (color, key): equal colors form a group, ordered
    by key (then by rank, as MPI does); a color of None opts out."""
    groups: dict[str, dict[int, list[tuple[int, int]]]] = {}
    for rank in range(dp * tp * pp):
        for kind, (color, key) in split_colors(rank, dp, tp, pp).items():
            if color is not None:
                groups.setdefault(kind, {}).setdefault(color, []).append((key, rank))
    return {kind: sorted([r for _, r in sorted(members)] for members in by_color.values())
            for kind, by_color in groups.items()}


@pytest.fixture(scope="module")
def real_grids():
    return launch(8, "a6.py", "grid", {"layouts": REAL_GRIDS})


@pytest.fixture(scope="module")
def measured():
    return measure(4, "a6.py", "measure", {"layouts": LAYOUTS}, timeout=150)


def cases(measured: dict, names: list[str]):
    """(layout name, the planner's Layout, shape, pp rank, dp rank, that rank's measurement)."""
    m = measured
    shape = ModelShape(m["n_layer"], m["d_model"], m["n_head"], m["seq_len"], m["vocab_size"])
    for name in names:
        layout = Layout(batch_size=m["batch_size"], **LAYOUTS[name])
        for rank in m["layouts"][name]:
            yield name, layout, shape, rank["coords"][0], rank["coords"][1], rank


def compare_calls(measured: dict, names: list[str], groups: tuple[str, ...], estimate) -> None:
    wrong = []
    for name, layout, shape, p, d, rank in cases(measured, names):
        calls = estimate(shape, layout, p, d)
        for group in groups:
            want = [sum(c.calls for c in calls if c.group == group),
                    sum(c.nbytes for c in calls if c.group == group)]
            got = rank["traced"].get(group, [0, 0])
            if got != want:
                wrong.append(f"{name}, rank at (pp, dp, tp) = {tuple(rank['coords'])}: {group} "
                             f"traced {got[0]} calls, {got[1]:,} B; estimated {want[0]} calls, "
                             f"{want[1]:,} B")
    assert not wrong, "\n".join(wrong[:6])


def compare_states(measured: dict, names: list[str]) -> None:
    wrong = []
    for name, layout, shape, p, _, rank in cases(measured, names):
        want = list(state_bytes(shape, layout, p))
        if rank["state"] != want:
            wrong.append(f"{name}, pipeline rank {p}: memory_report has (parameters, "
                         f"gradients, optimizer state) = {rank['state']} B, estimated {want}")
    assert not wrong, "\n".join(wrong[:6])


def compare_activations(measured: dict, names: list[str]) -> None:
    wrong = []
    for name, layout, shape, p, _, rank in cases(measured, names):
        est, got = activation_bytes(shape, layout, p), rank["activations"]
        if abs(est - got) > 0.1 * got:
            wrong.append(f"{name}, pipeline rank {p}: {got:,} B kept for backward, "
                         f"estimated {est:,} B ({est / got - 1:+.1%}, more than 10% off)")
    assert not wrong, "\n".join(wrong[:6])


# ---- A6.1 the process grid -----------------------------------------------------------------
@pytest.mark.a6_1
def test_coordinates_run_tp_fastest_then_dp_then_pp():
    for dp, tp, pp in GRIDS:
        got = [rank_coords(r, dp, tp, pp) for r in range(dp * tp * pp)]
        want = [(r // (tp * dp), (r // tp) % dp, r % tp) for r in range(dp * tp * pp)]
        assert got == want, f"dp {dp} × tp {tp} × pp {pp}: {got[:8]}..., expected {want[:8]}..."
    for rank in (-1, 8):
        with pytest.raises(ValueError):
            rank_coords(rank, 2, 2, 2)


@pytest.mark.a6_1
def test_the_colors_split_the_world_into_the_defined_groups():
    for dp, tp, pp in GRIDS:
        got, want = split_by_colors(dp, tp, pp), defined_groups(dp, tp, pp)
        kinds = ("tp", "dp", "pp", "embed") if pp > 1 else ("tp", "dp", "pp")
        for kind in kinds:
            assert got.get(kind) == sorted(want[kind]), (
                f"dp {dp} × tp {tp} × pp {pp}, {kind} groups: {got.get(kind)}, "
                f"expected {sorted(want[kind])}")


@pytest.mark.a6_1
def test_rank_37_of_the_chapters_64_ranks():
    assert rank_coords(37, 4, 8, 2) == (1, 0, 5)
    colors = split_colors(37, 4, 8, 2)
    assert colors["tp"] == (4, 5) and colors["pp"] == (5, 1), colors
    assert split_colors(37, 4, 8, 3)["embed"][0] is None, "a middle stage opts out of embed"


@pytest.mark.a6_1
def test_a_real_grid_makes_each_ranks_groups_in_order(real_grids):
    passed(real_grids, "groups")


@pytest.mark.a6_1
def test_a_real_grid_joins_first_and_last_stage_only(real_grids):
    passed(real_grids, "embed")


@pytest.mark.a6_1
def test_a_grid_refuses_a_world_of_another_size():
    with pytest.raises(ValueError):
        ProcessGrid.build(ProcessGrid.single().world, 2, 1, 1)


# ---- A6.2 the planner's communication ------------------------------------------------------
@pytest.mark.a6_2
def test_data_parallel_calls_are_the_traced_ones(measured):
    names = ["dp4", "dp4 ring", "dp4 z1", "dp4 z2", "dp4 z3", "dp4 z1 bf16", "dp2 tp2 z3",
             "dp2 pp2 m2 z2", "dp2 pp2 m4 gpipe"]
    compare_calls(measured, names, ("dp",), dp_calls)


@pytest.mark.a6_2
def test_tensor_parallel_calls_are_the_traced_ones(measured):
    names = ["tp4", "dp2 tp2 sp", "dp2 tp2 m2 full", "dp2 tp2 bf16", "tp2 pp2 m2 selective"]
    compare_calls(measured, names, ("tp",), lambda s, lay, p, d: tp_calls(s, lay, p))


@pytest.mark.a6_2
def test_pipeline_and_tied_embedding_calls_are_the_traced_ones(measured):
    names = ["pp4 m4 1f1b", "dp2 pp2 m4 gpipe", "dp2 pp2 m2 interleaved",
             "tp2 pp2 m2 selective", "dp2 pp2 m2 z2"]
    compare_calls(measured, names, ("pp", "embed"), lambda s, lay, p, d: pp_calls(s, lay, p))


# ---- A6.3 the planner's memory -------------------------------------------------------------
@pytest.mark.a6_3
def test_parameter_gradient_and_optimizer_bytes_are_memory_reports(measured):
    compare_states(measured, ["dp4", "dp4 z1", "dp4 z2", "tp4", "dp2 tp2 sp", "pp4 m4 1f1b",
                              "dp2 pp2 m2 interleaved", "dp2 pp2 m2 z2"])


@pytest.mark.a6_3
def test_zero3_and_16_bit_state_bytes_are_memory_reports(measured):
    compare_states(measured, ["dp4 z3", "dp2 tp2 z3", "dp4 z1 bf16", "dp2 tp2 bf16"])


@pytest.mark.a6_3
def test_a_schedule_holds_the_blocks_of_the_microbatches_in_flight():
    """Every chunk has 2 blocks here, so a rank holds 2 blocks per stash the checker counts."""
    shape = ModelShape(8, 32, 4, 16, 13)
    for schedule, p, m, v in [("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1), ("gpipe", 4, 3, 1),
                              ("interleaved", 2, 4, 2)]:
        layout = Layout(pp=p, microbatches=m, batch_size=m, schedule=schedule,
                        virtual_stages=v)
        peaks = check_schedule(build_schedule(schedule, p, m, v)).peak_inflight
        for r in range(p):
            assert {c[0] for c in stage_chunks(shape, layout, r)} == {2}
            got = in_flight_layers(shape, layout, r)[0]
            assert got == 2 * peaks[r], (
                f"{schedule} p={p} m={m} v={v}, rank {r}: {got} blocks in flight, the checker "
                f"holds {peaks[r]} stashes of 2 blocks")


@pytest.mark.a6_3
def test_activations_are_within_10_percent_of_the_measured(measured):
    """(Not under ZeRO-3: there the arrays a step saves share blocks of memory differently
    from run to run, 426,496 and 434,688 bytes in two runs of the same dp 2 × tp 2 step.)"""
    compare_activations(measured, ["dp4", "tp4", "dp2 tp2 sp", "dp2 tp2 bf16", "dp4 z1 bf16"])


@pytest.mark.a6_3
def test_pipeline_activations_are_within_10_percent_of_the_stash(measured):
    compare_activations(measured, ["pp4 m4 1f1b", "dp2 pp2 m4 gpipe", "dp2 pp2 m2 interleaved",
                                   "tp2 pp2 m2 selective", "dp2 pp2 m2 z2"])
