"""A4, tensor parallelism (tutorials/03_tensor_parallel.md): each layer against the serial one.

The MPI side is ``mpi/a4.py``. Every parallel layer holds its shard of the same seeded full
parameters as the 1-process layer; its outputs and gradients must equal the matching parts of
the 1-process ones (float64, 1e-10). From the trace: f all-reduces in backward only and g in
forward only; a GPT step makes 2L + 1 all-reduces of one (B, T, d) activation each way; the
loss never gathers the logits.
"""

from __future__ import annotations

import pytest
from course_mpi import launch, passed


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def mappings(request):
    return launch(request.param, "a4.py", "mappings")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def layers(request):
    return launch(request.param, "a4.py", "layers")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"tp{n}")
def vocab_loss(request):
    return launch(request.param, "a4.py", "vocab_loss")


@pytest.fixture(scope="module")
def sequence():
    return launch(2, "a4.py", "sequence")


# ---- A4.1 f and g -------------------------------------------------------------------------------
@pytest.mark.a4_1
@pytest.mark.parametrize("operator", ["f", "g"])
def test_operator_forward_and_backward(mappings, operator):
    passed(mappings, operator)


@pytest.mark.a4_1
@pytest.mark.parametrize("operator", ["f", "g"])
def test_operator_all_reduces_in_one_direction_only(mappings, operator):
    passed(mappings, f"{operator}_trace")


# ---- A4.2 column- and row-parallel linear -------------------------------------------------------
@pytest.mark.a4_2
@pytest.mark.parametrize("layer", ["column", "column_qkv", "row"])
def test_parallel_linear_matches_the_serial_layer(layers, layer):
    passed(layers, layer)


@pytest.mark.a4_2
@pytest.mark.parametrize("layer", ["column", "column_qkv", "row"])
def test_parallel_linear_communicates_once_in_the_right_direction(layers, layer):
    passed(layers, f"{layer}_trace")


@pytest.mark.a4_2
def test_a_tensor_parallel_gpt_step_matches_the_serial_one(layers):
    passed(layers, "gpt")


@pytest.mark.a4_2
def test_a_gpt_step_makes_2l_plus_1_allreduces_each_way(layers):
    passed(layers, "gpt_trace")


# ---- A4.3 vocab-parallel cross-entropy ----------------------------------------------------------
@pytest.mark.a4_3
def test_vocab_parallel_loss_and_gradient_match_the_serial_ones(vocab_loss):
    passed(vocab_loss, "vocab_loss")


@pytest.mark.a4_3
def test_the_loss_never_gathers_the_logits(vocab_loss):
    passed(vocab_loss, "vocab_loss_trace")


# ---- A4.4 sequence parallelism (bonus) ----------------------------------------------------------
@pytest.mark.a4_4
def test_sequence_all_gather_and_reduce_scatter_are_conjugates(sequence):
    passed(sequence, "sequence_gather", "sequence_reduce_scatter")


@pytest.mark.a4_4
def test_a_sequence_parallel_gpt_step_matches_the_serial_one(sequence):
    passed(sequence, "gpt_sequence_parallel")
