"""A2, data parallelism (tutorials/02_data_parallel.md): equivalence at dp 2, 3, 4 and the trace.

The MPI side is ``mpi/a2.py``; every gradient is compared with the 1-process full-batch
gradient in float64 (1e-10 relative), and the ring and the buckets are judged by what the
trace records (which calls, to whom, how many bytes, when), never by how long they took.
"""

from __future__ import annotations

import numpy as np
import pytest
from course_mpi import launch, passed

from mpipar.comm import Comm
from mpipar.data import shard_rows, split_microbatches
from mpipar.model import GPTConfig, build_model
from mpipar.parallel.data_parallel import DataParallel, assign_buckets

CFG = GPTConfig(vocab_size=13, n_layer=2, n_head=2, d_model=16, seq_len=8, dtype="float64")


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"dp{n}")
def average(request):
    return launch(request.param, "a2.py", "average")


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"n{n}")
def ring(request):
    return launch(request.param, "a2.py", "ring")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"dp{n}")
def buckets(request):
    return launch(request.param, "a2.py", "buckets")


@pytest.fixture(scope="module")
def accumulate():
    return launch(2, "a2.py", "accumulate")


# ---- A2.1 shard rows and average ----------------------------------------------------------------
@pytest.mark.a2_1
def test_shard_rows_cuts_contiguous_blocks_in_rank_order():
    x = np.arange(24).reshape(12, 2)
    shards = [shard_rows(x, r, 3) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), x)
    assert all(s.shape == (4, 2) for s in shards)
    assert np.shares_memory(shards[1], x), "a shard should be a view, not a copy"
    with pytest.raises(ValueError):
        shard_rows(x, 0, 5)  # 12 rows do not split into 5 equal shards


@pytest.mark.a2_1
def test_sharded_gradients_averaged_equal_the_full_batch_gradient(average):
    passed(average, "shard_rows", "average")


# ---- A2.2 ring ----------------------------------------------------------------------------------
@pytest.mark.a2_2
def test_ring_allreduce_equals_the_sum(ring):
    passed(ring, "ring_sum")


@pytest.mark.a2_2
def test_ring_sends_2_n_minus_1_messages_of_ceil_b_over_n_and_no_allreduce(ring):
    passed(ring, "ring_trace")


@pytest.mark.a2_2
def test_ring_average_of_real_gradients_equals_the_full_batch_gradient(ring):
    passed(ring, "ring_average")


# ---- A2.3 buckets and overlap -------------------------------------------------------------------
@pytest.mark.a2_3
def test_every_parameter_gradient_is_a_view_of_one_flat_buffer():
    model = build_model(CFG, 1)
    dp = DataParallel(model.parameters(), Comm.self_group("dp"), strategy="flat")
    for p, offset in zip(model.parameters(), dp.offsets, strict=True):
        assert np.shares_memory(p.grad, dp.flat_grads), f"{p.name}.grad is not in the buffer"
        p.grad[...] = 1.0
        assert np.all(dp.flat_grads[offset:offset + p.size] == 1.0), f"{p.name} misplaced"
    assert dp.flat_grads.shape == (sum(p.size for p in model.parameters()),)


@pytest.mark.a2_3
def test_buckets_are_closed_from_the_last_parameter():
    assert assign_buckets([4, 4, 4, 4], 8) == [[3, 2], [1, 0]]
    assert assign_buckets([4, 4, 4], 8) == [[2, 1], [0]]  # the first parameters: a short bucket
    assert assign_buckets([1, 20, 1], 8) == [[2, 1], [0]]  # a big parameter closes its bucket
    assert assign_buckets([4, 4], 0) == [[1], [0]]
    assert assign_buckets([4, 4], float("inf")) == [[1, 0]]


@pytest.mark.a2_3
@pytest.mark.parametrize("strategy", ["per_param", "flat", "bucketed", "bucketed_no_overlap"])
def test_every_strategy_reproduces_the_full_batch_gradient(buckets, strategy):
    passed(buckets, strategy)


@pytest.mark.a2_3
def test_a_bucket_starts_before_backward_ends(buckets):
    passed(buckets, "bucketed_trace", "per_param_trace")


@pytest.mark.a2_3
def test_without_overlap_every_bucket_waits_for_the_end_of_backward(buckets):
    passed(buckets, "bucketed_no_overlap_trace", "flat_trace")


# ---- A2.4 accumulation --------------------------------------------------------------------------
@pytest.mark.a2_4
def test_split_microbatches_cuts_equal_views_in_order():
    x = np.arange(16).reshape(8, 2)
    parts = split_microbatches(x, 4)
    assert len(parts) == 4 and all(p.shape == (2, 2) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), x)
    assert np.shares_memory(parts[2], x)
    with pytest.raises(ValueError):
        split_microbatches(x, 3)


@pytest.mark.a2_4
def test_with_sync_off_backward_only_accumulates(accumulate):
    passed(accumulate, "set_sync")


@pytest.mark.a2_4
def test_four_microbatches_train_like_one_and_communicate_once(accumulate):
    passed(accumulate, "microbatches", "microbatches_trace")
