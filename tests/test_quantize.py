"""int8 weight-only quantisation: the rounding, the checkpoint, and who may read it.

* per output channel: every weight is within half a step s_o of its value, each row's largest
  weight maps to ±127, an all-zero row stays zero;
* ``python -m mpipar.quantize`` writes int8 matrices, float32 scales and float vectors, and no
  optimizer state; reading it back gives exactly the weights ``--int8`` rounds a float model
  to in memory; its size is what the formula says;
* generation reads it; training refuses it (exit 2, one line); quantising twice is refused.
(Each tp rank quantising its own shard is checked against the full matrix in
``mpi_scripts/inference_checks.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_ARGS, check_ok, describe_run

from mpipar import generate, quantize
from mpipar.checkpoint import load_checkpoint
from mpipar.grid import ProcessGrid
from mpipar.inference import InferenceModel, load_for_inference
from mpipar.quantize import dequantize, quantize_rows


def test_rounding_is_within_half_a_step_per_row():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 40)) * np.array([1e-3, 0.1, 1, 10, 1e3, 0])[:, None]
    q, s = quantize_rows(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (6,)
    err = np.abs(dequantize(q, s, np.float64) - w)
    assert np.all(err <= s[:, None].astype(np.float64) * (0.5 + 1e-6)), "an error above s/2"
    assert np.all(np.abs(q[:5]).max(axis=1) == 127), "a row's largest weight is not ±127"
    assert not q[5].any() and s[5] == 1.0, "an all-zero row"
    # per-row scales: the small rows keep their resolution despite the 1e3 row
    assert err[0].max() < 1e-5


@pytest.fixture(scope="module")
def int8_checkpoint(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "ckpt8"
    assert quantize.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


def test_checkpoint_holds_int8_matrices_and_reads_back(tiny_checkpoint, int8_checkpoint):
    arrays, meta = load_checkpoint(int8_checkpoint)
    float_arrays, _ = load_checkpoint(tiny_checkpoint)
    assert meta["quantization"]["bits"] == 8 and "train" not in meta
    assert not any(k.startswith("optim.") for k in arrays), "optimizer state was kept"
    loaded, source = load_for_inference(int8_checkpoint), load_for_inference(tiny_checkpoint)
    expected_bytes = 0
    for name, w in source.state.items():
        if w.ndim == 2:
            assert arrays[f"int8.{name}"].dtype == np.int8
            q, s = quantize_rows(w)
            np.testing.assert_array_equal(loaded.state[name], dequantize(q, s, w.dtype))
            expected_bytes += w.size + 4 * w.shape[0]
        else:
            np.testing.assert_array_equal(loaded.state[name], w)
            expected_bytes += w.nbytes
    assert quantize.weight_bytes(arrays) == expected_bytes
    assert quantize.weight_bytes(float_arrays) > 3 * expected_bytes
    # the same numbers as --int8: a float model rounded in memory
    model = InferenceModel(source.cfg, ProcessGrid.single())
    model.load(source.state)
    model.quantize_int8()
    for p in model.model.parameters():
        np.testing.assert_array_equal(p.data, loaded.state[p.name], err_msg=p.name)


def test_generation_reads_it(int8_checkpoint, capsys):
    assert generate.main(["--checkpoint", str(int8_checkpoint), "--prompt", "line", "-n",
                          "12", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("line") and len(out.rstrip("\n")) == 16


def test_quantising_twice_is_refused(int8_checkpoint, tmp_path, capsys):
    assert quantize.main(["--checkpoint", str(int8_checkpoint), "--out",
                          str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already quantised" in err
    assert not (tmp_path / "again").exists()


def test_training_refuses_it(run_train, int8_checkpoint, tiny_data):
    proc = run_train([*TINY_ARGS, "--data", tiny_data, "--resume", int8_checkpoint])
    assert proc.returncode == 2, describe_run(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "int8 weight-only checkpoint" in lines[0], proc.stderr
    assert "--resume" in lines[0]


def test_command_reports_sizes(run_python, tiny_checkpoint, tmp_path):
    proc = check_ok(run_python(["-m", "mpipar.quantize", "--checkpoint", tiny_checkpoint,
                                "--out", tmp_path / "q"], timeout=60))
    assert "smaller" in proc.stdout and "at most 0.5" in proc.stdout, proc.stdout
