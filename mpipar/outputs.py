"""Where a run will write, checked before its first step.

A run must not train for hours and then find that it cannot save. So before step 0 every
output path of ``train.py`` (``--metrics``, ``--trace``, ``--save``, ``--report``) is checked
by the same rule (:func:`output_problems`):

* its parent directory must already exist: nothing is created on the way, so a mistyped
  path is an error rather than a new directory tree (``mkdir -p`` it first);
* the path itself must not be something that writing would destroy: a directory where a file
  goes, a file where a directory goes (``--report``), or, for ``--save``, a directory that
  holds anything but a checkpoint;
* the directory must accept a new file: one is created and removed again (:func:`probe`), which
  catches read-only directories, full or read-only file systems, ``/proc``, ``/dev/null/x``;
* no two outputs, and no output and input, may be the same file (``--metrics X --trace X``
  would interleave two formats; ``--metrics`` on ``--data`` would overwrite the text).

Each problem is one line that names the flag and the path.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Output:
    """One output of a run: the flag, its path, and the other files it writes beside it."""

    flag: str
    path: str
    is_checkpoint: bool = False  # a checkpoint directory rather than a file
    is_directory: bool = False  # a directory the run creates, or adds its files to
    companions: tuple[str, ...] = ()  # e.g. the Chrome trace written next to --trace


def probe(directory: Path) -> str | None:
    """``None`` if a new file can be created (and is removed again) in ``directory``, else
    why not."""
    name = directory / f".mpipar-probe-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def _path_problem(out: Output) -> str | None:
    """What is wrong with the path of ``out`` itself and with its parent directory."""
    path = Path(out.path)
    parent = path.parent
    if not parent.exists():
        return f"{out.flag} {out.path}: directory {parent} does not exist (create it first)"
    if not parent.is_dir():
        return f"{out.flag} {out.path}: {parent} is not a directory"
    if out.is_checkpoint:
        if path.exists() and not (path.is_dir() and {e.name for e in path.iterdir()}
                                  <= {"state.npz", "meta.json"}):
            return (f"{out.flag} {out.path} exists and is not a checkpoint directory; "
                    "refusing to replace it")
    elif out.is_directory:
        if path.exists() and not path.is_dir():
            return f"{out.flag} {out.path} exists and is not a directory"
        parent = path if path.exists() else parent  # where the first file will be created
    elif path.is_dir():
        return f"{out.flag} {out.path} is a directory, not a file"
    elif path.exists() and not os.access(path, os.W_OK):
        return f"{out.flag} {out.path}: the file is not writable"
    why = probe(parent)
    if why is not None:
        return f"{out.flag} {out.path}: cannot write in {parent}: {why}"
    return None


def output_problems(outputs: list[Output], inputs: dict[str, str]) -> list[str]:
    """Every problem of ``outputs`` (see the module docstring); ``inputs`` maps an input flag
    to its path (an output may not overwrite one)."""
    problems = [p for p in map(_path_problem, outputs) if p is not None]
    seen: dict[str, str] = {}  # real path → the flag that writes it
    for out in outputs:
        for path in (out.path, *out.companions):
            real = os.path.realpath(path)
            if real in seen:
                what = f"{out.flag} {path}" if path == out.path else \
                    f"{out.flag} {out.path} writes {path}, which"
                problems.append(f"{what} is also written by {seen[real]}; give them "
                                "different paths")
            seen.setdefault(real, out.flag)
    for flag, path in inputs.items():
        real = os.path.realpath(path)
        if real in seen:
            problems.append(f"{seen[real]} would overwrite {flag} {path}; give it another path")
    return problems
