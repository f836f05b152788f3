"""``python -m mpipar.course``: handouts, grading, break-it labs and the course check.

    python -m mpipar.course handout A2 --out DIR [--classroom]
    python -m mpipar.course grade A2 [--task A2.2 ...] [--submission DIR] [--out FILE.json]
    python -m mpipar.course grade A2 --submissions FOLDER --csv grades.csv
    python -m mpipar.course lab list
    python -m mpipar.course lab make L04 --out DIR
    python -m mpipar.course lab check L04 DIR
    python -m mpipar.course lab hint L04 [N]
    python -m mpipar.course check

``grade`` exits 0 when every task passed, 1 when one did not, 2 when the environment blocked
a task (no ``mpirun``, too few process slots) or the command was misused. ``course/README.md``
is the instructor's guide.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mpipar.course.check import course_check
from mpipar.course.grade import format_table, grade, grade_folder
from mpipar.course.handout import write_handout
from mpipar.course.labs import LabError, check_lab, find_lab, load_labs, make_lab
from mpipar.course.manifest import REPO, ManifestError, load_manifest


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mpipar.course",
                                 description="The mpipar course: handouts, grading, labs.")
    ap.add_argument("--root", type=Path, default=REPO,
                    help="the reference repository (default: the one mpipar is in)")
    sub = ap.add_subparsers(dest="command", required=True)

    h = sub.add_parser("handout", help="write a student tree with an assignment's functions "
                                       "stubbed")
    h.add_argument("assignment")
    h.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    h.add_argument("--classroom", action="store_true",
                   help="also write a GitHub Classroom workflow, one step per task")

    g = sub.add_parser("grade", help="grade an assignment, each task in its own process group")
    g.add_argument("assignment")
    g.add_argument("--task", action="append", help="grade only this task (repeatable)")
    g.add_argument("--submission", type=Path,
                   help="a student's tree: only the files the assignment edits are taken")
    g.add_argument("--out", type=Path, help="write the JSON report here")
    g.add_argument("--submissions", type=Path,
                   help="a folder with one sub-directory per student (with --csv)")
    g.add_argument("--csv", type=Path, default=Path("grades.csv"),
                   help="where --submissions writes its table (default grades.csv)")

    lab = sub.add_parser("lab", help="break-it labs")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_sub.add_parser("list", help="the labs")
    make = lab_sub.add_parser("make", help="write the reference with a lab's bug in it")
    make.add_argument("lab")
    make.add_argument("--out", type=Path, required=True)
    chk = lab_sub.add_parser("check", help="run a lab's detector in a tree: fixed yet?")
    chk.add_argument("lab")
    chk.add_argument("tree", type=Path)
    hint = lab_sub.add_parser("hint", help="print a lab's hints, up to the N-th")
    hint.add_argument("lab")
    hint.add_argument("n", type=int, nargs="?", default=1)

    c = sub.add_parser("check", help="prove the course: reference 100%%, handouts 0, labs "
                                     "caught (several minutes)")
    c.add_argument("--skip-isolation", action="store_true",
                   help="leave out the per-task stubbing check")
    c.add_argument("--skip-symptoms", action="store_true",
                   help="leave out running the labs' symptom commands")
    return ap


def cmd_grade(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.root)
    if args.submissions is not None:
        reports = grade_folder(manifest, args.assignment, args.submissions, args.csv)
        for report in reports:
            print(format_table(report, details=False))
        print(f"wrote {args.csv} ({len(reports)} submissions)")
        return 2 if any(r.exit_code() == 2 for r in reports) else 0
    report = grade(manifest, args.assignment, args.task, args.submission)
    print(format_table(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n",
                            encoding="utf-8")
    return report.exit_code()


def cmd_lab(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if args.lab_command == "list":
        for lab in load_labs(root):
            print(f"{lab.id}  {lab.title}  ({lab.chapter})")
        return 0
    if args.lab_command == "check":
        fixed, report = check_lab(args.tree, args.lab)
        print(report.rstrip())
        print(f"{args.lab.upper()}: {'fixed, the detector passes' if fixed else 'still caught'}")
        return 0 if fixed else 1
    lab = find_lab(root, args.lab)
    if args.lab_command == "hint":
        for k, text in enumerate(lab.hints[:max(1, args.n)], start=1):
            print(f"hint {k}: {text}")
        return 0
    make_lab(load_manifest(root), lab, args.out)
    print(f"wrote {args.out}: {lab.id} {lab.title}; read {args.out / 'LAB.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "handout":
            files = write_handout(load_manifest(args.root), args.assignment, args.out,
                                  classroom=args.classroom)
            print(f"wrote {args.out}: {len(files)} files; read {args.out / 'HANDOUT.md'}")
            return 0
        if args.command == "grade":
            return cmd_grade(args)
        if args.command == "lab":
            return cmd_lab(args)
        return course_check(load_manifest(args.root), isolation=not args.skip_isolation,
                            symptoms=not args.skip_symptoms)
    except (ManifestError, LabError, FileExistsError, FileNotFoundError) as exc:
        print(f"python -m mpipar.course: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
