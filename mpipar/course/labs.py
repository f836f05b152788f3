"""Break-it labs: the reference with one realistic bug, its symptom, its detector, hints.

A lab is a file ``course/labs/L<nn>_<name>.md``::

    # L04 g all-reduces in backward too
    - chapter: tutorials/03_tensor_parallel.md §2
    - detector: course/tests/test_labs.py::test_L04_...
    (prose: what goes wrong and why it survives)
    ## Symptom      ```sh blocks: commands run in the lab's tree (``# exits N`` as in chapters)
    ## Hints        a numbered list, from a nudge to the answer's doorstep
    ## Patch        `path`: then two ```python blocks: the exact text to find, its replacement

A patch is a list of exact search/replace edits, not a diff: it applies to the reference as
long as the few lines it names are unchanged, whatever else moves around them, and refuses
loudly (naming the file and the text) when they have changed.

``python -m mpipar.course lab make L04 --out DIR`` writes the buggy tree and a ``LAB.md``
(story, symptom, hints; not the patch); ``lab check L04 DIR`` runs the detector in DIR:
it fails while the bug is there and passes once it is fixed.
"""

from __future__ import annotations

import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from mpipar.course.grade import read_junit
from mpipar.course.handout import copy_tree, excluded, source_files
from mpipar.course.manifest import Manifest
from mpipar.course.process import Finished, quiet_env, run

LABS_DIR = Path("course") / "labs"
DETECTORS = "course/tests/test_labs.py"
LAB_README = "LAB.md"
_EXITS = re.compile(r"#\s*exits\s+(\d+)\s*$")


class LabError(ValueError):
    """A lab file that cannot be read, or a patch that no longer applies."""


@dataclass
class Edit:
    path: str
    search: str
    replace: str


@dataclass
class Lab:
    id: str
    title: str
    chapter: str
    detector: str
    story: str
    symptom: list[tuple[str, int]]  # (command, expected exit code)
    symptom_notes: str
    hints: list[str]
    edits: list[Edit] = field(default_factory=list)

    @property
    def detector_name(self) -> str:
        return self.detector.split("::")[-1]


def _sections(text: str) -> tuple[list[str], dict[str, list[str]]]:
    head: list[str] = []
    sections: dict[str, list[str]] = {}
    current = head
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip().lower(), [])
        else:
            current.append(line)
    return head, sections


def _fences(lines: list[str]) -> list[tuple[str, list[str], str | None]]:
    """(language, body lines, the last `path`: line above it) of each fenced block."""
    blocks, path, i = [], None, 0
    while i < len(lines):
        m = re.match(r"^`([^`]+)`:\s*$", lines[i])
        if m:
            path = m[1]
        if lines[i].startswith("```"):
            lang, end = lines[i][3:].strip(), i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            blocks.append((lang, lines[i + 1:end], path))
            i = end
        i += 1
    return blocks


def _commands(body: list[str]) -> list[tuple[str, int]]:
    """(command, expected exit code) per command; a line ending in ``\\`` continues."""
    commands, current = [], []
    for line in body:
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current.append(line.rstrip().rstrip("\\").strip())
        if line.rstrip().endswith("\\"):
            continue
        text = " ".join(current)
        m = _EXITS.search(text)
        commands.append((text, int(m[1]) if m else 0))
        current = []
    return commands


def _edits(lines: list[str], name: str) -> list[Edit]:
    blocks = _fences(lines)
    if not blocks or len(blocks) % 2:
        raise LabError(f"{name}: the patch needs pairs of blocks (text to find, replacement)")
    edits = []
    for (_, search, path), (_, replace, _) in zip(blocks[::2], blocks[1::2], strict=True):
        if path is None:
            raise LabError(f"{name}: a patch block without a `path`: line above it")
        edits.append(Edit(path, "\n".join(search) + "\n", "\n".join(replace) + "\n"))
    return edits


def parse_lab(path: Path) -> Lab:
    text = path.read_text(encoding="utf-8")
    head, sections = _sections(text)
    title_line = next((ln for ln in head if ln.startswith("# ")), "")
    m = re.match(r"^# (L\d\d) (.+)$", title_line)
    if m is None:
        raise LabError(f"{path.name}: the first heading must be '# L<nn> <title>'")
    meta = dict(re.findall(r"^- (\w+): (.+)$", "\n".join(head), re.MULTILINE))
    for key in ("chapter", "detector"):
        if key not in meta:
            raise LabError(f"{path.name}: missing '- {key}: ...'")
    for key in ("symptom", "hints", "patch"):
        if key not in sections:
            raise LabError(f"{path.name}: missing section '## {key.title()}'")
    story = "\n".join(ln for ln in head if not ln.startswith(("# ", "- "))).strip()
    symptom_lines = sections["symptom"]
    commands = [c for lang, body, _ in _fences(symptom_lines) if lang == "sh"
                for c in _commands(body)]
    notes = re.sub(r"```.*?```", "", "\n".join(symptom_lines), flags=re.DOTALL).strip()
    hints = [h.strip() for h in re.findall(r"^\d+\. (.+)$", "\n".join(sections["hints"]),
                                           re.MULTILINE)]
    if not commands or not hints:
        raise LabError(f"{path.name}: needs symptom commands and hints")
    return Lab(m[1], m[2], meta["chapter"], meta["detector"], story, commands, notes, hints,
               _edits(sections["patch"], path.name))


def load_labs(root: Path) -> list[Lab]:
    """Every lab under ``<root>/course/labs``, in order of their ids."""
    labs = [parse_lab(p) for p in sorted((root / LABS_DIR).glob("L*.md"))]
    ids = [lab.id for lab in labs]
    if len(set(ids)) != len(ids):
        raise LabError(f"two labs share an id: {ids}")
    return labs


def find_lab(root: Path, lab_id: str) -> Lab:
    for lab in load_labs(root):
        if lab.id == lab_id.upper():
            return lab
    raise LabError(f"no lab {lab_id!r}; the labs are {', '.join(x.id for x in load_labs(root))}")


# ---- making a lab's tree ------------------------------------------------------------------------


def apply_edits(tree: Path, edits: list[Edit], name: str) -> None:
    """Apply each exact search/replace edit once; refuse if its text is not there exactly once."""
    for e in edits:
        target = tree / e.path
        text = target.read_text(encoding="utf-8")
        found = text.count(e.search)
        if found != 1:
            raise LabError(f"{name} no longer applies: {e.path} holds the text to replace "
                           f"{found} times, not once:\n{e.search}")
        target.write_text(text.replace(e.search, e.replace), encoding="utf-8")


def lab_readme(lab: Lab) -> str:
    ladder = []
    for k, hint in enumerate(lab.hints, start=1):
        ladder += [f"<details><summary>Hint {k}</summary>", "", hint, "", "</details>", ""]
    commands = "\n".join(_EXITS.sub("", c).rstrip() for c, _ in lab.symptom)
    notes = [lab.symptom_notes, ""] if lab.symptom_notes else []
    return "\n".join([
        f"# Lab {lab.id}: {lab.title}", "",
        f"Read first: `{lab.chapter}`. This tree is the reference with one bug in it.", "",
        lab.story, "", "## The symptom", "", "```sh", commands, "```", "", *notes,
        "## Find it, fix it", "",
        f"The detector fails until the bug is gone: `python -m pytest {lab.detector}`, or",
        f"`python -m mpipar.course lab check {lab.id} .`", "", *ladder])


def make_lab(manifest: Manifest, lab: Lab, out: Path) -> None:
    """The reference with ``lab``'s edits applied, and its LAB.md, in ``out`` (new or empty).

    Like a handout it leaves out the answers (the labs' patches, the answer key); unlike a
    handout it keeps the detectors, which the student runs.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new directory")
    keep = ("course/tests/test_labs.py", "course/tests/mpi/labs.py")
    skip = tuple(p for p in manifest.exclude if p not in keep)
    files = [f for f in source_files(manifest.root) if not excluded(f, skip)]
    copy_tree(manifest.root, out, files)
    apply_edits(out, lab.edits, lab.id)
    (out / LAB_README).write_text(lab_readme(lab) + "\n", encoding="utf-8")


# ---- running detectors --------------------------------------------------------------------------


def run_detectors(tree: Path, only: str | None = None, timeout: float = 300) -> dict[str, bool]:
    """Run the lab detectors in ``tree`` (all, or those whose name contains ``only``):
    ``{test name: passed}``."""
    with tempfile.TemporaryDirectory(prefix="mpipar-lab-") as tmp:
        junit = Path(tmp) / "labs.xml"
        cmd = [sys.executable, "-m", "pytest", DETECTORS, "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        if only:
            cmd += ["-k", only]
        env = quiet_env({"PYTHONPATH": str(tree), "MPIPAR_COURSE_FLIGHT_ROOT": tmp})
        done = run(cmd, timeout=timeout, env=env, cwd=tree)
        _, failing = read_junit(junit)
        names = _collected(junit)
    failed = {f.split(":")[0] for f in failing}
    if done.timed_out or not names:
        raise LabError(f"the detectors did not run in {tree}:\n{done.output[-2000:]}")
    return {name: name not in failed for name in names}


def _collected(junit: Path) -> list[str]:
    if not junit.is_file():
        return []
    return [c.get("name") for c in ET.parse(junit).getroot().iter("testcase")]


def check_lab(tree: Path, lab_id: str) -> tuple[bool, str]:
    """(fixed?, the detector's report) for lab ``lab_id`` in ``tree``."""
    with tempfile.TemporaryDirectory(prefix="mpipar-lab-") as tmp:
        junit = Path(tmp) / "lab.xml"
        cmd = [sys.executable, "-m", "pytest", DETECTORS, "-k", f"test_{lab_id.upper()}_",
               "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o",
               "junit_family=xunit1"]
        env = quiet_env({"PYTHONPATH": str(tree), "MPIPAR_COURSE_FLIGHT_ROOT": tmp})
        done = run(cmd, timeout=300, env=env, cwd=tree)
        passed, failing = read_junit(junit)
    if done.timed_out:
        return False, "the detector did not finish within 300 s"
    if passed + len(failing) == 0:
        return False, f"no detector test_{lab_id.upper()}_* ran in {tree}:\n{done.output[-1500:]}"
    return not failing and done.code == 0, done.output


def run_symptom(tree: Path, lab: Lab, timeout: float = 120) -> list[tuple[str, Finished, int]]:
    """Run the symptom commands in ``tree``: (command, how it ended, the exit it should have)."""
    results = []
    for command, expected in lab.symptom:
        bindir = str(Path(sys.executable).parent)
        env = quiet_env({"PYTHONPATH": str(tree)})
        env["PATH"] = bindir + ":" + env.get("PATH", "")
        results.append((command, run(["bash", "-c", command], timeout=timeout, env=env,
                                     cwd=tree), expected))
    return results
