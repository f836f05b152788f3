"""Grading (``python -m mpipar.course grade``): a representative task of every assignment.

The reference passes each, its handout fails each with no test passing; written answers are
marked against the key; a hung MPI job ends as ``timeout`` with every rank's last call; no
``mpirun`` means ``blocked``; a folder of submissions becomes ``grades.csv``. ``make
course-check`` grades every task of every assignment.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import python_subprocess

from mpipar.course.answers import mark, read_sheet
from mpipar.course.grade import Launcher, Report, TaskResult, grade, grade_folder, run_code_task
from mpipar.course.handout import copy_tree, source_files, write_handout
from mpipar.course.manifest import Assignment, Task, load_manifest

MANIFEST = load_manifest()
# One task per assignment, chosen to cover in-process and MPI tests cheaply.
SAMPLE = {"A1": "A1.2", "A2": "A2.2", "A3": "A3.1", "A4": "A4.3", "A5": "A5.2", "A6": "A6.1"}


@pytest.fixture(scope="module")
def handouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("handouts")
    for a in SAMPLE:
        write_handout(MANIFEST, a, root / a)
    return root


@pytest.mark.parametrize("assignment, task", SAMPLE.items())
def test_the_reference_passes_and_its_handout_fails(handouts, assignment, task):
    written = next(t.id for t in MANIFEST.assignment(assignment).tasks if t.kind == "written")
    ref = grade(MANIFEST, assignment, [task, written])
    assert [t.status for t in ref.tasks] == ["passed", "passed"], ref.to_json()
    assert ref.totals["earned"] == sum(t.points for t in ref.tasks) and ref.exit_code() == 0
    stub = grade(MANIFEST, assignment, [task, written], submission=handouts / assignment)
    assert [t.status for t in stub.tasks] == ["failed", "failed"], stub.to_json()
    assert all(t.passed_tests == 0 and t.total_tests > 0 for t in stub.tasks)
    assert stub.totals["earned"] == 0 and stub.exit_code() == 1
    assert f"NotImplementedError: {task} " in stub.tasks[0].failing_tests[0]
    assert stub.tasks[0].hint == MANIFEST.assignment(assignment).task(task).hints[0]


def test_written_answers_are_marked_within_their_tolerance(tmp_path):
    task = MANIFEST.assignment("A2").task("A2.W")
    key = MANIFEST.root / task.answers
    sheet = tmp_path / "A2.txt"
    sheet.write_text("A2.Q1 = 1,113,088  # bytes\nA2.Q2 = 0.0871\nA2.Q3 = 313\n")
    marked = mark(task, sheet, key)
    assert (marked.right, marked.total) == (2, 3)
    assert marked.wrong == ["A2.Q3: 313 calls is not the answer (exactly)"]
    assert "1113088" not in " ".join(marked.wrong), "the key must not be shown"
    sheet.write_text("A2.Q1 = twelve\n")
    with pytest.raises(ValueError, match="not a number"):
        read_sheet(sheet)


def test_in_a_students_tree_the_written_answers_wait_for_the_instructor(handouts, tmp_path):
    """A handout has the student's sheet and no key: marking it against itself would pass."""
    tree = shutil.copytree(handouts / "A1", tmp_path / "A1")
    (tree / "course/answers/A1.txt").write_text(
        (MANIFEST.root / "course/answers/A1.txt").read_text())
    result = grade(load_manifest(tree), "A1", ["A1.W"]).tasks[0]
    assert result.status == "blocked" and "instructor" in result.hint


def test_the_command_line_writes_json_and_exits_by_status(tmp_path):
    out = tmp_path / "a1.json"
    proc = python_subprocess(["-m", "mpipar.course", "grade", "A1", "--task", "A1.2",
                              "--out", out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "A1.2   passed" in proc.stdout
    report = json.loads(out.read_text())
    task = report["tasks"][0]
    assert {"id", "points", "earned", "status", "seconds", "failing_tests", "hint"} <= set(task)
    assert report["totals"]["percent"] == 100.0
    proc = python_subprocess(["-m", "mpipar.course", "grade", "A9"])
    assert proc.returncode == 2 and "no assignment 'A9'" in proc.stderr


HANG_TEST = '''
import pytest
from course_mpi import launch

@pytest.mark.hang
def test_two_ranks_swap_8_mb_with_blocking_sends():
    launch(2, "hang.py", "swap", timeout=300)
'''
HANG_SCRIPT = '''
import numpy as np
from checks import main

def swap(world, checks, options):
    buf = np.zeros(1_000_000)  # 8 MB: both sends wait for a receive that never comes
    world.send(buf, 1 - world.rank)
    world.recv(buf, 1 - world.rank)

main({"swap": swap})
'''


def test_a_hung_job_is_killed_and_reports_where_each_rank_waits(tmp_path):
    tree = tmp_path / "tree"
    copy_tree(MANIFEST.root, tree, source_files(MANIFEST.root))
    (tree / "course/tests/test_hang.py").write_text(HANG_TEST)
    (tree / "course/tests/mpi/hang.py").write_text(HANG_SCRIPT)
    task = Task(id="T.1", name="hang", points=5, marker="hang", timeout=8, ranks=2)
    a = Assignment("T", "hang", "", "course/tests/test_hang.py", (task,))
    (tmp_path / "work").mkdir()
    result = run_code_task(task, a, tree, tmp_path / "work", Launcher())
    assert result.status == "timeout" and result.earned == 0, result
    assert result.seconds < 60
    tails = "\n".join(result.hangs)
    for rank in (0, 1):
        assert f"rank {rank}: stuck in send to rank {1 - rank} (8,000,000 B" in tails, tails


def test_no_mpirun_means_blocked():
    class Nowhere(Launcher):
        @staticmethod
        def mpirun():
            return None

    report = grade(MANIFEST, "A2", ["A2.1"], launcher=Nowhere())
    assert report.tasks[0].status == "blocked" and "no mpirun" in report.tasks[0].hint
    assert report.exit_code() == 2


def test_exit_codes_follow_the_worst_status():
    def report(*statuses):
        return Report("A", "t", ".", [TaskResult(f"A.{i}", "n", 1, 0, s, 0)
                                      for i, s in enumerate(statuses)])

    assert report("passed", "passed").exit_code() == 0
    assert report("passed", "timeout").exit_code() == 1
    assert report("failed", "blocked").exit_code() == 2


def test_a_folder_of_submissions_becomes_grades_csv(tmp_path, handouts):
    folder = tmp_path / "submissions"
    shutil.copytree(handouts / "A1", folder / "bob")  # handed in the untouched handout
    alice = folder / "alice"  # handed in the reference's files: full marks
    for rel in MANIFEST.assignment("A1").edits:
        (alice / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MANIFEST.root / rel, alice / rel)
    out = tmp_path / "grades.csv"
    grade_folder(MANIFEST, "A1", folder, out)
    rows = {r["student"]: r for r in csv.DictReader(out.open())}
    assert rows["alice"]["percent"] == "100" and rows["bob"]["percent"] == "0"
    assert "A1.3:failed" in rows["bob"]["statuses"]
    assert json.loads((tmp_path / "grades" / "alice.json").read_text())["totals"]["earned"] == 100

