"""Nothing is lost at the end: outputs are checked before step 0, checkpoints are written
during training (--save-every), and the metrics file stays strict JSON.

The output rule (mpipar/outputs.py, docs/design.md §7): every output's parent directory must
exist, the directory must accept a new file, and no two outputs (nor an output and the data)
share a path. Each broken rule is exit 2 before training, naming the flag and the path.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARGS, TRAIN, check_ok, describe_run
from mpi_util import run_killable, script

from mpipar.checkpoint import load_checkpoint
from mpipar.metrics import MetricsWriter

FAULTY = script("faulty_train.py")


def refused(proc, *fragments: str) -> list[str]:
    """Exit 2 before training: nothing on stdout, every fragment on stderr."""
    assert proc.returncode == 2, describe_run(proc)
    assert proc.stdout == "" and "Traceback" not in proc.stderr, describe_run(proc)
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} missing\n{describe_run(proc)}"
    return proc.stderr.splitlines()


def test_unwritable_system_paths_are_refused_before_training(run_train, tiny_data):
    proc = run_train([*TINY_ARGS, "--data", tiny_data, "--save", "/dev/null/ck",
                      "--metrics", "/proc/m.jsonl", "--trace", "/proc/t.jsonl"], timeout=60)
    refused(proc, "--save /dev/null/ck: /dev/null is not a directory",
            "--metrics /proc/m.jsonl: cannot write in /proc", "--trace /proc/t.jsonl: cannot "
            "write in /proc")
    proc = run_train([*TINY_ARGS, "--data", tiny_data, "--save", "/proc/ck",
                      "--metrics", "/dev/null/m.jsonl"], timeout=60)
    refused(proc, "--save /proc/ck: cannot write in /proc",
            "--metrics /dev/null/m.jsonl: /dev/null is not a directory")


def without_permission_override() -> list[str]:
    """A command prefix under which file permissions apply: none for an ordinary user; for
    root, ``setpriv`` dropping the capabilities that let root ignore them. (Root stays the
    owner of the test's Python under /root, which another user could not even read.)"""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"] \
        if setpriv else []
    if not setpriv or subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop the right to ignore file "
                    "permissions here: a read-only directory would not stop this process")
    return prefix


def test_read_only_directory_and_files_are_refused_before_training(tmp_path, tiny_data):
    prefix = without_permission_override()
    ro = tmp_path / "ro"
    ro.mkdir()
    for name in ("m.jsonl", "t.jsonl"):
        (ro / name).write_text("keep\n")
        (ro / name).chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    ro.chmod(stat.S_IRWXU & ~stat.S_IWUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        proc = run_killable([*prefix, sys.executable, str(TRAIN), *TINY_ARGS, "--data",
                             str(tiny_data), "--save", str(ro / "ck"), "--metrics",
                             str(ro / "m.jsonl"), "--trace", str(ro / "t.jsonl")], timeout=60)
    finally:
        ro.chmod(stat.S_IRWXU)
    refused(proc, f"--save {ro / 'ck'}: cannot write in {ro}: Permission denied",
            f"--metrics {ro / 'm.jsonl'}: the file is not writable",
            f"--trace {ro / 't.jsonl'}: the file is not writable")
    assert sorted(p.name for p in ro.iterdir()) == ["m.jsonl", "t.jsonl"]


def test_one_rule_for_missing_directories(run_train, tiny_data, tmp_path):
    """--save used to create missing directories while --metrics refused them: now every
    output refuses them, and nothing is created."""
    for flag, name in (("--save", "ck"), ("--metrics", "m.jsonl"), ("--trace", "t.jsonl")):
        path = tmp_path / "new" / name
        proc = run_train([*TINY_ARGS, "--data", tiny_data, flag, path], timeout=60)
        refused(proc, f"{flag} {path}: directory {tmp_path / 'new'} does not exist")
    assert not (tmp_path / "new").exists()


def test_one_path_for_two_outputs_is_refused(run_train, tiny_data, tmp_path):
    same = tmp_path / "x.jsonl"
    refused(run_train([*TINY_ARGS, "--data", tiny_data, "--metrics", same, "--trace", same],
                      timeout=60),
            f"--trace {same} is also written by --metrics")
    refused(run_train([*TINY_ARGS, "--data", tiny_data, "--metrics", tiny_data], timeout=60),
            f"--metrics would overwrite --data {tiny_data}")
    assert not same.exists()


# --------------------------------------------------------------------------------------------
# --save-every
# --------------------------------------------------------------------------------------------


def test_save_every_keeps_the_latest_checkpoint_through_a_crash(tiny_data, tmp_path):
    """A run that dies at step 5 of 6, saving every 2 steps, keeps step 4 and resumes."""
    ck = tmp_path / "ck"
    args = [*TINY_ARGS, "--steps", "6", "--data", str(tiny_data), "--save", str(ck),
            "--save-every", "2"]
    proc = run_killable([sys.executable, FAULTY, *args], timeout=60,
                        env={"MPIPAR_TEST_FAULT": "0:5:raise"})
    assert proc.returncode == 1 and "rank 0 failed on purpose at step 5" in proc.stderr, \
        describe_run(proc)
    assert proc.stdout.count("saved checkpoint to") == 2, describe_run(proc)
    assert load_checkpoint(ck)[1]["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ck"], "atomic: no copies left behind"
    resumed = check_ok(run_killable([sys.executable, str(TRAIN), *args, "--resume", str(ck)],
                                    timeout=60))
    assert "resuming at step 4" in resumed.stdout
    assert load_checkpoint(ck)[1]["step"] == 6


def test_save_every_needs_save(run_train):
    refused(run_train([*TINY_ARGS, "--save-every", "2"], timeout=60),
            "--save-every 2 needs --save DIR")


# --------------------------------------------------------------------------------------------
# Strict JSON metrics, and values checked before training
# --------------------------------------------------------------------------------------------


def strict(line: str) -> dict:
    """``json.loads`` that refuses NaN and Infinity, as most JSON readers do."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_metrics_writer_writes_nan_as_null(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = MetricsWriter(str(path), active=True)
    writer.write({"step": 3, "loss": float("nan"), "grad_norm": float("inf"),
                  "comm": {"x": [1.5, float("-inf")]}})
    writer.close()
    assert strict(path.read_text()) == {"step": 3, "loss": None, "grad_norm": None,
                                        "comm": {"x": [1.5, None]}}


def test_a_nan_loss_leaves_a_strict_json_metrics_file(run_train, tiny_data, tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = run_train([*TINY_ARGS, "--steps", "4", "--data", tiny_data, "--lr", "1e30",
                      "--grad-clip", "0", "--warmup-steps", "0", "--metrics", metrics],
                     timeout=60)
    assert proc.returncode == 1 and "loss became nan at step 1" in proc.stderr, \
        describe_run(proc)
    records = [strict(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and records[1]["loss"] is None


def test_temperature_nan_is_refused_before_training(run_train, run_python, tiny_checkpoint,
                                                    tmp_path):
    metrics = tmp_path / "m.jsonl"
    refused(run_train([*TINY_ARGS, "--sample", "5", "--temperature", "nan", "--metrics",
                       metrics], timeout=60), "--temperature must be finite and >= 0, got nan")
    assert not metrics.exists()
    proc = run_python(["-m", "mpipar.sample", "--checkpoint", tiny_checkpoint,
                       "--temperature", "nan"], timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe_run(proc)
    assert "--temperature: must be finite and >= 0, got nan" in proc.stderr
    assert Path(tiny_checkpoint).is_dir()
