"""``python -m mpipar.trace summary``: grouping, ordering, exact numbers, errors, pipes.

Hand-made records have known bytes and times, so every figure of the table is checked
exactly; one test reads the trace of a real 2-process tensor-parallel run and checks the
all-reduce counts that the layout implies (docs/design.md §6).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARGS, check_ok, describe_run
from mpi_util import run_killable

from mpipar.trace import (
    TraceRecord,
    format_grouped_table,
    grouped_totals,
    main,
    write_jsonl,
)


def rec(rank: int, op: str, group: str, nbytes: int, phase: str, step: int,
        seconds: float) -> TraceRecord:
    """A record of ``seconds`` duration, starting at an arbitrary but fixed time."""
    return TraceRecord(rank, op, group, None, nbytes, "float32", (nbytes // 4,), phase, step,
                       None, 10.0, 10.0 + seconds)


# Two ranks, two steps: rank 1 lists its records in another order than rank 0.
RECORDS = [
    rec(0, "allreduce", "tp", 1024, "forward", 0, 0.5),
    rec(0, "allreduce", "tp", 1024, "backward", 0, 0.25),
    rec(0, "allreduce", "dp", 4096, "backward", 1, 1.0),
    rec(0, "allreduce", "tp", 1024, "forward", 1, 0.5),
    rec(1, "allreduce", "dp", 4096, "backward", 1, 2.0),
    rec(1, "allreduce", "tp", 1024, "forward", 1, 0.125),
    rec(1, "allreduce", "world", 8, "optimizer", 1, 0.0625),
    rec(1, "allreduce", "tp", 1024, "forward", 0, 0.5),
    TraceRecord(0, "compute", "", None, 0, "", (), "forward", 0, 0, 10.0, 20.0, "forward"),
]


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.jsonl"
    write_jsonl(str(path), RECORDS)
    return path


def summary(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run the command in this process: ``(exit code, stdout lines)``."""
    code = main(["summary", *argv])
    return code, capsys.readouterr().out.splitlines()


def test_default_groups_by_op_and_group(capsys, trace_file):
    code, lines = summary(capsys, str(trace_file))
    assert code == 0
    assert lines[0] == f"{trace_file}, all steps: communication by op, group, summed over " \
                       "2 rank(s)"
    assert lines[1].split() == ["op", "group", "calls", "bytes", "exact", "bytes", "time", "s"]
    # dp: 2 × 4096 bytes; tp: 5 × 1024 = 5120 bytes; world: 8 bytes. Compute is left out.
    assert lines[3].split() == ["allreduce", "dp", "2", "8.00", "KiB", "8,192", "3.0000"]
    assert lines[4].split() == ["allreduce", "tp", "5", "5.00", "KiB", "5,120", "1.8750"]
    assert lines[5].split() == ["allreduce", "world", "1", "8", "B", "8", "0.0625"]
    assert lines[7].split() == ["total", "8", "13.01", "KiB", "13,320", "4.9375"]
    assert len(lines) == 8


def test_phases_come_in_training_order_and_step_filters(capsys, trace_file):
    code, lines = summary(capsys, str(trace_file), "--by", "phase,group", "--step", "1")
    assert code == 0 and lines[0].startswith(f"{trace_file}, step 1: communication by phase")
    rows = [line.split() for line in lines[3:-2]]
    assert rows == [
        ["forward", "tp", "2", "2.00", "KiB", "2,048", "0.6250"],
        ["backward", "dp", "2", "8.00", "KiB", "8,192", "3.0000"],
        ["optimizer", "world", "1", "8", "B", "8", "0.0625"],
    ]
    assert lines[-1].split() == ["total", "5", "10.01", "KiB", "10,248", "3.6875"]


def test_grouped_totals_by_rank_and_step():
    totals = grouped_totals(RECORDS, ("rank", "step"))
    assert list(totals) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert totals[(0, 0)] == {"calls": 2, "bytes": 2048, "time": 0.75, "exposed": 0.75}
    assert totals[(1, 1)] == {"calls": 3, "bytes": 4096 + 1024 + 8, "time": 2.1875,
                              "exposed": 2.1875}
    assert grouped_totals(RECORDS, ("op",), step=5) == {}
    with pytest.raises(ValueError, match="'shape'"):
        grouped_totals(RECORDS, ("op", "shape"))


def test_table_columns_stay_aligned_with_long_names():
    records = [rec(0, "reduce_scatter", "tp", 3 * 2**20, "backward", 0, 1.0),
               rec(0, "send", "a-very-long-group-name", 40, "forward", 0, 0.5)]
    by = ("op", "group")
    lines = format_grouped_table(grouped_totals(records, by), by).splitlines()
    # Every row, the total included, ends its numbers at the same column.
    assert len({len(line) for line in lines}) == 1
    assert lines[2].split()[:4] == ["reduce_scatter", "tp", "1", "3.00"]


@pytest.mark.parametrize("argv, message", [
    (["--by", "op,shape"], "argument --by: 'op,shape'"),
    (["--by", "op,op"], "give distinct fields"),
    (["--step", "x"], "argument --step"),
])
def test_bad_options_exit_2(capsys, trace_file, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["summary", str(trace_file), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_step_file_and_non_trace_exit_2(capsys, trace_file, tmp_path):
    assert main(["summary", str(trace_file), "--step", "7"]) == 2
    assert f"--step 7: {trace_file} has steps 0..1" in capsys.readouterr().err
    assert main(["summary", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    other = tmp_path / "metrics.jsonl"
    other.write_text('{"step": 0, "loss": 4.6}\n', encoding="utf-8")
    assert main(["summary", str(other)]) == 2
    assert "is not a trace written by train.py --trace" in capsys.readouterr().err


def test_help_has_a_line_per_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps the usage line to the terminal
    with pytest.raises(SystemExit) as exc:
        main(["summary", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mpipar.trace summary [-h] [--by FIELDS] [--step N]"
                          " FILE")
    for option in ("FILE", "--by FIELDS", "--step N"):
        assert re.search(rf"^  {re.escape(option)} +\S", out, re.MULTILINE), option


def test_closed_pipe_ends_quietly(tmp_path):
    # More rows than a pipe buffers (64 KiB), so the writer meets the closed pipe.
    path = tmp_path / "long.jsonl"
    write_jsonl(str(path), [rec(0, "send", "pp", 8, "forward", s, 0.001) for s in range(4000)])
    proc = run_killable(["bash", "-c", f"'{sys.executable}' -m mpipar.trace summary '{path}' "
                         "--by step | head -n 3"], timeout=60)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3, describe_run(proc)
    assert proc.stderr == "", describe_run(proc)


def test_summary_of_a_real_tensor_parallel_run(run_train, run_python, tiny_data, tmp_path):
    path = tmp_path / "tp2.jsonl"
    check_ok(run_train([*TINY_ARGS, "--data", tiny_data, "--tp", "2", "--trace", path,
                        "--quiet"], n=2))
    proc = check_ok(run_python(["-m", "mpipar.trace", "summary", path, "--by",
                                "op,group,phase,rank", "--step", "1"]))
    rows = {tuple(line.split()[:4]): line.split()[4:] for line in proc.stdout.splitlines()
            if line.startswith("allreduce")}
    # tiny: 4 layers, B·T·d = 8·32·64 float32 = 65,536 bytes. Per rank and step, forward:
    # 2 per layer + the embedding (9 of 65,536 bytes) and the loss's max (1,024) and sums
    # (2,048); backward: 2 per layer + the head (9 of 65,536).
    for rank in ("0", "1"):
        forward = rows[("allreduce", "tp", "forward", rank)]
        backward = rows[("allreduce", "tp", "backward", rank)]
        assert (forward[0], forward[3]) == ("11", f"{9 * 65536 + 1024 + 2048:,}"), proc.stdout
        assert (backward[0], backward[3]) == ("9", f"{9 * 65536:,}"), proc.stdout
