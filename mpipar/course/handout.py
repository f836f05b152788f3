"""Student trees generated from the reference: the task's functions stubbed, all else unchanged.

``python -m mpipar.course handout A2 --out DIR`` copies the repository (the files git knows,
tracked or new but not ignored, in sorted order) to DIR, and in each function a task lists
keeps the ``def`` line and the docstring and replaces the body with::

    raise NotImplementedError("A2.2 ring reduce-scatter and all-gather — see ... §3")

Function spans come from :mod:`ast`, so a stub removes exactly the body and nothing around
it. Every other file is the reference's, byte for byte: a bug in A1 never blocks A2. Files
that would give answers away (the answer key, the labs) are left out (``handout.exclude`` of
the manifest) and a blank answer sheet takes the key's place. The output depends on nothing
but the reference and the manifest, so generating twice gives identical trees.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

from mpipar.course.manifest import Assignment, Manifest, ManifestError, Task

SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "build",
             "dist", "out"}
HANDOUT_README = "HANDOUT.md"
CLASSROOM_WORKFLOW = ".github/workflows/classroom.yml"


def source_files(root: Path) -> list[str]:
    """The repository's files, relative and sorted: what git tracks plus new, unignored files.

    Outside a git checkout, every file below ``root`` but caches, outputs and the venv.
    """
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        files = {f for f in out.decode().split("\0") if f and (root / f).is_file()}
    except (OSError, subprocess.CalledProcessError):
        files = set()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS
                           and not d.endswith(".egg-info")]
            rel = Path(dirpath).relative_to(root)
            files |= {(rel / f).as_posix() for f in filenames}
    return sorted(files)


def copy_tree(root: Path, out: Path, files: list[str]) -> None:
    """Copy ``files`` (relative to ``root``) into ``out``, contents and permission bits."""
    for rel in files:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, dest)
        os.chmod(dest, (root / rel).stat().st_mode & 0o777)


# ---- stubbing ---------------------------------------------------------------------------------


def split_target(target: str) -> tuple[str, str]:
    """``"mpipar/ring.py::ring_allgather"`` → ``("mpipar/ring.py", "ring_allgather")``."""
    path, sep, name = target.partition("::")
    if not sep or not name:
        raise ManifestError(f"stub target {target!r} is not 'path::function' or "
                            f"'path::Class.method'")
    return path, name


def find_function(tree: ast.Module, name: str) -> ast.FunctionDef:
    """The module-level function ``name`` or the method ``Class.method``."""
    scope: list[ast.stmt] = tree.body
    *classes, func = name.split(".")
    for cls in classes:
        found = [n for n in scope if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            raise ManifestError(f"no class {cls!r} for stub target {name!r}")
        scope = found[0].body
    for node in scope:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == func:
            return node
    raise ManifestError(f"no function {name!r} to stub")


def _body_span(node: ast.FunctionDef) -> tuple[int, int, int]:
    """(first line to replace, last line, indentation) of the body after the docstring."""
    body = node.body
    first = body[0]
    has_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
               and isinstance(first.value.value, str))
    if has_doc and len(body) == 1:
        raise ManifestError(f"{node.name} has nothing but a docstring to stub")
    start = first.end_lineno + 1 if has_doc else first.lineno
    return start, node.end_lineno, first.col_offset


def _raise_lines(message: str, indent: int) -> list[str]:
    text = message.replace("\\", "\\\\").replace('"', '\\"')
    pad = " " * indent
    one = f'{pad}raise NotImplementedError("{text}")'
    if len(one) <= 100:
        return [one]
    return [f"{pad}raise NotImplementedError(", f'{pad}    "{text}")']


def stub_source(source: str, names: list[str], message: str) -> str:
    """``source`` with the body of every function in ``names`` replaced by the raise."""
    tree = ast.parse(source)
    lines = source.splitlines()
    spans = sorted((_body_span(find_function(tree, n)) for n in names), reverse=True)
    for start, end, indent in spans:  # bottom-up, so earlier line numbers stay valid
        lines[start - 1:end] = _raise_lines(message, indent)
    return "\n".join(lines) + ("\n" if source.endswith("\n") else "")


def stub_targets(tasks: tuple[Task, ...]) -> dict[str, list[tuple[str, str]]]:
    """Per file, the (function, message) pairs to stub for ``tasks``."""
    per_file: dict[str, list[tuple[str, str]]] = {}
    for task in tasks:
        for target in task.stub:
            path, name = split_target(target)
            per_file.setdefault(path, []).append((name, task.stub_message()))
    return per_file


def stub_file(path: Path, stubs: list[tuple[str, str]]) -> None:
    """Stub, in place, the functions of one file (each with its own task's message)."""
    source = path.read_text(encoding="utf-8")
    for name, message in stubs:
        source = stub_source(source, [name], message)
    compile(source, str(path), "exec")  # a stub must leave a module that still parses
    path.write_text(source, encoding="utf-8")


# ---- the handout ------------------------------------------------------------------------------


def excluded(rel: str, prefixes: tuple[str, ...]) -> bool:
    return any(rel == p or rel.startswith(p) for p in prefixes)


def blank_answer_sheet(task: Task) -> str:
    lines = [f"# {task.id.split('.')[0]}: written answers, one number per line (see "
             f"course/questions/{task.id.split('.')[0]}.md)."]
    lines += [f"{q.id} =    # {q.unit}" for q in task.questions]
    return "\n".join(lines) + "\n"


def readme(a: Assignment) -> str:
    """HANDOUT.md: what to write, where the chapter explains it, how to grade it here."""
    rows = ["| task | points | what | write | read |", "| --- | ---: | --- | --- | --- |"]
    for t in a.tasks:
        points = f"{t.points:g}" + (" (bonus)" if t.bonus else "")
        if t.kind == "written":
            rows.append(f"| {t.id} | {points} | {t.name} | `{t.answers}` | `{a.questions}` |")
            continue
        names = "<br>".join(f"`{split_target(s)[1]}` in `{split_target(s)[0]}`" for s in t.stub)
        rows.append(f"| {t.id} | {points} | {t.name} | {names} | "
                    f"`{t.chapter}` {t.section} |")
    return "\n".join([
        f"# Assignment {a.id}: {a.title}", "",
        "Each function listed below keeps its signature and docstring and raises "
        "`NotImplementedError`: write its body. Everything else is the working reference.", "",
        *rows, "",
        "Grade your work as the instructor will (each task in its own process group, with a "
        "timeout):", "",
        "```sh",
        f"python -m mpipar.course grade {a.id}",
        f"python -m mpipar.course grade {a.id} --task {a.code_tasks[0].id}",
        "```", "",
        f"Or run a task's tests directly: `python -m pytest {a.tests} -m "
        f"{a.code_tasks[0].marker}`. The written answers are marked by your instructor "
        "(their key is not in this tree, so they show as `blocked` here).", "",
    ])


def classroom_workflow(a: Assignment) -> str:
    """A GitHub Classroom autograding workflow: one step per task, each with its points."""
    steps, ids = [], []
    for t in a.code_tasks:  # written answers are marked against the key, which stays home
        step = t.id.replace(".", "-").lower()
        ids.append(step)
        steps += [
            f"    - name: {t.id} {t.name}",
            f"      id: {step}",
            "      uses: classroom-resources/autograding-command-grader@v1",
            "      with:",
            f"        test-name: {t.id} {t.name}",
            "        setup-command: pip install -e '.[dev]'",
            f"        command: python -m mpipar.course grade {a.id} --task {t.id}",
            f"        timeout: {max(1, int(t.timeout // 60) + 1)}",
            f"        max-score: {t.points:g}",
        ]
    runners = ",".join(ids)
    results = "\n".join(f"        {i.upper().replace('-', '_')}_RESULTS: "
                        f"\"${{{{steps.{i}.outputs.result}}}}\"" for i in ids)
    return "\n".join([
        "name: Autograding", "on: [push, workflow_dispatch]",
        "permissions:", "  checks: write", "  actions: read", "  contents: read",
        "jobs:", "  autograding:", "    runs-on: ubuntu-latest", "    steps:",
        "    - uses: actions/checkout@v4",
        "    - uses: actions/setup-python@v5", "      with:", "        python-version: '3.11'",
        *steps,
        "    - name: Report", "      uses: classroom-resources/autograding-grader-reporter@v1",
        "      env:", results, "      with:", f"        runners: {runners}", "",
    ])


def write_handout(manifest: Manifest, assignment_id: str, out: Path,
                  classroom: bool = False) -> list[str]:
    """Write the student tree of one assignment to ``out`` (new or empty); return its files."""
    a = manifest.assignment(assignment_id)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new directory")
    files = [f for f in source_files(manifest.root) if not excluded(f, manifest.exclude)]
    copy_tree(manifest.root, out, files)
    for rel, stubs in stub_targets(a.code_tasks).items():
        if rel not in files:
            raise ManifestError(f"{a.id}: stub target file {rel} is not in the reference")
        stub_file(out / rel, stubs)
    extra = {HANDOUT_README: readme(a)}
    for t in a.tasks:
        if t.kind == "written":
            extra[t.answers] = blank_answer_sheet(t)
    if classroom:
        extra[CLASSROOM_WORKFLOW] = classroom_workflow(a)
    for rel, text in extra.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text, encoding="utf-8")
    return sorted({*files, *extra})
