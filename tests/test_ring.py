"""Ring all-reduce: exact agreement with MPI on rings of 1 to 4 ranks (see ring_checks.py)."""

from __future__ import annotations

import numpy as np
import pytest
from mpi_util import parse_verdict, run_mpi_ok, script

from mpipar.comm import MPI, Comm
from mpipar.parallel.ring import chunk_bounds, ring_allreduce
from mpipar.trace import Tracer


@pytest.fixture(scope="module", params=[3, 4], ids=lambda n: f"n{n}")
def verdict(request) -> tuple[int, dict]:
    proc = run_mpi_ok(request.param, [script("ring_checks.py")], timeout=60)
    return request.param, parse_verdict(proc)


def test_ring_matches_mpi_allreduce(verdict):
    """Rings of 2..n ranks: results bit-identical to MPI, 2(n-1) sendrecvs, 2(n-1)/n bytes."""
    n, results = verdict
    names = [f"ring_of_{k}" for k in range(1, n + 1)]
    assert set(names) <= set(results), sorted(results)
    failures = [msg for name in names for msg in results[name]]
    assert failures == [], "\n".join(failures)


def test_ring_helpers_under_mpi(verdict):
    _, results = verdict
    for name in ("chunk_bounds", "non_contiguous_rejected"):
        assert results.get(name) == [], f"{name}: {results.get(name)}"


@pytest.mark.parametrize("length,n,expected", [
    (12, 4, [(0, 3), (3, 6), (6, 9), (9, 12)]),
    (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
    (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),
    (0, 3, [(0, 0), (0, 0), (0, 0)]),
])
def test_chunk_bounds(length, n, expected):
    assert chunk_bounds(length, n) == expected
    sizes = [p.size for p in np.array_split(np.arange(length), n)]
    assert [hi - lo for lo, hi in expected] == sizes


def test_ring_of_one_process_sends_nothing():
    c = Comm(MPI.COMM_SELF, "dp", Tracer(0, enabled=True))
    x = np.arange(7.0)
    assert ring_allreduce(c, x) is x
    np.testing.assert_array_equal(x, np.arange(7.0))
    assert c.tracer.records == []
