"""A3, ZeRO (tutorials/02_data_parallel.md §6): sharded gradients and optimizer state.

The MPI side is ``mpi/a3.py``. Graded: each rank's gradient shard and moments equal its slice
of the 1-process values (float64, 1e-10), training equals the 1-process run, the optimizer
state takes 1/dp of the bytes, the trace shows a reduce-scatter and no all-reduce, and a
checkpoint saved by 4 ranks resumes on 1 exactly as if never stopped.
"""

from __future__ import annotations

import json

import pytest
from course_mpi import launch, passed, run_train

VARIANTS = ["zero1_mpi", "zero2_mpi", "zero1_ring", "zero2_ring"]
TRAINED = ["zero1_mpi", "zero2_mpi", "zero2_ring"]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"dp{n}")
def reduce_scatter(request):
    return launch(request.param, "a3.py", "reduce_scatter")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"dp{n}")
def adamw(request):
    return launch(request.param, "a3.py", "adamw", timeout=120)


@pytest.fixture(scope="module")
def state():
    return launch(4, "a3.py", "state", timeout=120)


# ---- A3.1 reduce-scatter ------------------------------------------------------------------------
@pytest.mark.a3_1
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_rank_keeps_the_average_gradient_of_its_shard(reduce_scatter, variant):
    passed(reduce_scatter, variant)


@pytest.mark.a3_1
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gradients_are_reduce_scattered_not_all_reduced(reduce_scatter, variant):
    passed(reduce_scatter, f"{variant}_trace")


# ---- A3.2 sharded AdamW -------------------------------------------------------------------------
@pytest.mark.a3_2
@pytest.mark.parametrize("variant", TRAINED)
def test_zero_training_equals_the_1_process_run(adamw, variant):
    passed(adamw, variant)


@pytest.mark.a3_2
@pytest.mark.parametrize("variant", TRAINED)
def test_each_rank_holds_its_slice_of_the_moments(adamw, variant):
    passed(adamw, f"{variant}_moments")


@pytest.mark.a3_2
@pytest.mark.parametrize("variant", TRAINED)
def test_optimizer_state_bytes_are_one_over_dp(adamw, variant):
    passed(adamw, f"{variant}_bytes")


# ---- A3.3 gather for checkpoints ----------------------------------------------------------------
@pytest.mark.a3_3
@pytest.mark.parametrize("variant", ["zero1_mpi", "zero2_ring"])
def test_state_dict_is_plain_adamws(state, variant):
    passed(state, f"{variant}_state_dict")


@pytest.mark.a3_3
@pytest.mark.parametrize("variant", ["zero1_mpi", "zero2_ring"])
def test_load_state_dict_keeps_this_ranks_slice(state, variant):
    passed(state, f"{variant}_load")


@pytest.mark.a3_3
def test_a_dp4_zero2_checkpoint_resumes_on_one_rank(tmp_path):
    run = ["--preset", "tiny", "--n-layer", "2", "--d-model", "32", "--steps", "6",
           "--dtype", "float64", "--eval-every", "0", "--quiet"]
    run_train(1, [*run, "--metrics", tmp_path / "straight.jsonl"])
    run_train(4, [*run, "--dp", "4", "--zero", "2", "--stop-at", "3", "--save",
                  tmp_path / "ckpt", "--metrics", tmp_path / "first.jsonl"])
    run_train(1, [*run, "--resume", tmp_path / "ckpt", "--metrics", tmp_path / "second.jsonl"])

    def losses(name: str) -> dict[int, float]:
        lines = (tmp_path / name).read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    straight, first, second = losses("straight.jsonl"), losses("first.jsonl"), losses(
        "second.jsonl")
    assert sorted(first) == [0, 1, 2] and sorted(second) == [3, 4, 5], (sorted(first),
                                                                        sorted(second))
    for step, want in straight.items():
        got = (first | second)[step]
        assert abs(got - want) <= 1e-10 * abs(want), (
            f"step {step}: loss {got!r} after saving on 4 ranks and resuming on 1, "
            f"{want!r} without stopping")
