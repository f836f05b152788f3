"""Break-it labs (``python -m mpipar.course lab``): each patch applies, and its detector
catches it.

``make course-check`` runs every detector on every lab's tree (a lab must be caught by its
own detector and by no other) and the symptom commands; here each lab's tree meets its own
detector, and the reference passes them all.
"""

from __future__ import annotations

import pytest
from conftest import python_subprocess

from mpipar.course.handout import copy_tree
from mpipar.course.labs import LabError, apply_edits, check_lab, load_labs, make_lab, run_detectors
from mpipar.course.manifest import load_manifest

MANIFEST = load_manifest()
LABS = load_labs(MANIFEST.root)


def test_there_are_ten_labs_each_with_a_ladder_of_hints():
    assert [lab.id for lab in LABS] == [f"L{i:02d}" for i in range(1, len(LABS) + 1)]
    assert len(LABS) >= 13
    for lab in LABS:
        assert len(lab.hints) >= 2 and lab.symptom and lab.story, lab.id
        assert lab.detector.startswith("course/tests/test_labs.py::test_" + lab.id + "_")
        assert (MANIFEST.root / lab.chapter.split()[0]).is_file(), lab.chapter


def test_a_patch_that_no_longer_applies_is_refused(tmp_path):
    copy_tree(MANIFEST.root, tmp_path, ["mpipar/parallel/ring.py"])
    lab = next(x for x in LABS if x.id == "L02")
    apply_edits(tmp_path, lab.edits, lab.id)
    with pytest.raises(LabError, match="L02 no longer applies: mpipar/parallel/ring.py"):
        apply_edits(tmp_path, lab.edits, lab.id)  # the text it replaces is gone now


def test_the_reference_passes_every_detector():
    results = run_detectors(MANIFEST.root)
    assert sorted(results) == sorted(lab.detector_name for lab in LABS)
    assert all(results.values()), results


@pytest.mark.parametrize("lab", LABS, ids=[lab.id for lab in LABS])
def test_each_lab_is_caught_by_its_detector(lab, tmp_path):
    tree = tmp_path / lab.id
    make_lab(MANIFEST, lab, tree)
    sheet = (tree / "LAB.md").read_text(encoding="utf-8")
    assert lab.hints[0] in sheet and lab.edits[0].replace.strip() not in sheet
    assert not (tree / "course/labs").exists() and not (tree / "course/answers").exists()
    fixed, report = check_lab(tree, lab.id)
    assert not fixed, f"{lab.id}'s detector passed on the broken tree:\n{report[-2000:]}"
    assert lab.detector_name in report


def test_lab_commands(tmp_path):
    proc = python_subprocess(["-m", "mpipar.course", "lab", "list"])
    assert proc.returncode == 0 and proc.stdout.count("\n") == len(LABS)
    proc = python_subprocess(["-m", "mpipar.course", "lab", "hint", "L03", "2"])
    assert proc.stdout.startswith("hint 1: ") and "hint 2: " in proc.stdout
    proc = python_subprocess(["-m", "mpipar.course", "lab", "make", "L09", "--out",
                              tmp_path / "l09"])
    assert proc.returncode == 0 and (tmp_path / "l09" / "LAB.md").is_file()
    proc = python_subprocess(["-m", "mpipar.course", "lab", "make", "L99", "--out",
                              tmp_path / "l99"])
    assert proc.returncode == 2 and "no lab 'L99'" in proc.stderr
    proc = python_subprocess(["-m", "mpipar.course", "lab", "check", "L08", MANIFEST.root])
    assert proc.returncode == 0 and "L08: fixed, the detector passes" in proc.stdout
