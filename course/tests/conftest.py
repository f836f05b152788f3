"""Grading tests: one pytest marker per task of ``course/manifest.json``.

``python -m mpipar.course grade A2 --task A2.2`` runs ``pytest <tests of A2> -m a2_2``; so can
you. Each test compares with the 1-process computation in float64 or reads facts from the
communication trace; none measures time. Multi-process tests start ``mpirun`` through
``course_mpi.launch``, which kills a job that hangs and reports where each rank was.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from course_mpi import ROOT  # noqa: E402

from mpipar.course.manifest import load_manifest  # noqa: E402


def pytest_configure(config):
    for assignment in load_manifest(ROOT).assignments:
        for task in assignment.code_tasks:
            config.addinivalue_line("markers", f"{task.marker}: {task.id} {task.name}")
