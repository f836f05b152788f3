"""Ranks that disagree at start-up all exit 2, promptly, and rank 0 says who found what.

Each rank of these jobs is started with its own arguments or in its own directory (an MPMD
launch: ``mpirun -n 1 [-wdir A] python train.py ARGS : -n 1 [-wdir B] python train.py ARGS'``),
which is how a typo in a launch script, or machines holding different copies of a file, look
to mpipar. Before the start-up agreement, a rank that found a problem exited alone and the
others waited forever.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARGS, TINY_TEXT, TRAIN, describe_run
from mpi_util import mpirun_path, run_killable

from mpipar.agreement import ERROR, HELP, RankReport, judge
from mpipar.checkpoint import load_checkpoint, save_checkpoint


def run_ranks(per_rank: list[list], cwds: list[Path] | None = None, timeout: float = 60):
    """One ``train.py`` process per entry of ``per_rank`` (its arguments), in one MPI job;
    rank i runs in ``cwds[i]`` when given. Returns the process and its wall time."""
    cmd = [mpirun_path()]
    for i, args in enumerate(per_rank):
        cmd += [":"] if i else []
        cmd += ["-n", "1", *(["-wdir", str(cwds[i])] if cwds else [])]
        cmd += [sys.executable, str(TRAIN), *map(str, args)]
    t0 = time.monotonic()
    proc = run_killable(cmd, timeout=timeout)
    return proc, time.monotonic() - t0


def error_lines(proc) -> list[str]:
    assert proc.returncode == 2, describe_run(proc)
    assert "Traceback" not in proc.stderr and proc.stdout == "", describe_run(proc)
    assert proc.stderr.count("train.py: error:") == 1, "rank 0 alone prints the verdict"
    return proc.stderr.splitlines()


# --------------------------------------------------------------------------------------------
# The verdict, from the ranks' reports
# --------------------------------------------------------------------------------------------


def test_judge_reports_who_found_what():
    ok = RankReport(config={"--lr": 0.1})
    assert judge([ok, ok]).exit_code is None
    bad = RankReport(ERROR, "--lr must be finite, got nan")
    assert judge([ok, bad, ok]).message == "rank 1: --lr must be finite, got nan"
    assert judge([bad, bad]).message == "--lr must be finite, got nan", "all alike: bare"
    other = RankReport(ERROR, "data file not found: x")
    verdict = judge([bad, other, other])
    assert verdict.exit_code == 2
    assert verdict.message.splitlines() == ["rank 0: --lr must be finite, got nan",
                                            "ranks [1, 2]: data file not found: x"]


def test_judge_help_everywhere_or_nowhere():
    assert judge([RankReport(HELP)] * 3).exit_code == 0
    assert judge([RankReport(HELP), RankReport()]) == judge([RankReport(HELP), RankReport()])
    assert judge([RankReport(HELP), RankReport()]).message == "--help was given to rank 0 only"


def test_judge_names_only_the_differing_settings_and_files():
    a = RankReport(config={"--lr": 0.1, "model": {"d_model": 64, "n_head": 4}})
    b = RankReport(config={"--lr": 0.1, "model": {"d_model": 32, "n_head": 4}})
    message = judge([a, a, b]).message
    assert message.splitlines()[1:] == ["  ranks [0, 1]: model.d_model=64",
                                        "  ranks [2]: model.d_model=32"], message
    same = {"--lr": 0.1}
    x = RankReport(config=same, contents={"--data d.txt": "aa" * 32})
    y = RankReport(config=same, contents={"--data d.txt": "bb" * 32})
    message = judge([x, y]).message
    assert message.startswith("--data d.txt: the ranks read different contents")
    assert "aaaaaaaaaaaa… on rank 0" in message and "bbbbbbbbbbbb… on rank 1" in message


# --------------------------------------------------------------------------------------------
# Real jobs
# --------------------------------------------------------------------------------------------

ONE_RANK_ERRORS = {
    "bad value": (["--lr", "-1"], "rank 1: argument --lr: must be a positive number, got -1"),
    "missing data": (["--data", "/nonexistent"], "rank 1: data file not found: /nonexistent"),
    "wrong layout": (["--dp", "1"], "rank 1: world size 2 != --dp 1 × --tp 1 × --pp 1 = 1"),
}


@pytest.mark.parametrize("case", sorted(ONE_RANK_ERRORS))
def test_a_usage_error_on_one_rank_ends_every_rank(case, tmp_path):
    flags, expected = ONE_RANK_ERRORS[case]
    out = tmp_path / "m.jsonl"
    common = [*TINY_ARGS, "--metrics", out]
    proc, elapsed = run_ranks([common, [*common, *flags]])
    assert error_lines(proc) == [f"train.py: error: {expected}"]
    assert elapsed < 20, f"the job took {elapsed:.1f} s to end"
    assert not out.exists(), "nothing is written when the ranks do not agree"


def test_ranks_with_different_flags_name_only_the_differing_flags():
    proc, _ = run_ranks([TINY_ARGS, [*TINY_ARGS, "--lr", "0.01"]])
    assert error_lines(proc) == [
        "train.py: error: ranks were started with different configurations (2 variants):",
        "  ranks [0]: --lr=0.003", "  ranks [1]: --lr=0.01"]


def test_help_on_one_rank_only():
    proc, _ = run_ranks([TINY_ARGS, [*TINY_ARGS, "--help"]])
    assert error_lines(proc) == ["train.py: error: --help was given to rank 1 only"]


def rank_dirs(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in dirs:
        d.mkdir()
    return dirs


def test_ranks_that_read_different_data_exit_2_naming_the_file(tmp_path):
    """The same --data name, different bytes (the same characters: the vocabulary agrees)."""
    dirs = rank_dirs(tmp_path)
    (dirs[0] / "d.txt").write_text(TINY_TEXT)
    (dirs[1] / "d.txt").write_text(TINY_TEXT[::-1])
    proc, _ = run_ranks([[*TINY_ARGS, "--data", "d.txt"]] * 2, cwds=dirs)
    (line,) = error_lines(proc)
    assert line.startswith("train.py: error: --data d.txt: the ranks read different contents")
    assert "on rank 0" in line and "on rank 1" in line


def test_ranks_that_read_different_checkpoints_exit_2_naming_it(tmp_path, tiny_checkpoint,
                                                                tiny_data):
    dirs = rank_dirs(tmp_path)
    arrays, meta = load_checkpoint(tiny_checkpoint)
    save_checkpoint(dirs[0] / "ck", arrays, meta)
    arrays["model.wpe.weight"] = arrays["model.wpe.weight"] + np.float32(1e-3)
    save_checkpoint(dirs[1] / "ck", arrays, meta)
    args = [*TINY_ARGS, "--steps", "4", "--data", tiny_data, "--resume", "ck"]
    proc, _ = run_ranks([args, args], cwds=dirs)
    (line,) = error_lines(proc)
    assert line.startswith("train.py: error: --resume ck: the ranks read different contents")


def test_a_wrong_world_size_is_reported_with_every_other_problem(tmp_path):
    """The world-size error no longer hides the rest: one message lists all of them."""
    proc, _ = run_ranks([[*TINY_ARGS, "--dp", "3", "--dropout", "1", "--data", "/nonexistent",
                          "--metrics", tmp_path / "no_dir" / "m.jsonl"]] * 2)
    lines = error_lines(proc)
    assert lines[0] == "train.py: error: invalid configuration:", lines
    for fragment in ("world size 2 != --dp 3", "--dropout must be in [0, 1), got 1.0",
                     "data file not found: /nonexistent", "no_dir does not exist",
                     "--batch-size 8 is not divisible by --dp 3"):
        assert any(fragment in line for line in lines[1:]), f"{fragment!r} missing: {lines}"
