"""The planner's mixture of experts (mpipar/plan/experts.py) against a traced ``--ep 2`` run.

With ``--capacity-factor 2`` the tiny preset's capacity is the sequence length, so no
assignment can be dropped and the planner's bytes are exact: the ranks' ``alltoallv`` bytes
and calls per phase, and each rank's parameter, gradient and optimizer-state bytes.
"""

from __future__ import annotations

import json

import pytest
from conftest import check_ok

from mpipar.plan.experts import (
    Experts,
    alltoall_per_rank,
    drops_possible,
    moe_block_parameters,
    moe_state_bytes,
)
from mpipar.plan.layout import Layout
from mpipar.plan.model_shape import from_preset
from mpipar.trace import load_jsonl

SHAPE = from_preset("tiny")
LAYOUT = Layout(dp=2, batch_size=8)
EXPERTS = Experts(4, top_k=2, capacity_factor=2.0, ep=2)


def test_block_parameters_follow_the_experts():
    h = SHAPE.d_model
    one = Experts(4, ep=1)
    assert moe_block_parameters(SHAPE, one) - moe_block_parameters(SHAPE, EXPERTS) == \
        2 * (8 * h * h + 5 * h)  # ep 2 holds 2 of the 4 experts
    with pytest.raises(ValueError):
        Experts(3, ep=2)


def test_plan_equals_the_trace_of_an_ep2_run(run_train, tmp_path):
    assert not drops_possible(SHAPE, EXPERTS)
    check_ok(run_train(["--preset", "tiny", "--steps", "1", "--eval-every", "0", "--quiet",
                        "--experts", "4", "--ep", "2", "--capacity-factor", "2",
                        "--trace", tmp_path / "t.jsonl", "--metrics", tmp_path / "m.jsonl"],
                       n=2))
    records = [r for r in load_jsonl(tmp_path / "t.jsonl") if r.op == "alltoallv"]
    plan = alltoall_per_rank(SHAPE, LAYOUT, EXPERTS)
    for phase in ("forward", "backward"):
        mine = [r for r in records if r.phase == phase and r.step == 0]
        calls, nbytes = plan[phase]
        assert len(mine) == LAYOUT.dp * calls, phase
        assert sum(r.nbytes for r in mine) == LAYOUT.dp * nbytes, phase
    summary = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    want = moe_state_bytes(SHAPE, LAYOUT, EXPERTS)
    for rank in summary["memory_per_rank"]:
        assert {k: rank[k] for k in want} == want
