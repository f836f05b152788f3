"""Shared test helpers: run ``train.py`` (or any module) in a subprocess that cannot hang.

Command-line tests start real processes, because what they check — the exit code, what is
printed on which stream, which files exist afterwards — only shows from outside. Every
process is started in a new session with one BLAS thread; on a timeout it is killed with
everything it started and the test fails showing its output. Runs with ``n > 1`` processes go
through :func:`mpi_util.run_mpi`, which does the same for a whole ``mpirun`` job.

Fixtures:

* ``run_train(args, n=1, timeout=120)`` → ``CompletedProcess`` of ``train.py *args``;
* ``run_python(args, timeout=120)`` → ``CompletedProcess`` of ``python *args``
  (e.g. ``["-m", "mpipar.sample", ...]``);
* ``text_file(name, text)`` → path of a new file in a fresh directory (``bytes`` are written
  as they are, ``str`` as UTF-8);
* ``tiny_checkpoint`` → a checkpoint of a 2-step ``--preset tiny`` run on
  :data:`TINY_TEXT` (session-wide; copy it before changing it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# One BLAS thread in the test process too (the in-process training tests), unless the user
# chose otherwise; set before anything imports numpy. On a busy machine OpenBLAS's extra
# threads spin against the other programs and slow small products down many times over.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
from mpi_util import run_killable, run_mpi  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "train.py"

# A small corpus with a newline in its vocabulary (samplers start from "\n"); 8 lines of 47
# characters repeated 12 times = 4,512 characters, so both splits hold many 33-token windows.
TINY_TEXT = "".join(
    f"line {i}: the quick brown fox jumps over a dog.\n" for i in range(8)
) * 12
# The fastest flags that still run the whole command: training, evaluation and summary.
TINY_ARGS = ["--preset", "tiny", "--steps", "2", "--eval-every", "0"]


def python_subprocess(
    args: list[str],
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``<this python> *args`` (cwd: the repo root) and return its exit code and output.

    Killed with everything it started on timeout, failing the test (``run_killable``).
    """
    return run_killable([sys.executable, *[str(a) for a in args]], timeout=timeout, env=env,
                        cwd=cwd)


def train_subprocess(
    args: list[str],
    n: int = 1,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run ``train.py *args`` on ``n`` processes (``mpirun`` when ``n > 1``)."""
    argv = [str(TRAIN), *[str(a) for a in args]]
    if n == 1:
        return python_subprocess(argv, timeout=timeout, env=env, cwd=cwd)
    return run_mpi(n, argv, timeout=timeout, env=env, cwd=cwd)


def describe_run(proc: subprocess.CompletedProcess) -> str:
    """The command, exit code and both streams, for failure messages."""
    return (
        f"`{' '.join(str(a) for a in proc.args)}` exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail the test, showing all output, unless the process exited 0."""
    if proc.returncode != 0:
        pytest.fail(describe_run(proc), pytrace=False)
    return proc


@pytest.fixture
def run_train() -> Callable[..., subprocess.CompletedProcess]:
    """:func:`train_subprocess`: ``run_train(args, n=1, timeout=120, env=None, cwd=None)``."""
    return train_subprocess


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    """:func:`python_subprocess`: ``run_python(args, timeout=120, env=None, cwd=None)``."""
    return python_subprocess


@pytest.fixture
def text_file(tmp_path_factory) -> Callable[[str, str | bytes], Path]:
    """Write a data file into a fresh directory and return its path."""

    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path_factory.mktemp("data") / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """:data:`TINY_TEXT` in a file (shared by the whole session; do not modify)."""
    path = tmp_path_factory.mktemp("tiny_data") / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_data) -> Path:
    """A checkpoint (step 2, float32, AdamW) of ``--preset tiny`` trained on ``tiny_data``."""
    path = tmp_path_factory.mktemp("tiny_ckpt") / "ckpt"
    check_ok(train_subprocess([*TINY_ARGS, "--data", tiny_data, "--save", path, "--quiet"]))
    return path
