"""Replace a directory atomically, and finish the replacement a crash interrupted.

Writing a directory in place is never safe: a process that dies halfway leaves half a
directory under the name. :func:`replace_directory` writes a complete copy under a hidden
sibling name, flushes it to disk, and renames it into place::

    .<name>.tmp-XXXX   written in full, fsynced          (1)
    <name>          →  .<name>.old-XXXX                   (2) the previous copy, if any, aside
    .<name>.tmp-XXXX → <name>                             (3)
    .<name>.old-XXXX   removed                            (4)

A rename is atomic, so ``<name>`` is always absent, the previous copy or the new one, never
a mixture. A process killed between (2) and (3) leaves ``<name>`` missing and both complete
copies hidden; :func:`finish_replacement` renames the newest complete one (the new copy if it
reads back whole, else the previous) into place and removes the rest.

SIGTERM (a scheduler ending a job, ``kill``) would otherwise end the process at once, leaving
a half-written hidden copy behind; during (1) it stops the writing, the copy is removed, and
the process then ends by SIGTERM all the same. During (2)–(4) it waits until they are done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk before we rename on top of it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename still works
        pass
    finally:
        os.close(fd)


def replace_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Make ``target`` the directory that ``write(tmp)`` fills, atomically (steps 1–4).

    ``write`` fills the fresh directory ``tmp`` and flushes its files (:func:`fsync_path`).
    If it fails, or SIGTERM arrives meanwhile, ``tmp`` is removed and ``target`` is untouched.
    """
    with _TermGuard() as guard:
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            write(tmp)
            fsync_path(tmp)
            with guard.deferred():
                _swap_in(tmp, target)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_in(tmp: Path, target: Path) -> None:
    """Steps 2–4: rename the complete copy ``tmp`` to ``target``, the previous one aside."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)  # put the previous copy back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_path(target.parent)


def leftovers(target: Path, kind: str) -> list[Path]:
    """Hidden ``.<name>.<kind>-*`` siblings of ``target``, newest first: the new (``"tmp"``)
    or previous (``"old"``) copies an interrupted replacement left."""
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}.{kind}-"
    return sorted((p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def finish_replacement(target: Path, complete: Callable[[Path], bool]) -> list[str]:
    """Repair what an interrupted :func:`replace_directory` of ``target`` left; one note each.

    When ``target`` is missing, the first leftover copy that is ``complete`` (new copies
    first, newest first) is renamed to it: the interrupted replacement is finished, or rolled
    back if only the previous copy is whole. Then leftover new copies are removed, and
    previous copies too once ``target`` exists (until then they may be all there is).
    """
    new, old = leftovers(target, "tmp"), leftovers(target, "old")
    notes = []
    if (new or old) and not target.exists():
        whole = next((p for p in new + old if complete(p)), None)
        if whole is not None:
            os.rename(whole, target)
            notes.append(f"{target}: finished an interrupted save with the complete copy "
                         f"{whole.name}")
    stale = [p for p in new + (old if target.exists() else []) if p.exists()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        notes.append(f"{target}: removed {len(stale)} leftover copies of interrupted saves")
    return notes


class _Interrupted(BaseException):
    """SIGTERM arrived while a replacement was writing its temporary copy."""


class _TermGuard:
    """Inside: SIGTERM raises :class:`_Interrupted` (so the copy is removed), or waits while
    :meth:`deferred`; on leaving, a SIGTERM received is raised again with its default action,
    which ends the process.

    Only where Python may install handlers (the main thread) and only when SIGTERM has its
    default action: a program that handles SIGTERM itself keeps its own handler.
    """

    def __init__(self) -> None:
        self.received = self.deferring = self.active = False

    def __enter__(self) -> _TermGuard:
        self.active = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        if self.active:
            signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True
        if not self.deferring:
            raise _Interrupted

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self.received:
                signal.raise_signal(signal.SIGTERM)
