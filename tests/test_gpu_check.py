"""``make gpu-check`` (bench/gpu_check.py) without a GPU: it says so and claims nothing; and its
whole comparison logic run against the CPU stand-in for cupy, which must pass, and against a
deliberately wrong device module, which must fail."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO, describe_run
from device_util import device_env, real_cupy

SCRIPT = "bench/gpu_check.py"
FAST = ["--no-tests", "--steps", "2", "--bench-steps", "3", "--precisions", "fp32"]

# A device module that is the stand-in with tanh (GELU's) off by 1e-6: a GPU kernel bug.
WRONG_MODULE = '''
import fakecupy
from fakecupy import *  # noqa: F403
from fakecupy import _FUNCTIONS


def tanh(x, *args, **kwargs):
    y = fakecupy.tanh(x, *args, **kwargs)  # y is out= when given
    y += 1e-6
    return y


_FUNCTIONS["tanh"] = tanh
'''


@pytest.mark.skipif(real_cupy() is not None, reason="this machine has a GPU")
def test_without_a_gpu_it_checks_nothing_and_says_so(run_python):
    proc = run_python([SCRIPT], timeout=60)
    assert proc.returncode == 0, describe_run(proc)
    assert "no GPU here" in proc.stdout and "Nothing was checked." in proc.stdout
    assert " ok " not in proc.stdout and "passed" not in proc.stdout


def test_every_comparison_runs_against_the_standin(run_python):
    proc = run_python([SCRIPT, "--module", "fakecupy", "--exact", "--layouts", "pp",
                       "--cuda-aware", "--bench-presets", "tiny", *FAST], timeout=180,
                      env=device_env("fakecupy"))
    assert proc.returncode == 0, describe_run(proc)
    for line in ("ok   1 process", "ok   pp 2, host-staged", "ok   pp 2, CUDA-aware",
                 "tokens/s", "gpu-check: all passed"):
        assert line in proc.stdout, describe_run(proc)


def test_a_wrong_device_fails_the_check(run_python, tmp_path):
    (tmp_path / "wrongcupy.py").write_text(WRONG_MODULE, encoding="utf-8")
    env = device_env("wrongcupy")
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = run_python([SCRIPT, "--module", "wrongcupy", "--layouts", "", "--bench-presets", "",
                       *FAST], timeout=120, env=env)
    assert proc.returncode == 1, describe_run(proc)
    assert "FAIL 1 process" in proc.stdout and "relative difference" in proc.stdout, (
        describe_run(proc))


def test_the_benchmark_models_are_train_py_s():
    """The PyTorch side of the throughput comparison builds the model train.py builds."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    from mpipar.model import PRESETS

    assert gpu_check.model_config(gpu_check.BENCH["tiny"]) == PRESETS["tiny"]
    assert gpu_check.model_config(gpu_check.BENCH["large"]) == dict(
        n_layer=8, n_head=8, d_model=512, seq_len=256, batch_size=32)
