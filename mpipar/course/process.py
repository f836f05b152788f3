"""Run a command in a process group of its own and never let it outlive its timeout.

A grading run starts ``pytest``, which starts ``mpirun``, which starts ranks. MPICH's launcher
puts its proxy and every rank in sessions of their own, so killing the process group of the
command does not reach them; :func:`kill_tree` first walks ``/proc`` for every descendant
(before anything dies and they are re-parented), then SIGKILLs the group and each of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Finished:
    """How a command ended: ``code`` is None when it was killed on its timeout."""

    code: int | None
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.code is None


def descendants(pid: int) -> list[int]:
    """Pids of every live process below ``pid`` (read from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        parent = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant."""
    victims = [pid, *descendants(pid)]
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None) -> Finished:
    """Run ``cmd`` (stdout and stderr together) in a new session; kill it all on timeout."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        code = None
    return Finished(code, out.decode("utf-8", errors="replace"), time.monotonic() - start)


def quiet_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The inherited environment with one BLAS thread per process (ranks share the cores)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env.update(extra or {})
    return env
