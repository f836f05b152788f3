"""The course manifest, ``course/manifest.json``: assignments, their tasks, and what grades them.

One assignment per chapter (or two chapters); each task is a piece of the reference a student
writes again. The JSON has the shape::

    {"format": 1,
     "handout": {"exclude": ["course/answers/", ...]},      # never copied into a handout
     "assignments": [
       {"id": "A2", "title": "...", "chapter": "tutorials/02_data_parallel.md",
        "tests": "course/tests/test_a2_data_parallel.py",
        "questions": "course/questions/A2.md",             # written questions (optional)
        "tasks": [
          {"id": "A2.2", "name": "ring reduce-scatter and all-gather", "marker": "a2_2",
           "points": 25, "timeout": 120, "ranks": 4, "section": "§3",
           "chapter": "...",                               # optional: another chapter
           "bonus": false,                                 # optional: extra credit
           "stub": ["mpipar/parallel/ring.py::ring_reduce_scatter", ...],
           "edits": ["mpipar/parallel/ring.py"],
           "hints": ["...", "..."]},
          {"id": "A2.W", "name": "written questions", "kind": "written", "points": 10,
           "answers": "course/answers/A2.txt",
           "questions": [{"id": "A2.Q1", "unit": "bytes", "rtol": 0.001}, ...]}]}]}

A stub target is ``path::function`` or ``path::Class.method``. ``ranks`` is how many MPI
processes the task's tests start at most (1: none); ``timeout`` bounds the whole task in
seconds. Paths are relative to the repository root. An assignment that needs code from a later
chapter (the planner of a 3D-parallel chapter, say) is one more entry of the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
MANIFEST = Path("course") / "manifest.json"


class ManifestError(ValueError):
    """The manifest is malformed; the message names the entry."""


@dataclass(frozen=True)
class Question:
    """A written question with a numeric answer, accepted within relative tolerance ``rtol``."""

    id: str
    unit: str
    rtol: float


@dataclass(frozen=True)
class Task:
    """One graded piece of an assignment: pytest tests under ``marker``, or written answers."""

    id: str
    name: str
    points: float
    kind: str = "code"  # "code" (pytest tests) or "written" (numeric answers)
    marker: str = ""
    timeout: float = 120.0
    ranks: int = 1
    chapter: str = ""
    section: str = ""
    bonus: bool = False
    stub: tuple[str, ...] = ()
    edits: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()
    answers: str = ""
    questions: tuple[Question, ...] = ()

    def stub_message(self) -> str:
        """What a stubbed function raises: the task and where the chapter explains it."""
        where = f"{self.chapter} {self.section}".strip()
        return f"{self.id} {self.name} — see {where}"


@dataclass(frozen=True)
class Assignment:
    id: str
    title: str
    chapter: str
    tests: str
    tasks: tuple[Task, ...]
    questions: str = ""

    def task(self, task_id: str) -> Task:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise ManifestError(f"{self.id} has no task {task_id!r}; it has "
                            f"{', '.join(t.id for t in self.tasks)}")

    @property
    def edits(self) -> tuple[str, ...]:
        """Every file a student of this assignment edits (answers sheet included), sorted."""
        files = {f for t in self.tasks for f in t.edits}
        files |= {t.answers for t in self.tasks if t.answers}
        return tuple(sorted(files))

    @property
    def code_tasks(self) -> tuple[Task, ...]:
        return tuple(t for t in self.tasks if t.kind == "code")


@dataclass(frozen=True)
class Manifest:
    root: Path
    assignments: tuple[Assignment, ...]
    exclude: tuple[str, ...] = field(default=())

    def assignment(self, assignment_id: str) -> Assignment:
        for a in self.assignments:
            if a.id == assignment_id:
                return a
        raise ManifestError(f"no assignment {assignment_id!r}; the course has "
                            f"{', '.join(a.id for a in self.assignments)}")

    def task(self, task_id: str) -> tuple[Assignment, Task]:
        """The assignment holding ``task_id`` ("A2.2") and the task."""
        return (a := self.assignment(task_id.split(".")[0])), a.task(task_id)


def _require(entry: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ManifestError(f"{where}: missing {', '.join(missing)}")


def _task(entry: dict, assignment: dict) -> Task:
    where = f"task {entry.get('id', '?')}"
    _require(entry, ("id", "name", "points"), where)
    kind = entry.get("kind", "code")
    if kind == "code":
        _require(entry, ("marker", "stub", "edits", "section"), where)
    elif kind == "written":
        _require(entry, ("answers", "questions"), where)
    else:
        raise ManifestError(f"{where}: kind must be 'code' or 'written', got {kind!r}")
    questions = tuple(Question(q["id"], q.get("unit", ""), float(q.get("rtol", 1e-3)))
                      for q in entry.get("questions", ()))
    return Task(
        id=entry["id"], name=entry["name"], points=float(entry["points"]), kind=kind,
        marker=entry.get("marker", ""), timeout=float(entry.get("timeout", 120)),
        ranks=int(entry.get("ranks", 1)), chapter=entry.get("chapter", assignment["chapter"]),
        section=entry.get("section", ""), bonus=bool(entry.get("bonus", False)),
        stub=tuple(entry.get("stub", ())), edits=tuple(entry.get("edits", ())),
        hints=tuple(entry.get("hints", ())), answers=entry.get("answers", ""),
        questions=questions)


def _assignment(entry: dict) -> Assignment:
    _require(entry, ("id", "title", "chapter", "tests", "tasks"), f"assignment "
             f"{entry.get('id', '?')}")
    tasks = tuple(_task(t, entry) for t in entry["tasks"])
    for t in tasks:
        if not t.id.startswith(entry["id"] + "."):
            raise ManifestError(f"task {t.id} is listed under assignment {entry['id']}")
    return Assignment(id=entry["id"], title=entry["title"], chapter=entry["chapter"],
                      tests=entry["tests"], tasks=tasks, questions=entry.get("questions", ""))


def load_manifest(root: Path | str = REPO) -> Manifest:
    """Read and check ``<root>/course/manifest.json``."""
    root = Path(root)
    data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    if data.get("format") != 1:
        raise ManifestError(f"{MANIFEST}: unknown format {data.get('format')!r} (expected 1)")
    assignments = tuple(_assignment(a) for a in data["assignments"])
    ids = [t.id for a in assignments for t in a.tasks]
    markers = [t.marker for a in assignments for t in a.tasks if t.marker]
    for what, values in (("task id", ids), ("marker", markers)):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ManifestError(f"{MANIFEST}: {what} used twice: {', '.join(twice)}")
    return Manifest(root=root, assignments=assignments,
                    exclude=tuple(data.get("handout", {}).get("exclude", ())))
