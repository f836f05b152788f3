"""Mixture of experts in parallel layouts: serial equivalence, the all-to-all bytes, checkpoints
saved under expert parallelism, and the start-up rules (docs/design.md §13).

* ``tests/mpi_scripts/equivalence.py`` on 4 ranks: dp 4 with ep 2 and ep 4 (microbatches),
  a pipeline (pp 2 × dp 2) of MoE blocks and ZeRO-3, against the 1-process MoE run
  (float64, 1e-10).
* ``train.py`` on 2 ranks with ``--ep 2`` against ``train.py`` on one process: per-step
  losses, aux losses and dropped assignments, the checkpoints' arrays, the loss of a
  1-process run resumed from each checkpoint, and the trace's all-to-all bytes against the
  1-process run's routed token counts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import check_ok, describe_run
from mpi_util import run_equivalence

from mpipar.checkpoint import read_checkpoint

MOE = {"n_expert": 4, "moe_top_k": 2, "capacity_factor": 1.0, "n_layer": 2}
LAYOUTS = [
    {"name": "dp4 ep2", "dp": 4, "train": {"ep": 2}},
    {"name": "dp4 ep4 mb2", "dp": 4, "train": {"ep": 4, "microbatches": 2}},
    {"name": "pp2 dp2 mb2", "dp": 2, "pp": 2, "train": {"microbatches": 2}},
    {"name": "dp4 zero3", "dp": 4, "train": {"zero": 3}},  # experts inside sharded blocks
]


@pytest.fixture(scope="module")
def verdict() -> dict:
    return run_equivalence(4, {"steps": 2, "model": MOE, "layouts": LAYOUTS}, timeout=150)


@pytest.mark.parametrize("layout", [layout["name"] for layout in LAYOUTS])
def test_moe_layout_equals_one_process(verdict, layout):
    for what in ("losses", "grad norms", "parameters", "optimizer state"):
        failures = verdict[f"{layout}: {what}"]
        assert not failures, f"{layout}: {what}: {failures}"


D, K, E, STEPS = 64, 2, 4, 3
ARGS = ["--preset", "tiny", "--steps", str(STEPS), "--eval-every", "0", "--dtype", "float64",
        "--experts", str(E), "--moe-top-k", str(K), "--quiet"]


def metrics(path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ep 2 on 2 ranks and 1 process, each stopped after 2 of 3 steps with a checkpoint, then
    resumed on 1 process for the last step."""
    tmp = tmp_path_factory.mktemp("moe")
    from conftest import train_subprocess as train

    out = {}
    for name, n, extra in (("ep2", 2, ["--ep", "2", "--trace", tmp / "trace.jsonl"]),
                           ("serial", 1, [])):
        check_ok(train([*ARGS, *extra, "--stop-at", "2", "--save", tmp / name,
                        "--metrics", tmp / f"{name}.jsonl"], n=n))
        check_ok(train([*ARGS, "--resume", tmp / name,
                        "--metrics", tmp / f"{name}-resumed.jsonl"]))
        out[name] = (metrics(tmp / f"{name}.jsonl"), metrics(tmp / f"{name}-resumed.jsonl"),
                     read_checkpoint(tmp / name).arrays())
    out["trace"] = [json.loads(line) for line in (tmp / "trace.jsonl").read_text().splitlines()]
    return out


def test_ep2_run_equals_one_process(runs):
    (ep2, ep2_resumed, ep2_state), (ref, ref_resumed, ref_state) = runs["ep2"], runs["serial"]
    assert rel([m["loss"] for m in ep2], [m["loss"] for m in ref]) < 1e-10
    assert rel([m["aux_loss"] for m in ep2], [m["aux_loss"] for m in ref]) < 1e-10
    assert [m["dropped_tokens"] for m in ep2] == [m["dropped_tokens"] for m in ref]
    assert sorted(ep2_state) == sorted(ref_state)
    worst = max((rel(ep2_state[k], ref_state[k]), k) for k in ref_state)
    assert worst[0] < 1e-10, f"checkpoint array {worst[1]} differs by {worst[0]:.2e}"
    # The ep 2 checkpoint loads in a 1-process run and continues as the 1-process one does.
    assert rel([m["loss"] for m in ep2_resumed], [m["loss"] for m in ref_resumed]) < 1e-10


def test_all_to_all_bytes_are_the_routed_tokens(runs):
    """Per step and direction, the ranks' alltoallv of float64 rows move every kept
    assignment twice (to its expert, and its output back): 2·(B·T·K·L − dropped)·d·8 bytes,
    with the dropped count of the 1-process run; the counts' exchange moves E int64 per rank
    per layer."""
    ref = runs["serial"][0]
    tokens, layers = 8 * 32, 4  # tiny: batch 8 × seq_len 32, 4 blocks
    for step in range(2):
        kept = tokens * K * layers - ref[step]["dropped_tokens"]
        for phase in ("forward", "backward"):
            rows = [r for r in runs["trace"] if r["op"] == "alltoallv" and r["step"] == step
                    and r["phase"] == phase]
            rows_bytes = sum(r["nbytes"] for r in rows if r["dtype"] == "float64")
            assert rows_bytes == 2 * kept * D * 8, (step, phase, rows_bytes, kept)
            counts = [r["nbytes"] for r in rows if r["dtype"] == "int64"]
            assert counts == ([E * 8] * 2 * layers if phase == "forward" else []), counts
            assert {r["group"] for r in rows} == {"ep"}
    assert ref[0]["dropped_tokens"] > 0  # capacity did drop assignments


BAD = [
    (["--experts", "3", "--ep", "2", "--moe-top-k", "4", "--tp", "2"],
     ["--moe-top-k 4 exceeds --experts 3", "--ep 2 does not divide --experts 3",
      "--ep 2 does not divide the data-parallel size 1", "does not combine with --tp 2"]),
    (["--experts", "4", "--ep", "2", "--zero", "1"], ["--ep 2 does not combine with --zero 1"]),
    (["--ep", "2"], ["--ep 2 splits experts between ranks; it needs --experts E"]),
]


@pytest.mark.parametrize("flags,messages", BAD, ids=["rules", "zero", "no experts"])
def test_bad_expert_configs_exit_2_on_every_rank(run_train, flags, messages):
    proc = run_train(["--preset", "tiny", "--steps", "1", *flags], n=2, timeout=60)
    assert proc.returncode == 2, describe_run(proc)
    for message in messages:
        assert message in proc.stderr, describe_run(proc)
    assert "Traceback" not in proc.stderr
