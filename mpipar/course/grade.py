"""Grade an assignment: each task's tests in a process group of their own, under a timeout.

For every task of the assignment (or the ones asked for):

* a code task runs ``pytest <tests> -m <marker>`` in a new session; past the task's timeout
  the whole group (pytest, ``mpirun``, every rank) is SIGKILLed, so a hung job costs its
  timeout and not the grading run. The task earns its points in proportion to the tests that
  pass;
* a written task compares the answer sheet with the reference's key (:mod:`.answers`);
  in a student's tree, which has no key, it is ``blocked``.

Each task ends ``passed``, ``failed`` (some test failed), ``timeout`` (killed; the report
shows the last communication calls of every rank, from the flight recorder), ``error`` (its
tests could not run: a syntax error, no test collected) or ``blocked`` (the environment: no
``mpirun``, or it cannot start enough processes). The exit code is 0 when every task passed,
1 when one did not, 2 when the environment blocked one.

With ``submission``, the tree graded is the reference with the assignment's functions
stubbed (as in the handout) and the student's copies of the files the assignment edits laid
over it: only those files count, and a file not handed in stays a stub.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mpipar.course import flight
from mpipar.course.answers import SheetError, mark
from mpipar.course.handout import (
    HANDOUT_README,
    copy_tree,
    source_files,
    stub_file,
    stub_targets,
)
from mpipar.course.manifest import Assignment, Manifest, Task
from mpipar.course.process import quiet_env, run

STATUSES = ("passed", "failed", "timeout", "error", "blocked")
FLIGHT_ROOT_ENV = "MPIPAR_COURSE_FLIGHT_ROOT"  # read by course/tests/course_mpi.py


@dataclass
class TaskResult:
    id: str
    name: str
    points: float
    earned: float
    status: str
    seconds: float
    failing_tests: list[str] = field(default_factory=list)
    hint: str = ""
    hangs: list[str] = field(default_factory=list)
    bonus: bool = False
    passed_tests: int = 0
    total_tests: int = 0


@dataclass
class Report:
    assignment: str
    title: str
    tree: str
    tasks: list[TaskResult]

    @property
    def totals(self) -> dict[str, float]:
        main = [t for t in self.tasks if not t.bonus]
        extra = [t for t in self.tasks if t.bonus]
        points = sum(t.points for t in main)
        earned = round(sum(t.earned for t in main), 2)
        return {"points": points, "earned": earned,
                "percent": round(100.0 * earned / points, 1) if points else 0.0,
                "bonus_points": sum(t.points for t in extra),
                "bonus_earned": round(sum(t.earned for t in extra), 2)}

    def exit_code(self) -> int:
        statuses = {t.status for t in self.tasks}
        if "blocked" in statuses:
            return 2
        return 0 if statuses <= {"passed"} else 1

    def to_json(self) -> dict:
        return {"assignment": self.assignment, "title": self.title, "tree": self.tree,
                "tasks": [asdict(t) for t in self.tasks], "totals": self.totals}


# ---- the environment ----------------------------------------------------------------------------


class Launcher:
    """Finds ``mpirun`` and checks, once per size, that it can start that many processes."""

    def __init__(self) -> None:
        self.checked: dict[int, str] = {}  # ranks -> "" if fine, else why not

    @staticmethod
    def mpirun() -> str | None:
        local = Path(sys.executable).parent / "mpirun"
        if local.exists():
            return str(local)
        return shutil.which("mpirun") or shutil.which("mpiexec")

    def why_not(self, ranks: int) -> str:
        """Empty if ``ranks`` processes can be started, else the reason."""
        if ranks <= 1:
            return ""
        if ranks not in self.checked:
            mpirun = self.mpirun()
            if mpirun is None:
                self.checked[ranks] = "no mpirun next to the Python executable or on PATH"
            else:
                done = run([mpirun, "-n", str(ranks), sys.executable, "-c",
                            "from mpipar.comm import Comm; Comm.world().barrier()"],
                           timeout=60, env=quiet_env())
                ok = done.code == 0
                self.checked[ranks] = "" if ok else (
                    f"mpirun cannot start {ranks} processes here (Open MPI needs "
                    f"--oversubscribe on a machine with fewer cores): "
                    f"{done.output.strip().splitlines()[-1:] or 'no output'}")
        return self.checked[ranks]


# ---- the tree that is graded ------------------------------------------------------------------


def grading_tree(manifest: Manifest, a: Assignment, submission: Path, workdir: Path) -> Path:
    """The reference, the assignment's functions stubbed, the submission's edited files over it."""
    tree = workdir / "tree"
    copy_tree(manifest.root, tree, source_files(manifest.root))
    for rel, stubs in stub_targets(a.code_tasks).items():
        stub_file(tree / rel, stubs)
    for t in a.tasks:
        if t.kind == "written":
            (tree / t.answers).unlink(missing_ok=True)  # never the key: the student's or none
    for rel in a.edits:
        if (submission / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(submission / rel, tree / rel)
    return tree


# ---- one task -----------------------------------------------------------------------------------


# An exception line of a traceback, as pytest ("E   ...") or a rank's hook ("[rank 1] ...")
# prints it; never an indented source line that merely mentions an exception.
_EXCEPTION = re.compile(r"^(?:E\s+)?(?:\[rank \d+\]\s*)?([A-Z]\w*(?:Error|Exception): .+)$",
                        re.MULTILINE)


def _summary(problem: ET.Element) -> str:
    """The first line of a failure and, if the exception that caused it shows further down
    (a rank's traceback in a job's output), that exception's line too."""
    first_text = (problem.get("message") or problem.text or problem.tag).strip()
    first = next((ln for ln in first_text.splitlines() if ln.strip()), problem.tag)
    cause = _EXCEPTION.search(problem.text or "")
    if cause and not _EXCEPTION.search(first) and cause.group(1) not in first:
        first = f"{first} — {cause.group(1)}"
    return first[:400]


def read_junit(path: Path) -> tuple[int, list[str]]:
    """(tests passed, "name: first line of the failure" of every other test) from a JUnit XML."""
    if not path.is_file():
        return 0, []
    passed, failing = 0, []
    for case in ET.parse(path).getroot().iter("testcase"):
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if problem is None:
            passed += 1
            continue
        failing.append(f"{case.get('name')}: {_summary(problem)}")
    return passed, failing


def hang_report(flights: Path, whole_task_killed: bool) -> list[str]:
    """Each rank's last calls in every launch that was killed (the latest one if the whole
    task was)."""
    launches = flight.timed_out_launches(flights)
    if whole_task_killed and (latest := flight.latest_launch(flights)) is not None:
        launches = sorted({*launches, latest})
    lines = []
    for launch in launches:
        lines.append(f"{launch.name}:")
        lines += ["  " + ln for ln in flight.rank_tails(launch)]
    return lines


def run_code_task(task: Task, a: Assignment, tree: Path, workdir: Path,
                  launcher: Launcher) -> TaskResult:
    result = TaskResult(task.id, task.name, task.points, 0.0, "error", 0.0, bonus=task.bonus)
    blocked = launcher.why_not(task.ranks)
    if blocked:
        result.status, result.hint = "blocked", blocked
        return result
    junit, flights = workdir / f"{task.id}.xml", workdir / f"{task.id}-flight"
    flights.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", a.tests, "-m", task.marker, "-q",
           "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    env = quiet_env({"PYTHONPATH": str(tree), FLIGHT_ROOT_ENV: str(flights)})
    done = run(cmd, timeout=task.timeout, env=env, cwd=tree)
    result.seconds = round(done.seconds, 1)
    passed, failing = read_junit(junit)
    result.passed_tests, result.total_tests = passed, passed + len(failing)
    result.failing_tests = failing
    if done.timed_out or flight.timed_out_launches(flights):
        result.status = "timeout"
        result.hangs = hang_report(flights, done.timed_out)
        result.hint = (f"a job did not finish within {task.timeout:g} s" if done.timed_out
                       else "an MPI job hung and was killed")
        result.hint += "; the ranks' last calls show where each one waits"
        return result
    if done.code in (0, 1) and result.total_tests:
        result.status = "passed" if done.code == 0 and not failing else "failed"
        result.earned = round(task.points * passed / result.total_tests, 2)
    else:
        lines = [ln for ln in done.output.strip().splitlines() if ln.strip()]
        result.failing_tests = failing or lines[-5:]
        result.hint = "no test ran (a syntax error, or an import that fails?)"
    if result.status == "failed" and task.hints:
        result.hint = task.hints[0]
    return result


def run_written_task(task: Task, tree: Path, key_root: Path) -> TaskResult:
    result = TaskResult(task.id, task.name, task.points, 0.0, "error", 0.0, bonus=task.bonus)
    start = time.monotonic()
    key = key_root / task.answers
    if not key.is_file() or (key_root / HANDOUT_README).is_file():
        # A student's tree: its sheet is the student's own; the key stays with the instructor.
        result.status = "blocked"
        result.hint = f"no answer key {task.answers} in this tree: the instructor marks these"
        return result
    try:
        marked = mark(task, tree / task.answers, key)
    except SheetError as exc:
        result.failing_tests, result.hint = [str(exc)], "fix the answer sheet's format"
        return result
    result.seconds = round(time.monotonic() - start, 1)
    result.passed_tests, result.total_tests = marked.right, marked.total
    result.failing_tests = marked.wrong
    result.earned = round(task.points * marked.right / marked.total, 2)
    result.status = "passed" if not marked.wrong else "failed"
    if marked.wrong:
        result.hint = f"the questions are in course/questions/{task.id.split('.')[0]}.md"
    return result


# ---- an assignment ----------------------------------------------------------------------------


def grade(manifest: Manifest, assignment_id: str, task_ids: list[str] | None = None,
          submission: Path | None = None, launcher: Launcher | None = None) -> Report:
    """Grade the tree at ``manifest.root`` as it is, or ``submission`` laid over the reference."""
    a = manifest.assignment(assignment_id)
    tasks = [a.task(t) for t in task_ids] if task_ids else list(a.tasks)
    launcher = launcher or Launcher()
    with tempfile.TemporaryDirectory(prefix=f"mpipar-grade-{a.id}-") as tmp:
        workdir = Path(tmp)
        tree = manifest.root
        if submission is not None:
            tree = grading_tree(manifest, a, Path(submission), workdir)
        results = []
        for task in tasks:
            if task.kind == "written":
                results.append(run_written_task(task, tree, manifest.root))
            else:
                results.append(run_code_task(task, a, tree, workdir, launcher))
    shown = str(submission) if submission is not None else str(manifest.root)
    return Report(a.id, a.title, shown, results)


def format_table(report: Report, details: bool = True) -> str:
    """The console table: one line per task, then what failed and a hint, then the total."""
    lines = [f"{report.assignment} {report.title}: {report.tree}",
             f"{'task':<6} {'status':<8} {'points':>13} {'tests':>7} {'seconds':>8}  name"]
    for t in report.tasks:
        pts = f"{t.earned:g}/{t.points:g}" + ("+" if t.bonus else "")
        tests = f"{t.passed_tests}/{t.total_tests}"
        lines.append(f"{t.id:<6} {t.status:<8} {pts:>13} {tests:>7} {t.seconds:>8.1f}  {t.name}")
        if details and t.status != "passed":
            lines += [f"         ✗ {f}" for f in t.failing_tests[:6]]
            if len(t.failing_tests) > 6:
                lines.append(f"         ... and {len(t.failing_tests) - 6} more")
            lines += [f"         {h}" for h in t.hangs]
            if t.hint:
                lines.append(f"         hint: {t.hint}")
    totals = report.totals
    bonus = (f", bonus {totals['bonus_earned']:g}/{totals['bonus_points']:g}"
             if totals["bonus_points"] else "")
    lines.append(f"total  {totals['earned']:g}/{totals['points']:g} "
                 f"({totals['percent']:g}%){bonus}")
    return "\n".join(lines)


def grade_folder(manifest: Manifest, assignment_id: str, folder: Path, csv_path: Path,
                 launcher: Launcher | None = None) -> list[Report]:
    """Grade every sub-directory of ``folder`` (one per student) into ``csv_path``.

    Each student's JSON report goes to ``<csv_path without suffix>/<student>.json``.
    """
    a = manifest.assignment(assignment_id)
    launcher = launcher or Launcher()
    students = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    json_dir = csv_path.with_suffix("")
    json_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", *[t.id for t in a.tasks], "earned", "points", "percent",
                         "bonus", "statuses"])
        for student in students:
            report = grade(manifest, a.id, submission=student, launcher=launcher)
            reports.append(report)
            (json_dir / f"{student.name}.json").write_text(
                json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n",
                encoding="utf-8")
            totals = report.totals
            writer.writerow([student.name, *[f"{t.earned:g}" for t in report.tasks],
                             f"{totals['earned']:g}", f"{totals['points']:g}",
                             f"{totals['percent']:g}", f"{totals['bonus_earned']:g}",
                             " ".join(f"{t.id}:{t.status}" for t in report.tasks)])
    return reports
