"""A failing rank must end the whole job, promptly, with a useful message and exit code.

What MPICH's launcher (hydra ``mpiexec``/``mpirun``, as shipped in the ``mpich`` wheel)
reports, measured by the tests below:

* every rank exits normally with code c (e.g. all raise ``SystemExit(2)``): exit code c;
* one rank calls ``MPI_Abort(comm, c)``: hydra kills the other ranks and exits with c, so an
  uncaught exception (our excepthook aborts with 1) gives exit code 1;
* one rank is killed by a signal: hydra kills the other ranks and exits with the signal's
  number (9 for SIGKILL);
* one rank exits, even with ``SystemExit(2)``, while the others wait in a collective: the job
  **hangs**; hydra waits for the ranks still running. Hence no rank of ``train.py`` exits on
  its own before the start-up agreement, where all ranks learn each other's verdict
  (``tests/test_reliability_startup.py``), and any other failure goes through ``MPI_Abort``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mpi_util import alive, describe, run_mpi, script

FAILURES = script("failures.py")
FAULTY = script("faulty_train.py")


def test_exception_on_one_rank_aborts_the_job_with_its_traceback():
    t0 = time.monotonic()
    proc = run_mpi(4, [FAILURES, "raise_in_collective"], timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, describe(proc)
    assert elapsed < 20, f"the job took {elapsed:.1f} s to die"
    err = proc.stderr
    assert "[rank 1] Traceback (most recent call last):" in err, describe(proc)
    assert "[rank 1] RuntimeError: rank 1 failed on purpose" in err, describe(proc)
    assert 'raise RuntimeError("rank 1 failed on purpose")' in err
    assert "finished normally" not in proc.stdout, "ranks must not carry on past the failure"


def test_a_killed_rank_ends_the_training_job():
    """SIGKILL of rank 1 in the middle of training: the launcher ends rank 0 at once."""
    t0 = time.monotonic()
    proc = run_mpi(2, [FAULTY, "--preset", "tiny", "--steps", "100", "--eval-every", "0",
                       "--quiet"], timeout=60, env={"MPIPAR_TEST_FAULT": "1:2:kill"})
    elapsed = time.monotonic() - t0
    assert proc.returncode == 9, describe(proc)
    assert "Killed (signal 9)" in proc.stdout + proc.stderr, describe(proc)
    assert "done:" not in proc.stdout and elapsed < 20, f"{elapsed:.1f} s\n{describe(proc)}"


def test_config_error_on_every_rank_exits_2_with_one_message():
    proc = run_mpi(4, [FAILURES, "config_error"], timeout=30)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.count("error: invalid configuration:") == 1, describe(proc)
    assert "world size 4 != --dp 2 × --tp 1 × --pp 1 = 2" in proc.stderr
    assert "--batch-size 6 is not divisible by --dp 2 × --microbatches 2 = 4" in proc.stderr
    assert "Traceback" not in proc.stderr, "SystemExit must bypass the excepthook"
    for rank in range(4):
        assert f"rank {rank} exits 2" in proc.stdout, describe(proc)


def test_ranks_with_different_configs_all_exit_2():
    proc = run_mpi(4, [FAILURES, "config_differs"], timeout=30)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.count("different configurations") == 1, describe(proc)
    assert "ranks [0, 2, 3]: lr=0.1" in proc.stderr and "ranks [1]: lr=0.3" in proc.stderr
    assert "steps" not in proc.stderr, "only the differing keys are listed"
    for rank in range(4):
        assert f"rank {rank} exits 2" in proc.stdout, describe(proc)


def test_abort_code_is_the_exit_code():
    proc = run_mpi(3, [FAILURES, "abort_code"], timeout=30)
    assert proc.returncode == 7, describe(proc)


def test_a_hung_job_is_killed_by_the_harness(tmp_path):
    """One rank exits alone: the others wait forever, so run_mpi must kill every process."""
    pids = tmp_path / "pids"
    with pytest.raises(pytest.fail.Exception, match="did not finish within 4 s"):
        run_mpi(3, [FAILURES, "exit_alone", str(pids)], timeout=4)
    ranks = [int(line) for line in pids.read_text().split()]
    assert len(ranks) == 3
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while any(alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in ranks if alive(p)], "ranks survived the timeout kill"


def test_a_check_script_that_raises_ends_the_launch(tmp_path):
    """The VERDICT scripts (``tests/mpi_scripts/verdict.py``) record failed assertions; any
    other exception on one rank must end every rank at once, not leave the others waiting
    in their next collective until the harness's timeout."""
    body = tmp_path / "raises.py"
    body.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(FAILURES).parent)!r})\n"
        "from verdict import Checks\n"
        "from mpipar.comm import Comm\n"
        "world = Comm.world()\n"
        "checks = Checks(world)\n"
        "if world.rank == 1:\n"
        "    raise RuntimeError('rank 1 broke a check script')\n"
        "world.barrier()\n"
        "checks.report()\n", encoding="utf-8")
    t0 = time.monotonic()
    proc = run_mpi(2, [body], timeout=30)
    assert proc.returncode == 1, describe(proc)
    assert time.monotonic() - t0 < 20, describe(proc)
    assert "[rank 1] RuntimeError: rank 1 broke a check script" in proc.stderr, describe(proc)
