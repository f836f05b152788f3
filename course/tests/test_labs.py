"""Detectors of the break-it labs (course/labs/): one test per lab, named ``test_L<nn>_...``.

Each passes on the reference and fails on its own lab's tree only (``python -m mpipar.course
check`` proves both). The MPI side is ``mpi/labs.py``; every comparison is with the
1-process computation in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from course_mpi import launch, passed

from mpipar.data import CharTokenizer, get_batch, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def two():
    return launch(2, "labs.py", "two")


def test_L01_data_parallel_gradients_are_the_average_of_the_shards(two):
    passed(two, "dp_average")


def test_L02_ring_allreduce_sums_on_three_ranks():
    passed(launch(3, "labs.py", "ring3"), "ring3")


def test_L03_ring_allreduce_of_8_mb_finishes():
    passed(launch(2, "labs.py", "eager", timeout=60), "ring_large")


def test_L04_row_parallel_backward_matches_the_serial_layer(two):
    passed(two, "row_backward")


def test_L05_column_parallel_backward_matches_the_serial_layer(two):
    passed(two, "column_backward")


def test_L06_tied_embedding_gradient_is_whole_on_both_stages(two):
    passed(two, "tied_embedding")


def test_L07_pipeline_gradients_are_the_mean_over_microbatches(two):
    passed(two, "microbatch_scaling")


def _gradients(microbatches: int) -> dict[str, np.ndarray]:
    text = "".join(f"line {i}: the quick brown fox jumps over a lazy dog.\n" for i in range(40))
    tok = CharTokenizer.from_text(text)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=16, seq_len=8,
                    dropout=0.1, dtype="float64")
    tc = TrainConfig(batch_size=8, microbatches=microbatches, eval_every=0)
    trainer = Trainer(cfg, tc, ProcessGrid.single(), make_dataset(text, tok, seq_len=8),
                      Tracer(0))
    x, y = get_batch(trainer.data.train, tc.batch_size, cfg.seq_len, tc.seed, 0)
    trainer.zero_grad()
    trainer.forward_backward(0, x, y)
    return {p.name: p.grad.copy() for p in trainer.params}


def test_L08_dropout_masks_do_not_depend_on_how_the_batch_is_split():
    one, two_parts = _gradients(1), _gradients(2)
    for name, want in one.items():
        diff = np.max(np.abs(two_parts[name] - want)) / np.max(np.abs(want))
        assert diff < 1e-10, f"{name}: gradient with 2 microbatches differs by {diff:.1e}"


def test_L09_gradient_norm_counts_every_element_once(two):
    passed(two, "grad_norm_counts_once")


def test_L10_vocab_parallel_embedding_of_an_odd_vocabulary(two):
    passed(two, "vocab_offset")


def test_L11_ring_attention_gradient_matches_the_whole_sequence(two):
    passed(two, "ring_attention_gradient")
def test_L12_expert_gradients_are_the_average_over_dp(two):
    passed(two, "expert_gradients")
def test_L13_zero_bubble_gradients_equal_1f1b_at_pp3():
    passed(launch(3, "labs.py", "zb3"), "zb_weights")
