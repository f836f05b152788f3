"""The profiler: a step's time split into rows that add up to the step, in every layout.

What is checked is bookkeeping, never speed:

* the rows of a rank add up to the summed duration of its profiled steps (exclusive time:
  nothing is counted twice, nothing is lost), to 1e-9 relative (only float rounding);
* on rank 0 that duration agrees with the ``step_time_s`` the trainer measured with its own
  clock for the same steps, to 3% + 2 ms per step: the two clocks are read a few Python
  statements apart (the trainer's around the profiler's), so the gap is microseconds per
  step, and the tolerance only absorbs a process being descheduled between those statements
  on a busy machine;
* every row is non-negative (a negative exclusive time would mean a communication call or a
  nested operation was subtracted from a region it did not happen in);
* the rows a layout must have are there: matrix products, attention and LayerNorm in both
  directions, the optimizer, and the layout's own communication (``allreduce tp``, the
  data-parallel all-reduce, the pipeline's sends and receives);
* ``--profile FILE`` writes a Chrome trace in which the operations and the communication of
  every rank sit on one timeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_TEXT, check_ok

from mpipar.autograd import _OpTimer
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig
from mpipar.profile import Profiler, format_profiles, mean_summary, op_label
from mpipar.training import TrainConfig, Trainer

STEPS = 4  # the first warms up and is left out: 3 profiled steps
COMPUTE_ROWS = ("matmul fwd", "matmul bwd", "attention fwd", "attention bwd",
                "layernorm fwd", "layernorm bwd", "gelu fwd", "gelu bwd", "adamw")


def assert_adds_up(summary: dict, step_times: list[float] | None = None) -> None:
    """The rows of one rank's summary against its step time (and the trainer's clock)."""
    rows = summary["rows"]
    negative = {k: r["seconds"] for k, r in rows.items() if r["seconds"] < -1e-6}
    assert not negative, f"rank {summary['rank']}: negative exclusive time {negative}"
    total = sum(r["seconds"] for r in rows.values())
    assert total == pytest.approx(summary["step_time_s"], rel=1e-9), (
        f"rank {summary['rank']}: rows add up to {total:.6f} s, the steps took "
        f"{summary['step_time_s']:.6f} s")
    if step_times is not None:
        measured = sum(step_times)
        tolerance = 0.03 * measured + 0.002 * len(step_times)
        assert abs(summary["step_time_s"] - measured) <= tolerance, (
            f"profiled steps took {summary['step_time_s']:.4f} s, the trainer measured "
            f"{measured:.4f} s for the same {len(step_times)} steps (tolerance {tolerance:.4f})")


def test_rows_add_up_in_one_process():
    tokenizer = CharTokenizer.from_text(TINY_TEXT)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, d_model=16,
                    seq_len=8)
    data = make_dataset(TINY_TEXT, tokenizer, seq_len=8)
    profiler = Profiler(0, keep_spans=True)
    trainer = Trainer(cfg, TrainConfig(steps=STEPS, batch_size=4, eval_every=0),
                      ProcessGrid.single(), data, profiler)
    times = [trainer.train_step()["step_time_s"] for _ in range(STEPS)]
    assert _OpTimer.current is None, "the autograd hook must be off outside a step"
    trainer.evaluate()  # outside a step: not counted
    summary = profiler.summary()
    assert summary["steps"] == STEPS - 1
    assert_adds_up(summary, times[1:])
    assert set(COMPUTE_ROWS) <= set(summary["rows"]), sorted(summary["rows"])
    per_step = {k: r["calls"] / summary["steps"] for k, r in summary["rows"].items()}
    # 2 blocks × (qkv, attention output, fc, mlp output) + the tied head = 9 products
    assert per_step["matmul fwd"] == per_step["matmul bwd"] == 9
    assert per_step["layernorm fwd"] == 5 and per_step["attention fwd"] == 2
    assert summary["rows"]["matmul fwd"]["flops"] > 0
    assert summary["rows"]["layernorm fwd"]["flops"] == 0
    # Every region was kept as a span, inside its step.
    labels = {s.name for s in profiler.spans}
    assert set(COMPUTE_ROWS) <= labels and "python fwd" in labels
    table = format_profiles([summary])
    assert "matmul fwd" in table and "GFLOP/s" in table


def test_labels_and_mean_over_ranks():
    from mpipar import fused, ops
    from mpipar.parallel.tensor_parallel.mappings import CopyToTensorParallelRegion

    assert op_label(fused.Linear) == "matmul" and op_label(ops.Add) == "add"
    assert op_label(CopyToTensorParallelRegion) == "copy to tensor parallel region"
    a = {"rank": 0, "steps": 2, "step_time_s": 1.0,
         "rows": {"x": {"calls": 2, "seconds": 0.6, "flops": 0}}}
    b = {"rank": 1, "steps": 2, "step_time_s": 3.0,
         "rows": {"y": {"calls": 4, "seconds": 3.0, "flops": 8}}}
    mean = mean_summary([a, b])
    assert mean["step_time_s"] == 2.0
    assert mean["rows"]["x"] == {"calls": 1.0, "seconds": 0.3, "flops": 0.0}
    assert list(mean["rows"]) == ["y", "x"]  # largest first


LAYOUTS = {
    "dp": (["--dp", "2"], ("iallreduce dp",)),
    "tp": (["--tp", "2"], ("allreduce tp",)),
    "pp": (["--pp", "2", "--microbatches", "2"], ("recv pp", "send pp")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rows_add_up_in_every_layout(layout, run_train, tmp_path):
    flags, comm_rows = LAYOUTS[layout]
    metrics, chrome = tmp_path / "m.jsonl", tmp_path / "profile.json"
    proc = check_ok(run_train(
        ["--preset", "tiny", "--steps", str(STEPS), "--eval-every", "0", *flags,
         "--metrics", metrics, "--profile", chrome], n=2))
    assert "profile, rank 1:" in proc.stdout and "profile, mean over ranks:" in proc.stdout
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = [r["step_time_s"] for r in lines if "loss" in r]
    (summary,) = [r for r in lines if r.get("event") == "summary"]
    profiles = summary["profile"]
    assert [p["rank"] for p in profiles] == [0, 1]
    for p in profiles:
        assert p["steps"] == STEPS - 1
        assert_adds_up(p, times[1:] if p["rank"] == 0 else None)
    rows = set(profiles[0]["rows"]) | set(profiles[1]["rows"])
    missing = [r for r in (*COMPUTE_ROWS, *comm_rows) if r not in rows]
    assert not missing, f"{layout}: rows {missing} missing from {sorted(rows)}"
    check_chrome_trace(chrome, comm_rows)


def check_chrome_trace(path: Path, comm_rows: tuple[str, ...]) -> None:
    """Operations and communication of both ranks in one Chrome trace."""
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    names = {(e["pid"], e["name"].split(" mb")[0]) for e in events}
    for rank in (0, 1):
        assert (rank, "adamw") in names, f"rank {rank} has no adamw span"
    ops = {e["args"]["op"] for e in events}
    wanted = {row.split()[0] for row in comm_rows}
    assert wanted <= ops and "compute" in ops, sorted(ops)


def test_profile_file_in_a_missing_directory_is_a_usage_error(run_train, tmp_path):
    proc = run_train(["--preset", "tiny", "--steps", "1", "--profile",
                      tmp_path / "missing" / "p.json"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--profile" in proc.stderr
