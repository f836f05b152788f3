"""Written questions with numeric answers: the answer sheets and their marking.

Questions are prose in ``course/questions/A<n>.md``; a student answers in
``course/answers/A<n>.txt``, one line per question::

    A2.Q1 = 1113088      # bytes
    A2.Q2 = 0.0872       # seconds

The reference repository's sheets are the answer key (handouts get blank ones). An answer is
right when it is within the question's relative tolerance ``rtol`` of the key's value
(``rtol`` 0: exactly equal, for counts).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mpipar.course.manifest import Task

_LINE = re.compile(r"^\s*(?P<id>[A-Za-z0-9_.]+)\s*=\s*(?P<value>[^#]*?)\s*(#.*)?$")


class SheetError(ValueError):
    """An answer sheet that cannot be read; the message names the file and line."""


def read_sheet(path: Path) -> dict[str, float | None]:
    """``{question id: number, or None when left blank}`` from an answer sheet."""
    answers: dict[str, float | None] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise SheetError(f"{path}:{number}: expected 'ID = number', got {line.strip()!r}")
        value = m["value"].replace("_", "").replace(",", "")
        try:
            answers[m["id"]] = float(value) if value else None
        except ValueError:
            raise SheetError(f"{path}:{number}: {m['value']!r} is not a number") from None
    return answers


@dataclass
class Marked:
    """The marking of one sheet: how many right, and a line for each answer that is not."""

    right: int
    total: int
    wrong: list[str]


def close_enough(answer: float, key: float, rtol: float) -> bool:
    if rtol == 0:
        return answer == key
    return math.isfinite(answer) and abs(answer - key) <= rtol * abs(key)


def mark(task: Task, sheet: Path, key: Path) -> Marked:
    """Compare ``sheet`` with the ``key`` sheet, question by question (the key is not shown)."""
    answers = read_sheet(sheet) if sheet.is_file() else {}
    keys = read_sheet(key)
    right, wrong = 0, []
    for q in task.questions:
        if keys.get(q.id) is None:
            raise SheetError(f"{key}: the key has no value for {q.id}")
        got = answers.get(q.id)
        if got is None:
            wrong.append(f"{q.id}: no answer")
        elif close_enough(got, keys[q.id], q.rtol):
            right += 1
        else:
            within = "exactly" if q.rtol == 0 else f"within {q.rtol:.1%}"
            wrong.append(f"{q.id}: {got:g} {q.unit} is not the answer ({within})")
    return Marked(right, len(task.questions), wrong)
