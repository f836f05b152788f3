"""Mixed precision across ranks, in one ``mpirun -n 2`` launch of
``mpi_scripts/precision_checks.py`` (its docstring gives the reasoning and the bounds):

* an overflow injected into one pipeline stage's gradients makes *every* rank skip that
  step, decided by one 4-byte all-reduce (max) over the world per step, in the trace;
* data-parallel gradients are all-reduced in the compute dtype: half the bytes of fp32;
* bfloat16 all-reduce, reduce-scatter and all-gather (MPI has no bfloat16 type here);
* dp, tp, pp and ZeRO runs in bf16 and fp16 against the 1-process run: bit for bit where the
  rounding points are the same, within a stated bound where they move.
"""

from __future__ import annotations

import pytest
from mpi_util import assert_check_passed, parse_verdict, run_mpi_ok, script

CHECKS = [
    "bfloat16 all-reduce, reduce-scatter and all-gather",
    "bf16: gradients all-reduced in half the bytes",
    "fp16: gradients all-reduced in half the bytes",
    "fp16 overflow on one rank: every rank skips that step",
    "fp16 overflow vote: one 4-byte all-reduce over the world per step",
    "bf16 dp2: bit for bit the 1-process run",
    *(f"{p} {layout}: within a 16-bit unit of the 1-process run"
      for p in ("bf16", "fp16")
      for layout in ("pp2", "tp2", "dp2 zero1", "dp2 zero2 ring", "tp2 sequence-parallel")),
    "fp16 dp2: within a 16-bit unit of the 1-process run",
]


@pytest.fixture(scope="module")
def verdict() -> dict:
    return parse_verdict(run_mpi_ok(2, [script("precision_checks.py")], timeout=150))


@pytest.mark.parametrize("name", CHECKS)
def test_mixed_precision_across_ranks(verdict, name):
    assert_check_passed(verdict, name)
