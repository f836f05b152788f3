"""``Comm``: every method under ``mpirun -n 2`` and ``-n 4``, plus 1-process behaviour.

The multi-process checks live in ``mpi_scripts/comm_checks.py``; one launch per world size
runs them all and reports a verdict per named check, which the tests below read.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from mpi_util import parse_verdict, run_mpi_ok, script

import mpipar.comm as comm_module
from mpipar.comm import Comm, install_excepthook, wait_all, world_size_and_rank
from mpipar.trace import Tracer

CHECKS = [
    "size_and_rank",
    *(f"{op}_{dt}" for dt in ("float64", "float32")
      for op in ("allreduce", "reduce_scatter", "allgather", "broadcast")),
    "send_recv",
    "sendrecv_ring",
    "isend_irecv_all_pairs",
    "iallreduce",
    "split",
    "trace_records",
    "tracer_disabled",
    "bad_arguments",
    "control_plane",
]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"n{n}")
def verdict(request) -> dict:
    proc = run_mpi_ok(request.param, [script("comm_checks.py")], timeout=60)
    return parse_verdict(proc)


def test_every_check_ran(verdict):
    assert sorted(verdict) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_check(verdict, name):
    failures = verdict.get(name)
    assert failures is not None, f"check {name!r} did not run"
    assert failures == [], "\n".join(failures)


# ---- one process (MPI initialised as a singleton in the test process) ---------------------


def self_comm(enabled: bool = True) -> Comm:
    return Comm.self_group("dp", Tracer(0, enabled=enabled))


def test_self_group_is_this_process_alone():
    c = Comm.self_group("tp")
    assert (c.group, c.size, c.rank, c.members) == ("tp", 1, 0, (0,))
    assert c.mpi == comm_module.MPI.COMM_SELF and c.tracer.enabled is False


def test_a_failed_call_leaves_no_trace_record():
    c = self_comm()
    with pytest.raises(ValueError, match="C-contiguous"):
        c.broadcast(np.ones((4, 4))[:, 1])
    assert c.tracer.records == []


def test_world_without_mpirun():
    world = Comm.world()
    assert world_size_and_rank() == (world.size, world.rank) == (1, 0)
    assert world.tracer.enabled is False and world.members == (0,)


def test_collectives_on_one_rank_are_identities_and_traced():
    c = self_comm()
    x = np.arange(6.0).reshape(2, 3)
    assert c.allreduce(x) is x
    np.testing.assert_array_equal(x, np.arange(6.0).reshape(2, 3))
    out = np.empty(6, np.float64)
    c.reduce_scatter(x, out)
    c.allgather(x, out)
    np.testing.assert_array_equal(out, np.arange(6.0))
    got = np.empty(3)
    c.sendrecv(np.array([1.0, 2.0, 3.0]), 0, got, 0)  # a ring of one: to and from itself
    np.testing.assert_array_equal(got, [1.0, 2.0, 3.0])
    recv = c.irecv(np.empty(2), 0, tag=3)
    send = c.isend(np.array([5.0, 6.0]), 0, tag=3)
    assert wait_all([send, recv])[1] is recv.buf
    np.testing.assert_array_equal(recv.buf, [5.0, 6.0])
    req = c.iallreduce(np.ones(2), op="max")
    got_bufs = c.wait_all([req, recv])  # also a Comm method; finished requests are skipped
    assert got_bufs[0] is req.buf and got_bufs[1] is recv.buf
    ops = [t.op for t in c.tracer.records]
    assert ops == ["allreduce", "reduce_scatter", "allgather", "sendrecv", "isend", "irecv",
                   "iallreduce"]
    assert all(t.group == "dp" and t.rank == 0 for t in c.tracer.records)


def test_disabled_tracing_does_not_even_read_the_clock(monkeypatch):
    c = self_comm(enabled=False)

    def no_clock() -> float:
        raise AssertionError("perf_counter called with tracing disabled")

    monkeypatch.setattr(comm_module.time, "perf_counter", no_clock)
    c.allreduce(np.ones(3))
    c.sendrecv(np.ones(2), 0, np.empty(2), 0)
    c.iallreduce(np.ones(2)).wait()
    c.barrier()
    assert c.tracer.records == []


def test_cuda_aware_flag(monkeypatch):
    monkeypatch.delenv(comm_module.CUDA_AWARE_ENV, raising=False)
    assert not comm_module.cuda_aware_mpi()
    monkeypatch.setenv(comm_module.CUDA_AWARE_ENV, "0")
    assert not comm_module.cuda_aware_mpi()
    monkeypatch.setenv(comm_module.CUDA_AWARE_ENV, "1")
    assert comm_module.cuda_aware_mpi()


def test_excepthook_prefixes_every_line_and_passes_system_exit(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: seen.append(exc[0]))
    install_excepthook(Comm.world())
    try:
        raise ValueError("bad things\nacross two lines")
    except ValueError as e:
        sys.excepthook(type(e), e, e.__traceback__)  # 1 process: prints, does not abort
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[rank 0] Traceback (most recent call last):"
    assert err[-2:] == ["[rank 0] ValueError: bad things", "[rank 0] across two lines"]
    assert all(line.startswith("[rank 0] ") for line in err)
    sys.excepthook(SystemExit, SystemExit(2), None)
    assert seen == [SystemExit], "SystemExit must go to the previous hook untouched"
