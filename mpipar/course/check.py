"""``make course-check``: prove that the course grades what it claims to grade.

1. **markers**: every grading test carries exactly one task marker, every task has tests;
2. **handouts**: each assignment's handout is generated twice, byte-identical; it imports,
   and ``train.py --help`` works;
3. **reference**: the reference scores 100% on every assignment;
4. **handouts graded**: every handout scores 0, each task *failed* (not timed out, not an
   error), and no single grading test passes on it;
5. **isolation**: with only one task's functions stubbed, every test of that task fails
   (each test needs its own task's code, not just an earlier task's);
6. **labs**: every lab's tree fails its own detector and passes every other detector, its
   symptom commands exit as the lab says; the reference passes every detector.

Each step prints a line per item; the run ends with the time it took and exits 0 only if
every step held.
"""

from __future__ import annotations

import filecmp
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mpipar.course.grade import Launcher, grade
from mpipar.course.handout import (
    copy_tree,
    source_files,
    stub_file,
    stub_targets,
    write_handout,
)
from mpipar.course.labs import load_labs, make_lab, run_detectors, run_symptom
from mpipar.course.manifest import Assignment, Manifest
from mpipar.course.process import quiet_env, run


class Problems:
    """Collects what went wrong, printing each verdict as it comes."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.items: list[str] = []
        self.out = out

    def verdict(self, ok: bool, what: str, why: str = "") -> None:
        self.out(f"  {'ok  ' if ok else 'FAIL'} {what}" + ("" if ok else f": {why}"))
        if not ok:
            self.items.append(f"{what}: {why}")


_MARKERS = """
import json, sys, pytest
class Markers:
    def pytest_collection_modifyitems(self, items):
        print("MARKERS " + json.dumps({i.nodeid: [m.name for m in i.iter_markers()]
                                       for i in items}))
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[1]],
                     plugins=[Markers()]))
"""


def markers_of_tests(root: Path, tests: str) -> dict[str, list[str]]:
    """``{test id: the names of its markers}`` of every test pytest collects in ``tests``."""
    done = run([sys.executable, "-c", _MARKERS, tests], timeout=120,
               env=quiet_env({"PYTHONPATH": str(root)}), cwd=root)
    for line in done.output.splitlines():
        if line.startswith("MARKERS "):
            return json.loads(line[len("MARKERS "):])
    return {}


def check_markers(manifest: Manifest, p: Problems) -> None:
    for a in manifest.assignments:
        tasks = {t.marker: t.id for t in a.code_tasks}
        markers = markers_of_tests(manifest.root, a.tests)
        wrong = [f"{test.split('::')[-1]} has {[m for m in names if m in tasks] or 'none'}"
                 for test, names in markers.items()
                 if len([m for m in names if m in tasks]) != 1]
        used = {m for names in markers.values() for m in names}
        empty = [tasks[m] for m in tasks if m not in used]
        p.verdict(bool(markers) and not wrong and not empty,
                  f"{a.id}: {len(markers)} tests, each with one task marker; every task tested",
                  "; ".join(wrong[:3] + [f"{t} has no test" for t in empty]) or "no tests")


def handout_imports(tree: Path) -> str:
    """Empty if the stubbed tree imports every mpipar module and ``train.py --help`` works."""
    code = ("import importlib, pkgutil, mpipar; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(mpipar.__path__, "
            "'mpipar.') if not m.name.endswith('__main__')]")
    env = quiet_env({"PYTHONPATH": str(tree)})
    for cmd in ([sys.executable, "-c", code], [sys.executable, "train.py", "--help"]):
        done = run(cmd, timeout=120, env=env, cwd=tree)
        if done.code != 0:
            return f"`{' '.join(cmd[1:])[:60]}` exited {done.code}: {done.output[-300:]}"
    return ""


def same_trees(a: Path, b: Path) -> str:
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return f"different files: {sorted(set(files_a) ^ set(files_b))[:5]}"
    _, mismatch, errors = filecmp.cmpfiles(a, b, files_a, shallow=False)
    return f"different bytes: {(mismatch + errors)[:5]}" if mismatch or errors else ""


def check_handouts(manifest: Manifest, work: Path, p: Problems) -> dict[str, Path]:
    trees = {}
    for a in manifest.assignments:
        first, second = work / f"{a.id}-handout", work / f"{a.id}-again"
        write_handout(manifest, a.id, first, classroom=True)
        write_handout(manifest, a.id, second, classroom=True)
        diff = same_trees(first, second)
        p.verdict(not diff, f"{a.id}: handout generated twice is byte-identical", diff)
        broken = handout_imports(first)
        p.verdict(not broken, f"{a.id}: handout imports and train.py --help works", broken)
        trees[a.id] = first
    return trees


def check_reference(manifest: Manifest, launcher: Launcher, p: Problems) -> None:
    for a in manifest.assignments:
        report = grade(manifest, a.id, launcher=launcher)
        bad = [f"{t.id} {t.status} {t.failing_tests[:2]}" for t in report.tasks
               if t.status != "passed"]
        p.verdict(not bad and report.totals["percent"] == 100.0,
                  f"{a.id}: reference scores {report.totals['percent']:g}%", "; ".join(bad))


def check_handouts_score_zero(manifest: Manifest, trees: dict[str, Path], launcher: Launcher,
                              p: Problems) -> None:
    for a in manifest.assignments:
        report = grade(manifest, a.id, submission=trees[a.id], launcher=launcher)
        bad = [f"{t.id} {t.status}, {t.passed_tests}/{t.total_tests} tests pass"
               for t in report.tasks
               if t.status != "failed" or t.passed_tests or not t.total_tests]
        p.verdict(not bad and report.totals["earned"] == 0,
                  f"{a.id}: handout scores {report.totals['earned']:g}, every task failed, "
                  f"no test passes", "; ".join(bad))


def only_task_stubbed(manifest: Manifest, a: Assignment, task_id: str, out: Path) -> Path:
    """A copy of the reference with only ``task_id``'s functions stubbed."""
    copy_tree(manifest.root, out, source_files(manifest.root))
    task = a.task(task_id)
    for rel, stubs in stub_targets((task,)).items():
        stub_file(out / rel, stubs)
    return out


def check_isolation(manifest: Manifest, work: Path, launcher: Launcher, p: Problems) -> None:
    for a in manifest.assignments:
        for task in a.code_tasks:
            tree = only_task_stubbed(manifest, a, task.id, work / f"only-{task.id}")
            result = grade(manifest, a.id, [task.id], submission=tree, launcher=launcher)
            r = result.tasks[0]
            p.verdict(r.status == "failed" and r.passed_tests == 0 and r.total_tests > 0,
                      f"{task.id}: every test fails with only its own functions stubbed",
                      f"{r.status}, {r.passed_tests}/{r.total_tests} pass")


def check_labs(manifest: Manifest, work: Path, p: Problems, symptoms: bool = True) -> None:
    labs = load_labs(manifest.root)
    reference = run_detectors(manifest.root)
    failing = sorted(n for n, ok in reference.items() if not ok)
    p.verdict(not failing and len(reference) == len(labs),
              f"reference passes all {len(reference)} detectors", f"fails {failing}")
    for lab in labs:
        tree = work / f"lab-{lab.id}"
        make_lab(manifest, lab, tree)
        results = run_detectors(tree)
        caught = sorted(n for n, ok in results.items() if not ok)
        p.verdict(caught == [lab.detector_name], f"{lab.id}: caught by its detector alone",
                  f"failing detectors: {caught or 'none'}")
        if symptoms:
            wrong = [f"`{c[:50]}...` exited {'timeout' if d.timed_out else d.code}, not {e}"
                     for c, d, e in run_symptom(tree, lab) if d.code != e]
            p.verdict(not wrong, f"{lab.id}: symptom commands behave as described",
                      "; ".join(wrong))


def course_check(manifest: Manifest, isolation: bool = True, symptoms: bool = True) -> int:
    """Run every check; print a verdict per item and the time; 0 if all held, else 1."""
    start = time.monotonic()
    p, launcher = Problems(), Launcher()
    with tempfile.TemporaryDirectory(prefix="mpipar-course-check-") as tmp:
        work = Path(tmp)
        steps = [("every test carries one task marker", lambda: check_markers(manifest, p))]
        trees: dict[str, Path] = {}
        steps.append(("handouts", lambda: trees.update(check_handouts(manifest, work, p))))
        steps.append(("the reference scores 100%",
                      lambda: check_reference(manifest, launcher, p)))
        steps.append(("every handout scores 0",
                      lambda: check_handouts_score_zero(manifest, trees, launcher, p)))
        if isolation:
            steps.append(("each task's tests need that task",
                          lambda: check_isolation(manifest, work, launcher, p)))
        steps.append(("labs", lambda: check_labs(manifest, work, p, symptoms)))
        for title, step in steps:
            t0 = time.monotonic()
            print(f"{title}:", flush=True)
            step()
            print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    minutes, seconds = divmod(time.monotonic() - start, 60)
    if p.items:
        print(f"course-check FAILED ({len(p.items)} problems) in {minutes:.0f} min "
              f"{seconds:.0f} s:")
        for item in p.items:
            print(f"  {item}")
        return 1
    print(f"course-check passed in {minutes:.0f} min {seconds:.0f} s")
    return 0
