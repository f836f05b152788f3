"""Every command in every tutorial chapter runs, exits as the chapter says, and prints what it says.

A chapter is ``tutorials/NN_*.md``. Its fenced ```` ```sh ```` blocks are commands the reader
types; this file runs all of them, in order, and fails naming the chapter line of the first
command that misbehaves. The rules (also in ``tutorials/README.md``):

* one command per line; a line ending in ``\\`` continues on the next; blank lines and lines
  starting with ``#`` are skipped;
* a command must exit 0, unless its last line ends with a comment ``# exits N``;
* HTML comments on the lines directly above the opening fence are directives for the block:
  ``<!-- expect: REGEX -->`` (any number; each must match somewhere in the block's combined
  stdout and stderr, ``re.MULTILINE``), ``<!-- timeout: SECONDS -->`` (per command, default
  120) and ``<!-- no-test: REASON -->`` (the block is for the reader only);
* commands run with ``bash -c`` in a fresh shell each, so ``cd`` and shell variables do not
  carry over; ``python`` and ``mpirun`` are the ones next to the interpreter running pytest
  (the venv's), as after ``source .venv/bin/activate``;
* the working directory mirrors the repository root (a symlink to every top-level entry) with
  an empty ``runs/`` of its own, new for each chapter, so the reader's own ``runs/`` is never
  touched and no chapter sees another's outputs;
* each command runs in a new session; on timeout its whole process tree (``mpirun``, its
  proxies and every rank) is killed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mpi_util import kill_job

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((REPO / "tutorials").glob("[0-9]*.md"))
DEFAULT_TIMEOUT = 120.0
DIRECTIVES = ("expect", "timeout", "no-test")

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^\s`]*)")
_OTHER_SHELLS = ("bash", "shell", "console", "zsh", "shell-session")
_DIRECTIVE = re.compile(r"^ *<!--\s*(?P<name>[\w-]+)\s*:\s*(?P<value>.*?)\s*-->\s*$")
_EXITS = re.compile(r"#\s*exits\s+(?P<code>\d+)\s*$")


class ChapterError(ValueError):
    """A chapter that breaks the rules; the message gives the file and line."""


@dataclass
class Command:
    text: str  # as handed to bash, continuation lines included
    line: int  # 1-based line in the chapter where the command starts
    exit_code: int = 0


@dataclass
class Block:
    line: int  # line of the opening fence
    commands: list[Command] = field(default_factory=list)
    expects: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT
    skip: str | None = None


def parse_chapter(text: str, name: str = "chapter") -> list[Block]:
    """The ```` ```sh ```` blocks of a chapter, with their commands and directives."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: list[tuple[int, str, str]] = []  # directives waiting for the fence below them
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m:  # a directive if the next line that is not one opens a ```sh block
            pending.append((i + 1, m["name"], m["value"]))
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence is None:
            _refuse_dangling(pending, name)
            pending = []
            i += 1
            continue
        # A fenced block: find its end (same character, at least as long, alone on its line).
        marker, indent = fence["fence"], len(fence["indent"])
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(marker)
                                        and not lines[end].strip().strip(marker[0])):
            end += 1
        if end == len(lines):
            raise ChapterError(f"{name}:{i + 1}: code block is never closed")
        if fence["lang"] in _OTHER_SHELLS:
            raise ChapterError(f"{name}:{i + 1}: tag commands ```sh (the tests run them) and "
                               f"their output ```text, not ```{fence['lang']}")
        if fence["lang"] == "sh":
            block = Block(line=i + 1)
            _apply_directives(block, pending, name)
            # A block inside a list item is indented: drop that indentation (only).
            body = [ln[min(indent, len(ln) - len(ln.lstrip(" "))):] for ln in lines[i + 1:end]]
            block.commands = _commands(body, i + 2, name)
            if not block.commands:
                raise ChapterError(f"{name}:{i + 1}: sh block has no command")
            blocks.append(block)
        else:
            _refuse_dangling(pending, name)
        pending = []
        i = end + 1
    _refuse_dangling(pending, name)
    return blocks


def _refuse_dangling(pending: list[tuple[int, str, str]], name: str) -> None:
    """Comments ``<!-- word: ... -->`` elsewhere are fine, unless ``word`` is a directive."""
    for lineno, directive, _ in pending:
        if directive not in DIRECTIVES:
            continue
        raise ChapterError(f"{name}:{lineno}: directive '{directive}' is not directly above "
                           f"a ```sh block")


def _apply_directives(block: Block, pending: list[tuple[int, str, str]], name: str) -> None:
    for lineno, directive, value in pending:
        where = f"{name}:{lineno}"
        if directive == "expect":
            try:
                re.compile(value, re.MULTILINE)
            except re.error as exc:
                raise ChapterError(f"{where}: bad expect regex {value!r}: {exc}") from None
            block.expects.append(value)
        elif directive == "timeout":
            try:
                block.timeout = float(value)
            except ValueError:
                raise ChapterError(f"{where}: timeout must be seconds, got {value!r}") from None
        elif directive == "no-test":
            if not value:
                raise ChapterError(f"{where}: no-test needs a reason")
            block.skip = value
        else:
            raise ChapterError(f"{where}: unknown directive '{directive}' (known: "
                               f"{', '.join(DIRECTIVES)})")


def _commands(body: list[str], first_line: int, name: str) -> list[Command]:
    commands: list[Command] = []
    current: list[str] = []
    start = first_line
    for offset, line in enumerate(body):
        if not current:
            start = first_line + offset
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line.lstrip().startswith("$ "):
                raise ChapterError(f"{name}:{start}: no prompt in sh blocks (the reader "
                                   f"copies the line as it is)")
        current.append(line)
        if line.rstrip().endswith("\\"):
            continue
        m = _EXITS.search(line)
        commands.append(Command("\n".join(current), start, int(m["code"]) if m else 0))
        current = []
    if current:
        raise ChapterError(f"{name}:{start}: the block ends inside a continued command")
    return commands


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def scratch_root(tmp: Path) -> Path:
    """A directory that looks like the repository root but has its own, empty ``runs/``."""
    root = tmp / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name != "runs":
            (root / entry.name).symlink_to(entry)
    (root / "runs").mkdir()
    return root


def command_env() -> dict[str, str]:
    """The environment after ``source .venv/bin/activate``, with one BLAS thread."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(Path(bindir).parent)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    return env


def run_command(cmd: Command, cwd: Path, timeout: float) -> tuple[int | None, str, float]:
    """``(exit code or None on timeout, combined stdout+stderr, seconds)``."""
    start = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", cmd.text], cwd=cwd, env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_job(proc.pid)
        out, _ = proc.communicate()
        code = None
    return code, out.decode("utf-8", errors="replace"), time.monotonic() - start


def _tail(text: str, n: int = 60) -> str:
    lines = text.splitlines()
    skipped = f"[... {len(lines) - n} earlier lines ...]\n" if len(lines) > n else ""
    return skipped + "\n".join(lines[-n:])


def run_chapter(blocks: list[Block], cwd: Path, name: str) -> list[tuple[Command, float]]:
    """Run every block in order; fail the test at the first command or expectation that fails.

    Returns each command with the seconds it took.
    """
    timings = []
    for block in blocks:
        if block.skip:
            continue
        output = ""
        for cmd in block.commands:
            code, out, seconds = run_command(cmd, cwd, block.timeout)
            timings.append((cmd, seconds))
            output += out
            where = f"{name}:{cmd.line}: `{cmd.text}`"
            if code is None:
                pytest.fail(f"{where} did not finish within {block.timeout:g} s (killed)\n"
                            f"--- output ---\n{_tail(out)}", pytrace=False)
            if code != cmd.exit_code:
                pytest.fail(f"{where} exited {code}, the chapter says {cmd.exit_code}\n"
                            f"--- output ---\n{_tail(out)}", pytrace=False)
        for pattern in block.expects:
            if not re.search(pattern, output, re.MULTILINE):
                pytest.fail(f"{name}:{block.line}: no match for <!-- expect: {pattern} --> in "
                            f"the output of the block\n--- output ---\n{_tail(output)}",
                            pytrace=False)
    return timings


# ---------------------------------------------------------------------------------------------
# The chapters
# ---------------------------------------------------------------------------------------------
def _chapter_timeout(path: Path) -> float:
    """Room for every command of the chapter to use its whole timeout, plus a minute."""
    try:
        blocks = parse_chapter(path.read_text(encoding="utf-8"), path.name)
    except ChapterError:
        return 300.0  # the well-formedness test reports the error
    return 60.0 + sum(b.timeout * len(b.commands) for b in blocks if not b.skip)


def _chapter_params():
    return [pytest.param(p, id=p.stem, marks=pytest.mark.timeout(_chapter_timeout(p)))
            for p in CHAPTERS]


def test_there_are_chapters():
    assert CHAPTERS, f"no tutorials/[0-9]*.md under {REPO}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_is_well_formed(path: Path):
    blocks = parse_chapter(path.read_text(encoding="utf-8"), path.name)
    assert blocks, f"{path.name} has no ```sh block: every chapter gives commands to run"


@pytest.mark.parametrize("path", _chapter_params())
def test_chapter_commands(path: Path, tmp_path: Path):
    blocks = parse_chapter(path.read_text(encoding="utf-8"), path.name)
    timings = run_chapter(blocks, scratch_root(tmp_path), path.name)
    slowest = sorted(timings, key=lambda t: -t[1])[:3]
    print(f"{path.name}: {len(timings)} commands in {sum(s for _, s in timings):.1f} s; slowest: "
          + "; ".join(f"line {c.line} {s:.1f} s" for c, s in slowest))


# ---------------------------------------------------------------------------------------------
# The machinery itself, on small made-up chapters
# ---------------------------------------------------------------------------------------------
SAMPLE = """\
Some prose.

<!-- expect: ^hello world$ -->
<!-- timeout: 30 -->
```sh
# a comment line is skipped
echo hello \\
  world
python -c "raise SystemExit(3)"   # exits 3
```

```text
hello world
```

1. A list item:

   <!-- no-test: shows a command the test must not run -->
   ```sh
   make test
   ```
"""


def test_parser_reads_commands_and_directives():
    blocks = parse_chapter(SAMPLE, "sample.md")
    assert len(blocks) == 2
    first, second = blocks
    assert first.line == 5 and first.expects == ["^hello world$"] and first.timeout == 30
    assert [(c.line, c.exit_code) for c in first.commands] == [(7, 0), (9, 3)]
    assert first.commands[0].text == "echo hello \\\n  world"
    assert second.skip and second.commands[0].text == "make test"


@pytest.mark.parametrize("text, message", [
    ("<!-- expect: x -->\n\n```sh\necho\n```\n", "not directly above"),
    ("<!-- expect: x -->\n```text\nx\n```\n", "not directly above"),
    ("<!-- expct: x -->\n```sh\necho\n```\n", "unknown directive 'expct'"),
    ("<!-- expect: ( -->\n```sh\necho\n```\n", "bad expect regex"),
    ("<!-- timeout: soon -->\n```sh\necho\n```\n", "timeout must be seconds"),
    ("```sh\n$ echo hi\n```\n", "no prompt"),
    ("```sh\necho \\\n```\n", "inside a continued command"),
    ("```sh\n# only a comment\n```\n", "no command"),
    ("```sh\necho\n", "never closed"),
    ("```bash\necho\n```\n", "tag commands ```sh"),
])
def test_parser_refuses_broken_chapters(text: str, message: str):
    with pytest.raises(ChapterError, match=re.escape(message)):
        parse_chapter(text, "broken.md")


def test_runner_uses_the_venv_and_a_fresh_runs_directory(tmp_path: Path):
    chapter = (
        "<!-- expect: ^prefix " + re.escape(sys.prefix) + "$ -->\n"
        "<!-- expect: ^runs holds 0 entries$ -->\n"
        "<!-- expect: ^mpirun " + re.escape(str(Path(sys.executable).parent)) + " -->\n"
        "```sh\n"
        "python -c \"import sys; print('prefix', sys.prefix)\"\n"
        "echo runs holds $(ls -A runs | wc -l) entries\n"
        "echo mpirun $(command -v mpirun)\n"
        "touch runs/made-by-a-chapter\n"
        "```\n"
    )
    root = scratch_root(tmp_path)
    assert (root / "train.py").is_symlink() and not (root / "runs").is_symlink()
    run_chapter(parse_chapter(chapter, "venv.md"), root, "venv.md")
    assert (root / "runs" / "made-by-a-chapter").exists()
    assert not (REPO / "runs" / "made-by-a-chapter").exists()


def test_runner_reports_wrong_exit_codes_and_missing_output(tmp_path: Path):
    root = scratch_root(tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"x\.md:2: .* exited 1, the chapter says 0"):
        run_chapter(parse_chapter("```sh\nfalse\n```\n", "x.md"), root, "x.md")
    with pytest.raises(pytest.fail.Exception, match=r"exited 0, the chapter says 2"):
        run_chapter(parse_chapter("```sh\ntrue  # exits 2\n```\n", "x.md"), root, "x.md")
    with pytest.raises(pytest.fail.Exception, match=r"x\.md:2: no match for <!-- expect: bye"):
        run_chapter(parse_chapter("<!-- expect: bye -->\n```sh\necho hi\n```\n", "x.md"),
                    root, "x.md")


def test_runner_kills_the_whole_process_group_on_timeout(tmp_path: Path):
    root = scratch_root(tmp_path)
    marker = root / "runs" / "late"
    chapter = f"<!-- timeout: 1 -->\n```sh\n(sleep 2; touch {marker}) & sleep 30\n```\n"
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish within 1 s"):
        run_chapter(parse_chapter(chapter, "slow.md"), root, "slow.md")
    assert time.monotonic() - start < 10
    time.sleep(2)  # the background child would have touched the marker by now
    assert not marker.exists(), "a background child of the timed-out command survived"
