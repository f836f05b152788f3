"""A5, pipeline parallelism (tutorials/04_pipeline_parallel.md): schedules as data, executed.

Stage bounds and schedules are checked without MPI: the checker must accept every schedule
(every send meets its receive, no cycle of waits), its simulated bubble must equal the
formula, and 1F1B must hold p − r microbatches where GPipe holds m. The executor and the tied
embedding run under MPI (``mpi/a5.py``) and must reproduce the 1-process gradients and
training at pp 2 and 4 (float64, 1e-10).
"""

from __future__ import annotations

import pytest
from course_mpi import launch, passed

from mpipar.parallel.pipeline.checker import check_schedule, theoretical_bubble
from mpipar.parallel.pipeline.instructions import OptimizerStep, ReduceGrads
from mpipar.parallel.pipeline.schedules import format_schedule, gpipe, one_f_one_b
from mpipar.parallel.pipeline.stages import describe_stages, stage_bounds

SIZES = [(p, m) for p in (1, 2, 3, 4) for m in (1, 2, 3, 4, 5, 8)]
BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b}
# Schedules the executor runs under MPI: (name, microbatches, chunks per rank). Neither uses
# the student's gpipe or one_f_one_b, so A5.3 is graded on its own.
RUNS = {2: [["naive", 3, 1], ["interleaved", 4, 2]], 4: [["naive", 2, 1]]}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"pp{n}")
def executor(request):
    runs = RUNS[request.param]
    return runs, launch(request.param, "a5.py", "executor", {"runs": runs})


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"pp{n}")
def tied(request):
    return launch(request.param, "a5.py", "tied", timeout=120)


# ---- A5.1 stage bounds --------------------------------------------------------------------------
@pytest.mark.a5_1
def test_stage_bounds_cut_consecutive_blocks_as_evenly_as_possible():
    for layers in range(1, 13):
        for stages in range(1, layers + 1):
            bounds = stage_bounds(layers, stages)
            assert len(bounds) == stages, (layers, stages, bounds)
            assert bounds[0][0] == 0 and bounds[-1][1] == layers, (layers, stages, bounds)
            assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True)), bounds
            sizes = [hi - lo for lo, hi in bounds]
            assert sizes == sorted(sizes, reverse=True), f"later stages larger: {bounds}"
            assert max(sizes) - min(sizes) <= 1, f"uneven: {bounds}"


@pytest.mark.a5_1
@pytest.mark.parametrize("layers, stages", [(3, 4), (4, 0)])
def test_stage_bounds_refuse_a_stage_without_a_block(layers, stages):
    with pytest.raises(ValueError):
        stage_bounds(layers, stages)


@pytest.mark.a5_1
def test_the_chapters_stage_layouts():
    assert describe_stages(n_layer=4, p=4).splitlines()[0] == \
        "rank 0: chunk 0 = stage 0 (embedding, block 0)"
    assert describe_stages(n_layer=8, p=2, v=2).splitlines()[1] == \
        "rank 1: chunk 0 = stage 1 (blocks 2–3)   chunk 1 = stage 3 (blocks 6–7, head, loss)"
    assert describe_stages(n_layer=5, p=2).splitlines()[0] == \
        "rank 0: chunk 0 = stage 0 (embedding, blocks 0–2)"


# ---- A5.2 GPipe and 1F1B ------------------------------------------------------------------------
@pytest.mark.a5_2
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_the_checker_accepts_the_schedule_and_its_bubble_is_the_theorys(name):
    for p, m in SIZES:
        schedule = BUILDERS[name](p, m)
        assert len(schedule) == p, f"{name} p={p} m={m}: {len(schedule)} lists for {p} ranks"
        report = check_schedule(schedule, name=name)
        want = theoretical_bubble(name, p, m)
        assert abs(report.bubble_fraction - want) < 1e-9, (
            f"{name} p={p} m={m}: simulated bubble {report.bubble_fraction:.4f}, "
            f"theory (p − 1)/(m + p − 1) = {want:.4f}")


@pytest.mark.a5_2
def test_1f1b_holds_p_minus_r_microbatches_where_gpipe_holds_m():
    for p, m in SIZES:
        assert check_schedule(gpipe(p, m)).peak_inflight == [m] * p, f"gpipe p={p} m={m}"
        want = [min(p - r, m) for r in range(p)]
        got = check_schedule(one_f_one_b(p, m)).peak_inflight
        assert got == want, f"1f1b p={p} m={m}: peak in flight {got}, expected {want}"


@pytest.mark.a5_2
def test_the_order_of_forwards_and_backwards():
    assert format_schedule(gpipe(2, 3), compute_only=True).splitlines() == [
        "rank 0: F0 F1 F2 B2 B1 B0", "rank 1: F0 F1 F2 B2 B1 B0"]
    assert format_schedule(one_f_one_b(4, 8), compute_only=True).splitlines()[0] == \
        "rank 0: F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7"
    for name, build in BUILDERS.items():
        for program in build(3, 4):
            assert program[-2:] == [ReduceGrads(), OptimizerStep()], f"{name}: list's end"


# ---- A5.3 the executor --------------------------------------------------------------------------
@pytest.mark.a5_3
def test_pipelined_gradients_equal_the_1_process_ones(executor):
    runs, verdict = executor
    passed(verdict, *[f"{name}_m{m}" for name, m, _ in runs])


@pytest.mark.a5_3
def test_the_stash_peaks_where_the_schedule_says(executor):
    runs, verdict = executor
    passed(verdict, *[f"{name}_m{m}_stash" for name, m, _ in runs])


# ---- A5.4 the tied embedding --------------------------------------------------------------------
@pytest.mark.a5_4
def test_both_copies_of_the_tied_embedding_get_the_whole_gradient(tied):
    passed(tied, "tied_grads")


@pytest.mark.a5_4
def test_pipeline_training_equals_the_1_process_run(tied):
    passed(tied, "training")
