"""Launch the MPI half of a grading test: ``mpirun -n N python course/tests/mpi/<script> ...``.

The script runs named checks on every rank and rank 0 prints one line
``VERDICT {"check": [failure, ...], ...}`` (``mpi/checks.py``); a check passed when its list
is empty. A script that measures instead (:func:`measure`) prints ``MEASURED {json}``:
numbers the test compares with an estimate. Each launch gets a directory for the flight
recorder (:mod:`mpipar.course.flight`) under ``$MPIPAR_COURSE_FLIGHT_ROOT`` (the grader sets
it; otherwise a temporary directory), so when a job hangs the launcher kills it and the
failure says which call each rank was in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from mpipar.course import flight
from mpipar.course.process import quiet_env, run

ROOT = Path(__file__).resolve().parent.parent.parent  # the tree being graded
SCRIPTS = Path(__file__).resolve().parent / "mpi"
FLIGHT_ROOT_ENV = "MPIPAR_COURSE_FLIGHT_ROOT"
_session_root: list[Path] = []


def mpirun() -> str:
    """``mpirun`` next to the running Python (the venv's MPICH), else the one on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if found is None:
        pytest.fail("no mpirun next to the Python executable or on PATH", pytrace=False)
    return found


def flight_root() -> Path:
    given = os.environ.get(FLIGHT_ROOT_ENV)
    if given:
        return Path(given)
    if not _session_root:
        _session_root.append(Path(tempfile.mkdtemp(prefix="mpipar-flight-")))
    return _session_root[0]


def _launch_dir(script: str, group: str, n: int) -> Path:
    root = flight_root()
    root.mkdir(parents=True, exist_ok=True)
    number = sum(1 for p in root.iterdir() if p.is_dir())
    folder = root / f"{number:03d}-{Path(script).stem}-{group}-n{n}"
    folder.mkdir()
    return folder


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _run_job(cmd: list[str], folder: Path, where: str, timeout: float) -> str:
    """Run a job with the flight recorder in ``folder``; fail the test on a hang or an error."""
    env = quiet_env({flight.ENV: str(folder), "PYTHONPATH": str(ROOT)})
    done = run(cmd, timeout=timeout, env=env, cwd=ROOT)
    if done.timed_out:
        (folder / flight.TIMEOUT_MARK).write_text(f"{timeout:g}\n")
        tails = "\n".join(flight.rank_tails(folder))
        pytest.fail(f"{where} did not finish within {timeout:g} s (killed). Each rank's last "
                    f"communication:\n{tails}\n--- output ---\n{_tail(done.output)}",
                    pytrace=False)
    if done.code != 0:
        pytest.fail(f"{where} exited {done.code}\n--- output ---\n{_tail(done.output)}",
                    pytrace=False)
    return done.output


def launch(n: int, script: str, group: str, options: dict | None = None,
           timeout: float = 90) -> dict[str, list[str]]:
    """Run check group ``group`` of ``mpi/<script>`` on ``n`` ranks; return the verdict.

    Fails the test if the job exits non-zero (showing its output), or kills it and fails
    with every rank's last communication calls if it runs past ``timeout`` seconds.
    """
    return _printed(n, script, group, options, timeout, "VERDICT")


def measure(n: int, script: str, group: str, options: dict | None = None,
            timeout: float = 90) -> dict:
    """Run check group ``group`` of ``mpi/<script>`` on ``n`` ranks; return what rank 0
    printed as ``MEASURED {json}`` (numbers a test compares with an estimate)."""
    return _printed(n, script, group, options, timeout, "MEASURED")


def _printed(n: int, script: str, group: str, options: dict | None, timeout: float,
             tag: str) -> dict:
    folder = _launch_dir(script, group, n)
    cmd = [mpirun(), "-n", str(n), sys.executable, str(SCRIPTS / script), group,
           json.dumps(options or {})]
    where = f"`mpirun -n {n} python {script} {group}`"
    output = _run_job(cmd, folder, where, timeout)
    for line in output.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    pytest.fail(f"{where} printed no {tag} line\n--- output ---\n{_tail(output)}",
                pytrace=False)


def run_train(n: int, args: list[str], timeout: float = 120) -> str:
    """Run ``train.py *args`` on ``n`` processes with the flight recorder; return its output."""
    folder = _launch_dir("train", "train", n)
    code = ("import sys, runpy; from mpipar.course import flight; flight.install(); "
            f"sys.argv = ['train.py', *{list(map(str, args))!r}]; "
            "runpy.run_path('train.py', run_name='__main__')")
    python = [sys.executable, "-c", code]
    cmd = python if n == 1 else [mpirun(), "-n", str(n), *python]
    launcher = f"mpirun -n {n} " if n > 1 else ""
    return _run_job(cmd, folder, f"`{launcher}python train.py {' '.join(map(str, args))}`",
                    timeout)


def passed(verdict: dict[str, list[str]], *names: str) -> None:
    """Fail unless every check in ``names`` ran and no rank reported a failure in it."""
    for name in names:
        assert name in verdict, f"check {name!r} did not run; ran: {sorted(verdict)}"
    failures = [msg for name in names for msg in verdict[name]]
    assert not failures, "\n".join(failures[:8])
