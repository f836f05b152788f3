"""The course manifest and the handouts generated from it (``python -m mpipar.course handout``).

Every stub target exists in the reference, every grading test carries exactly one task
marker, and each assignment's handout keeps signatures and docstrings, raises the task's
message, leaves the answers out, imports, runs ``train.py --help``, and comes out
byte-identical when generated again. ``make course-check`` repeats the last points and grades
every handout; these tests keep them from breaking between its runs.
"""

from __future__ import annotations

import ast

import pytest

from mpipar.course.check import Problems, check_markers, handout_imports, same_trees
from mpipar.course.handout import find_function, split_target, stub_source, write_handout
from mpipar.course.manifest import ManifestError, load_manifest

MANIFEST = load_manifest()
IDS = [a.id for a in MANIFEST.assignments]

SOURCE = '''\
def plain(a, b):
    return a + b


class Box:
    @staticmethod
    def documented(x: int) -> int:
        """Twice x.

        Over two lines.
        """
        y = 2 * x  # a comment
        return y

    def other(self):
        return 1
'''


def test_the_course_has_assignments_a1_to_a6_of_100_points_each():
    assert IDS == ["A1", "A2", "A3", "A4", "A5", "A6"]
    for a in MANIFEST.assignments:
        assert sum(t.points for t in a.tasks if not t.bonus) == 100, a.id
        for t in a.code_tasks:
            assert t.hints and t.stub and t.section, t.id
            assert {split_target(s)[0] for s in t.stub} <= set(t.edits), t.id


@pytest.mark.parametrize("assignment", MANIFEST.assignments, ids=IDS)
def test_every_stub_target_is_a_function_of_the_reference(assignment):
    for task in assignment.code_tasks:
        for target in task.stub:
            path, name = split_target(target)
            tree = ast.parse((MANIFEST.root / path).read_text(encoding="utf-8"))
            body = find_function(tree, name).body
            code = body[1:] if isinstance(body[0], ast.Expr) else body
            assert code, f"{target}: nothing to stub below the docstring"


def test_stubbing_keeps_signature_and_docstring_and_raises():
    out = stub_source(SOURCE, ["Box.documented", "plain"], "A9.9 thing — see ch §1")
    compiled = {}
    exec(compile(out, "stubbed", "exec"), compiled)
    with pytest.raises(NotImplementedError, match="A9.9 thing — see ch §1"):
        compiled["Box"].documented(3)
    with pytest.raises(NotImplementedError):
        compiled["plain"](1, 2)
    assert compiled["Box"]().other() == 1
    assert '"""Twice x.\n\n        Over two lines.\n        """' in out
    assert "y = 2 * x" not in out and "@staticmethod" in out
    long = stub_source(SOURCE, ["plain"], "x" * 80)
    assert all(len(line) <= 100 for line in long.splitlines()), "the raise is wrapped"


def test_stubbing_an_unknown_function_names_it():
    with pytest.raises(ManifestError, match="Box.missing"):
        stub_source(SOURCE, ["Box.missing"], "m")


def test_every_grading_test_carries_exactly_one_task_marker():
    problems = Problems(out=lambda line: None)
    check_markers(MANIFEST, problems)
    assert not problems.items, "\n".join(problems.items)


@pytest.fixture(scope="module")
def handouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("handouts")
    return {a: (root / a, write_handout(MANIFEST, a, root / a, classroom=True)) for a in IDS}


@pytest.mark.parametrize("assignment", IDS)
def test_handout_stubs_its_functions_and_hides_the_answers(handouts, assignment):
    tree, files = handouts[assignment]
    a = MANIFEST.assignment(assignment)
    for task in a.code_tasks:
        for target in task.stub:
            path, name = split_target(target)
            source = (tree / path).read_text(encoding="utf-8")
            body = find_function(ast.parse(source), name).body
            assert isinstance(body[-1], ast.Raise), f"{target} is not stubbed"
            assert task.stub_message() in ast.get_source_segment(source, body[-1])
    assert not [f for f in files if f.startswith(("course/labs/", "tests/test_course"))]
    written = next(t for t in a.tasks if t.kind == "written")
    sheet = (tree / written.answers).read_text(encoding="utf-8")
    assert all(f"{q.id} =    #" in sheet for q in written.questions), sheet
    assert sheet != (MANIFEST.root / written.answers).read_text(encoding="utf-8")
    readme = (tree / "HANDOUT.md").read_text(encoding="utf-8")
    assert all(t.id in readme for t in a.tasks)
    workflow = (tree / ".github/workflows/classroom.yml").read_text(encoding="utf-8")
    assert workflow.count("autograding-command-grader") == len(a.code_tasks)


@pytest.mark.parametrize("assignment", IDS)
def test_handout_imports_and_train_help_works(handouts, assignment):
    assert handout_imports(handouts[assignment][0]) == ""


def test_a_handout_generated_again_is_byte_identical(handouts, tmp_path):
    again = tmp_path / "again"
    write_handout(MANIFEST, "A4", again, classroom=True)
    assert same_trees(handouts["A4"][0], again) == ""


def test_a_handout_is_not_written_over_another_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("mine")
    with pytest.raises(FileExistsError):
        write_handout(MANIFEST, "A1", tmp_path / "x")
