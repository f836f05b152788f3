"""Knowledge distillation: the KL term's gradient, the mixed loss, and ``train.py --teacher``.

* the soft-target KL against central differences in float64 (temperatures below, at and
  above 1, a teacher distribution with a zero), its value against the formula, zero when the
  student already matches the teacher;
* with weight 0 the objective is the plain cross-entropy, the same number;
* ``train.py --teacher`` in float64 on 2 data-parallel ranks reproduces the 1-process run's
  losses to 1e-10 (each rank runs the teacher on its own rows), and the layouts that cannot
  host a teacher (tp, pp) exit 2 naming the reason, as does a teacher of another vocabulary.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_ARGS, check_ok, describe_run
from gradcheck import check_gradients
from mpi_util import run_mpi

from mpipar.autograd import Tensor, no_grad
from mpipar.distill import Distillation, soft_target_kl, softmax
from mpipar.grid import ProcessGrid
from mpipar.inference import InferenceModel
from mpipar.model import GPT, GPTConfig


def teacher_probs(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    p = softmax(np.random.default_rng(seed).standard_normal(shape) * 2, 1.0)
    p[0, 0, :2] = 0.0  # a teacher sure that two tokens are impossible
    p[0, 0] /= p[0, 0].sum()
    return p


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_kl_gradient_matches_central_differences(temperature):
    logits = Tensor(np.random.default_rng(1).standard_normal((2, 3, 6)) * 3, requires_grad=True)
    probs = teacher_probs(2, (2, 3, 6))
    check_gradients(lambda z: soft_target_kl(z, probs, temperature), {"z": logits},
                    label=f"soft_target_kl T={temperature}")


def test_kl_value():
    z = np.random.default_rng(3).standard_normal((4, 5, 7))
    p = teacher_probs(4, (4, 5, 7))
    for t in (0.7, 2.0):
        q = softmax(z, t)
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / q), 0.0)
        want = terms.sum() / 20
        got = float(soft_target_kl(Tensor(z), p, t).data)
        assert abs(got - want) <= 1e-13 * want
        assert abs(float(soft_target_kl(Tensor(z), softmax(z, t), t).data)) < 1e-14


def test_weight_zero_is_the_plain_cross_entropy():
    cfg = GPTConfig(vocab_size=7, n_layer=1, n_head=2, d_model=8, seq_len=6, dtype="float64")
    student = GPT(cfg)
    student.initialize(1)
    teacher = InferenceModel(cfg, ProcessGrid.single())
    teacher.load({n: p.data + 0.1 for n, p in student.named_parameters()})
    x = np.random.default_rng(0).integers(0, 7, size=(3, 6))
    y = np.roll(x, -1, axis=1)
    with no_grad():
        plain = float(student(x, y).data)
        mixed = Distillation(teacher, 0.0, 2.0, np.float64).loss(student, x, y, None)
        half = Distillation(teacher, 0.5, 2.0, np.float64).loss(student, x, y, None)
        kl = float(soft_target_kl(student(x), Distillation(teacher, 0.5, 2.0, np.float64)
                                  .teacher_probs(x), 2.0).data)
    assert float(mixed.data) == plain
    assert float(half.data) == pytest.approx(0.5 * plain + 0.5 * 4.0 * kl, rel=1e-14)


STUDENT = [*TINY_ARGS, "--n-layer", "2", "--d-model", "32", "--steps", "4", "--dtype",
           "float64", "--distill-alpha", "0.7", "--distill-temperature", "2", "--quiet"]


def losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()
            if '"loss"' in line]


def test_data_parallel_distillation_equals_one_process(run_train, tiny_checkpoint, tiny_data,
                                                       tmp_path):
    args = [*STUDENT, "--data", tiny_data, "--teacher", tiny_checkpoint]
    check_ok(run_train([*args, "--metrics", tmp_path / "one.jsonl"]))
    check_ok(run_train([*args, "--dp", "2", "--metrics", tmp_path / "dp2.jsonl"], n=2))
    one, dp2 = losses(tmp_path / "one.jsonl"), losses(tmp_path / "dp2.jsonl")
    assert len(one) == 4
    np.testing.assert_allclose(dp2, one, rtol=1e-10, err_msg="dp 2 vs 1 process")


def test_layouts_without_a_teacher_exit_2(tiny_checkpoint, tiny_data):
    proc = run_mpi(2, ["train.py", *STUDENT, "--data", tiny_data, "--teacher", tiny_checkpoint,
                       "--tp", "2"], timeout=60)
    assert proc.returncode == 2, describe_run(proc)
    assert proc.stderr.count("error:") == 1
    assert "needs --tp 1 and --pp 1 (got --tp 2 --pp 1)" in proc.stderr, proc.stderr


def test_teacher_of_another_vocabulary_exits_2(run_train, tiny_checkpoint, text_file):
    data = text_file("abc.txt", "abcabd " * 200)
    proc = run_train([*STUDENT, "--data", data, "--teacher", tiny_checkpoint])
    assert proc.returncode == 2, describe_run(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "vocabulary" in lines[0] and "--teacher" in lines[0], lines

