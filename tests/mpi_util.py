"""Run a script under ``mpirun`` from a test, without ever letting a hang stick the test run.

Multi-process tests start ``mpirun -n N python tests/mpi_scripts/<script>.py`` with
:func:`run_mpi`. The launcher runs in a new session (its own process group); on a timeout
the whole job, ``mpiexec``, its proxies and every rank, is SIGKILLed (:func:`kill_job`) and
the test fails showing what the ranks printed.

Scripts that check many things in one launch (launches are the slow part) print one line
``VERDICT {json}`` from rank 0; :func:`parse_verdict` finds it (see
``tests/mpi_scripts/verdict.py`` for the script side).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


def mpirun_path() -> str:
    """``mpirun`` next to the running Python (the venv's MPICH), else the one on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpirun found next to the Python executable or on PATH")
    return found


def script(name: str) -> str:
    """Path of ``tests/mpi_scripts/<name>``."""
    return str(SCRIPTS / name)


def test_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The inherited environment with one BLAS thread and the repo root on ``PYTHONPATH``.

    Ranks already oversubscribe the cores; extra BLAS threads would only fight over them.
    """
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    if extra:
        env.update(extra)
    return env


def run_killable(
    cmd: list[str],
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (cwd: the repo root) with :func:`test_env`; never let it outlive ``timeout``.

    The command starts a session of its own; on timeout it and everything below it are
    SIGKILLed (:func:`kill_job`) and the test fails with the captured stdout/stderr. The
    return code is not checked here: failure tests need it.
    """
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=test_env(env),
        cwd=str(cwd) if cwd is not None else str(REPO),
        start_new_session=True,  # its own process group: one killpg reaches every rank
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc.pid)
        out, err = proc.communicate()
        pytest.fail(
            f"`{' '.join(cmd)}` did not finish within {timeout} s (killed)\n"
            f"--- stdout ---\n{out}\n--- stderr ---\n{err}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_mpi(
    n: int,
    args: list[str],
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``mpirun -n n <python> *args`` under :func:`run_killable`.

    On timeout the whole job (launcher, proxies, every rank) is killed and the test fails
    with the captured output.
    """
    return run_killable([mpirun_path(), "-n", str(n), sys.executable, *map(str, args)],
                        timeout=timeout, env=env, cwd=cwd)


def kill_job(pid: int) -> None:
    """SIGKILL the launcher ``pid``, its process group and every process below it.

    MPICH's launcher puts its proxy and each rank in a session of their own (``setsid``), so
    the process group alone does not reach the ranks; they are found by walking ``/proc``
    *before* anything is killed (once the launcher dies they are re-parented and lost).
    """
    victims = [pid, *descendants(pid)]
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """Pids of all live descendants of ``pid`` (from ``/proc``; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an exited process not yet reaped)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of ``pid`` from ``/proc/<pid>/stat``, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may contain spaces, so split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def describe(proc: subprocess.CompletedProcess) -> str:
    """The command, exit code and both output streams, for failure messages."""
    return (
        f"`{' '.join(proc.args)}` exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def run_mpi_ok(n: int, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """:func:`run_mpi` and fail the test (showing all output) unless it exits 0."""
    proc = run_mpi(n, args, **kwargs)
    if proc.returncode != 0:
        pytest.fail(describe(proc), pytrace=False)
    return proc


def parse_verdict(proc: subprocess.CompletedProcess) -> dict:
    """The JSON object on the ``VERDICT `` line of stdout (fails the test if absent)."""
    for line in proc.stdout.splitlines():
        if line.startswith("VERDICT "):
            return json.loads(line[len("VERDICT "):])
    pytest.fail("no VERDICT line in the output\n" + describe(proc), pytrace=False)


def run_equivalence(n: int, spec: dict, timeout: float = 120) -> dict:
    """Run ``mpi_scripts/equivalence.py`` on ``n`` ranks with ``spec``; return its verdict."""
    return parse_verdict(run_mpi_ok(n, [script("equivalence.py"), json.dumps(spec)],
                                    timeout=timeout))


def equivalence_checks(layout: dict) -> list[str]:
    """The checks ``equivalence.py`` reports for one layout: four against the 1-process run,
    and one more with ``same_bits_as``."""
    name = layout["name"]
    checks = [f"{name}: {what}" for what in ("losses", "grad norms", "parameters",
                                             "optimizer state")]
    if "same_bits_as" in layout:
        checks.append(f"{name}: same bits as {layout['same_bits_as']}")
    return checks


def assert_check_passed(verdict: dict, name: str) -> None:
    """Fail unless the check ``name`` ran in ``verdict`` and no rank reported a failure."""
    failures = verdict.get(name)
    assert failures is not None, f"check {name!r} did not run; ran: {sorted(verdict)}"
    assert failures == [], "\n".join(failures)
