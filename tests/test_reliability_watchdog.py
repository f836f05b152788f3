"""The watchdog: a rank that stops making progress ends the job (exit 1), saying where.

Unit tests drive :class:`Watchdog` with a fake abort; the end-to-end tests stall one rank of a
real ``train.py`` run, by a test-only fault (``mpi_scripts/faulty_train.py``: the rank sleeps)
or by SIGSTOP from outside, and time how long the job takes to end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TRAIN, describe_run
from mpi_util import descendants, kill_job, mpirun_path, run_killable, run_mpi, script
from mpi_util import test_env as child_env

from mpipar.comm import Activity
from mpipar.trace import Tracer
from mpipar.watchdog import FACTOR, FLOOR_S, STARTUP_LIMIT_S, TIMED_STEPS, Watchdog, default_limit

FAULTY = script("faulty_train.py")
# Long enough that the run is still training when the fault strikes, and tiny steps.
ARGS = ["--preset", "tiny", "--steps", "100000", "--eval-every", "0", "--log-every", "1000"]


class Fired:
    """What a watchdog did when it fired (in place of writing to stderr and aborting)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.codes: list[int] = []


def watchdog(timeout: float | None, fired: Fired, activity: Activity | None = None) -> Watchdog:
    tracer = Tracer(3)
    tracer.step, tracer.phase = 7, "backward"
    return Watchdog(timeout, 3, tracer, activity, abort=fired.codes.append,
                    write=fired.lines.append)


def test_fires_once_when_nothing_progresses_and_names_the_call():
    fired, activity = Fired(), Activity()
    call = activity.begin("recv", "pp", 2, 4096)  # blocked, never returns
    with watchdog(0.2, fired, activity) as dog:
        dog.beat("training")
        time.sleep(0.6)
    assert fired.codes == [1], "the watchdog must abort with exit code 1, once"
    (line,) = fired.lines
    assert line.startswith("[rank 3] watchdog: no progress for ") and line.endswith("\n")
    assert "step 7, training, backward phase" in line, line
    assert "in recv on pp with rank 2 (4,096 bytes) for" in line, line
    assert call.end is None


def test_progress_of_the_loop_or_of_communication_keeps_it_quiet():
    fired, activity = Fired(), Activity()
    with watchdog(0.3, fired, activity) as dog:
        for i in range(8):  # 0.8 s in all, progress every 0.1 s, alternating sources
            time.sleep(0.1)
            if i % 2:
                dog.step_done(0.01)
            else:
                activity.end(activity.begin("allreduce", "dp", None, 8))
    assert fired.codes == [] and fired.lines == []


def test_zero_disables_it():
    fired = Fired()
    with watchdog(0, fired) as dog:
        time.sleep(0.2)
        assert dog.idle() > 0.15
        assert "watchdog" not in [t.name for t in threading.enumerate()], "no thread runs"
    assert fired.codes == []


def test_default_limit_follows_the_first_steps():
    assert default_limit([]) == default_limit([5.0] * (TIMED_STEPS - 1)) == STARTUP_LIMIT_S
    assert default_limit([0.01] * TIMED_STEPS) == FLOOR_S
    slow = [1.0, 30.0] + [2.0] * TIMED_STEPS
    assert default_limit(slow) == FACTOR * 30.0, "the slowest of the first steps counts"
    dog = watchdog(None, Fired())
    for t in (0.5, 200.0, 0.5, 999.0):
        dog.step_done(t)
    assert dog.limit == FACTOR * 200.0, "only the first TIMED_STEPS steps set the limit"


def assert_watchdog_ended(proc, elapsed: float, limit: float, ranks: list[int], step: str):
    assert proc.returncode == 1, describe_run(proc)
    lines = [line for line in proc.stderr.splitlines() if "watchdog:" in line]
    for rank in ranks:
        mine = [line for line in lines if line.startswith(f"[rank {rank}] watchdog: ")]
        assert len(mine) == 1, f"rank {rank} should report once\n{describe_run(proc)}"
        assert step in mine[0] and "ending the job (exit 1)" in mine[0], mine[0]
    assert elapsed < limit, f"the job took {elapsed:.1f} s to end"
    return lines


def test_a_sleeping_process_is_ended(tmp_path):
    """One process, asleep at step 2: the watchdog thread still runs and ends it."""
    t0 = time.monotonic()
    proc = run_killable([sys.executable, FAULTY, *ARGS, "--timeout", "1"], timeout=60,
                        env={"MPIPAR_TEST_FAULT": "0:2:sleep"})
    lines = assert_watchdog_ended(proc, time.monotonic() - t0, 30, [0], "step 2, training")
    assert "; last call " in lines[0] and " returned " in lines[0], lines


def test_a_sleeping_rank_ends_the_job_and_its_peer_names_the_call():
    t0 = time.monotonic()
    proc = run_mpi(2, [FAULTY, *ARGS, "--timeout", "2"], timeout=60,
                   env={"MPIPAR_TEST_FAULT": "1:3:sleep"})
    lines = assert_watchdog_ended(proc, time.monotonic() - t0, 30, [0, 1], "step 3")
    waiting = next(line for line in lines if line.startswith("[rank 0]"))
    assert "; in " in waiting and (" on dp" in waiting or " on world" in waiting), waiting


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of ``train.py``'s global rank ``rank`` among the launcher's descendants."""
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"train.py" in cmdline and f"PMI_RANK={rank}".encode() in environ:
            return pid
    return None


def test_a_stopped_rank_ends_the_job(tmp_path):
    """SIGSTOP rank 1 of a 2-rank run once it is training: rank 0's watchdog ends the job."""
    metrics = tmp_path / "m.jsonl"
    cmd = [mpirun_path(), "-n", "2", sys.executable, str(TRAIN), *ARGS, "--timeout", "2",
           "--metrics", str(metrics)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while (not metrics.exists() or metrics.read_text().count("\n") < 3) \
                and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1 not found"
        signal_time = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the job outlived its watchdog", pytrace=False)
    finally:
        kill_job(proc.pid)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    lines = assert_watchdog_ended(done, time.monotonic() - signal_time, 15, [0], "training")
    assert "; in " in lines[0], f"rank 0 is blocked in a call: {lines[0]}"
