"""The planner against real runs: traced bytes per group and `memory_report` exactly, and the
activation stash within 10% (docs/design.md §6 for how the trace counts bytes).

Each layout trains tiny or small for two steps with ``--trace`` and ``--metrics``; step 1's
records of the training phases (forward, backward, optimizer), summed over every rank per
group, must equal `comm_bytes_per_step`; every rank's parameter, gradient and optimizer bytes
must equal `state_bytes` of its pipeline rank; and with a pipeline each rank's measured peak
stash (the summary's ``peak_stash_bytes``) must be within 10% of `activation_bytes`.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import check_ok

from mpipar.plan.comm import comm_bytes_per_step
from mpipar.plan.layout import Layout
from mpipar.plan.memory import activation_bytes, state_bytes
from mpipar.plan.model_shape import from_preset

FLAGS = {"dp": "--dp", "tp": "--tp", "pp": "--pp", "microbatches": "--microbatches",
         "schedule": "--schedule", "virtual_stages": "--virtual-stages", "zero": "--zero",
         "recompute": "--recompute", "precision": "--precision", "allreduce": "--allreduce",
         "cp": "--cp"}

CASES = [
    ("tiny", dict(dp=2, zero=1, allreduce="ring")),
    ("tiny", dict(dp=2, zero=3, microbatches=2)),
    ("tiny", dict(tp=2, sequence_parallel=True, recompute="full")),
    ("tiny", dict(pp=2, microbatches=2, schedule="interleaved", virtual_stages=2)),
    ("tiny", dict(dp=2, tp=2, zero=2, precision="fp16", sequence_parallel=True,
                  microbatches=2)),
    ("small", dict(tp=2)),
    ("small", dict(pp=2, microbatches=4, schedule="gpipe")),
    ("small", dict(dp=2, zero=2, precision="bf16")),
    ("tiny", dict(cp=2, pp=2, microbatches=2)),  # context parallelism: the ring's bytes
]


def argv_of(layout: Layout, kw: dict) -> list[str]:
    out = []
    for key, value in kw.items():
        out += ["--sequence-parallel"] if key == "sequence_parallel" else [FLAGS[key], str(value)]
    return out


@pytest.mark.parametrize("preset, kw", CASES, ids=[f"{p}-{Layout(**k).describe()}"
                                                   for p, k in CASES])
def test_prediction_equals_the_run(run_train, tmp_path, preset, kw):
    shape = from_preset(preset)
    layout = Layout(batch_size={"tiny": 8, "small": 16}[preset], **kw)
    trace, metrics = tmp_path / "t.jsonl", tmp_path / "m.jsonl"
    check_ok(run_train(["--preset", preset, "--steps", "2", "--eval-every", "0", "--quiet",
                        "--trace", trace, "--metrics", metrics, *argv_of(layout, kw)],
                       n=layout.world, timeout=120))
    traced: Counter[str] = Counter()
    for line in trace.read_text().splitlines():
        r = json.loads(line)
        if r["op"] != "compute" and r["step"] == 1 and r["phase"] != "other":
            traced[r["group"]] += r["nbytes"]
    assert comm_bytes_per_step(shape, layout) == dict(traced), layout.describe()

    summary = [json.loads(x) for x in metrics.read_text().splitlines() if "summary" in x][-1]
    for rank, got in enumerate(summary["memory_per_rank"]):
        pp_rank = rank // (layout.world // layout.pp)
        measured = (got["parameters"], got["gradients"], got["optimizer_state"])
        assert state_bytes(shape, layout, pp_rank) == measured, (rank, layout.describe())
    for rank, stash in enumerate(summary.get("pipeline", {}).get("peak_stash_bytes", [])):
        pp_rank = rank // (layout.world // layout.pp)  # one entry per rank
        predicted = activation_bytes(shape, layout, pp_rank)
        assert abs(predicted / stash - 1) < 0.10, (pp_rank, predicted, stash)
