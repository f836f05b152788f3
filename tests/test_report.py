"""The run report (``train.py --report DIR``) and the exposed/overlapped split behind it.

Three real 2-process runs, data-, tensor- and pipeline-parallel, write their report; each page
must be valid HTML with every section of its kind of run, hold its pictures inline and
reference nothing outside the file. When a Chromium is installed, it renders a page headless
and must report no JavaScript error. The trace of a non-blocking call says how long its wait
blocked (``TraceRecord.waited``), which is what the report and the end-of-run table count as
exposed time.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import check_ok, describe_run, train_subprocess

from mpipar.comm import Comm, wait_all
from mpipar.report import main as report_main
from mpipar.report import reproduce_command
from mpipar.trace import Tracer
from mpipar.viz import main as viz_main

RUNS = {
    "dp": ["--dp", "2", "--bucket-mb", "0.1"],
    "tp": ["--tp", "2"],
    "pp": ["--pp", "2", "--microbatches", "4"],
}
COMMON = ["--preset", "tiny", "--steps", "4", "--eval-every", "2", "--quiet"]
SECTIONS = ["loss", "throughput", "communication", "memory", "configuration"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Each layout's report directory, written by ``train.py --report`` on 2 processes."""
    root = tmp_path_factory.mktemp("reports")
    out = {}
    for kind, flags in RUNS.items():
        proc = check_ok(train_subprocess([*COMMON, *flags, "--report", root / kind], n=2))
        assert f"report: {root / kind / 'report.html'}" in proc.stdout, describe_run(proc)
        out[kind] = root / kind
    return out


class Structure(HTMLParser):
    """Checks nesting as it parses; records ids, tags and every src/href."""

    VOID = {"meta", "br", "img", "hr", "link", "input", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.tags: list[str] = []
        self.links: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._note(tag, attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self._note(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'} at "
                               f"line {self.getpos()[0]}")
            return
        self.stack.pop()

    def _note(self, tag: str, attrs: list) -> None:
        self.tags.append(f"svg:{tag}" if "svg" in self.stack else tag)  # SVG has a <title> too
        for name, value in attrs:
            if name == "id":
                self.ids.append(value)
            if name in ("src", "href", "xlink:href", "action"):
                self.links.append(value or "")


def parse(page: str) -> Structure:
    parser = Structure()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"tags left open: {parser.stack}"
    assert parser.doctype.lower() == "doctype html"
    for tag in ("html", "head", "title", "body", "h1"):
        assert parser.tags.count(tag) == 1, f"{tag} appears {parser.tags.count(tag)} times"
    return parser


@pytest.mark.parametrize("kind", list(RUNS))
def test_report_is_valid_self_contained_html_with_every_section(kind: str, runs):
    page = (runs[kind] / "report.html").read_text(encoding="utf-8")
    parser = parse(page)
    expected = SECTIONS[:3] + (["pipeline"] if kind == "pp" else []) + SECTIONS[3:]
    sections = [i for i in parser.ids if i in SECTIONS + ["pipeline"]]
    assert sections == expected, f"{kind}: sections {sections}"
    assert all(link.startswith("#") for link in parser.links), parser.links
    assert "<script" not in page and "@import" not in page and "url(http" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    # every section but the configuration draws at least one picture, inline
    for section in expected[:-1]:
        body = page.split(f'<section id="{section}">')[1].split("</section>")[0]
        assert "<svg" in body, f"{kind}: section {section} has no picture"


def test_report_contents(runs):
    dp = (runs["dp"] / "report.html").read_text(encoding="utf-8")
    description = json.loads((runs["dp"] / "run.json").read_text())
    command = reproduce_command(2, [*COMMON, *RUNS["dp"], "--report", str(runs["dp"])])
    assert description["command"] == command and f"<code>{command}</code>" in dp
    assert description["metrics"] == "metrics.jsonl" and description["layout"]["dp"] == 2
    # the overlapped bucket all-reduces: launched in backward, some of their time hidden
    row = re.search(r"<tr><td>iallreduce</td><td>dp</td><td>backward</td><td>(\d+)</td>"
                    r"<td>[^<]+</td><td>([\d.]+)</td><td>([\d.]+)</td>", dp)
    assert row and int(row.group(1)) == 4 * 7, "7 buckets a step, 4 steps"
    assert float(row.group(3)) > 0, "non-blocking all-reduces overlap nothing?"
    summary = json.loads((runs["pp"] / "metrics.jsonl").read_text().splitlines()[-1])
    memory = summary["memory_per_rank"]
    assert [sorted(m) for m in memory] == [["gradients", "optimizer_state", "parameters",
                                            "peak"]] * 2
    assert all(m["optimizer_state"] == 2 * m["parameters"] > 0 for m in memory), "AdamW: m, v"
    pp = (runs["pp"] / "report.html").read_text(encoding="utf-8")
    assert "Schedule 1f1b, p = 2, m = 4, v = 1: bubble in theory 20.0%" in pp


def test_report_command_redraws_the_same_page(runs, tmp_path, capsys):
    again = tmp_path / "again.html"
    assert report_main([str(runs["tp"]), "--out", str(again)]) == 0
    assert again.read_bytes() == (runs["tp"] / "report.html").read_bytes()
    from_metrics = tmp_path / "m.html"
    assert report_main([str(runs["tp"] / "metrics.jsonl"), "--out", str(from_metrics)]) == 0
    parse(from_metrics.read_text(encoding="utf-8"))
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


def test_viz_loss(runs, tmp_path, capsys):
    metrics = str(runs["dp"] / "metrics.jsonl")
    assert viz_main(["loss", metrics, "--out", str(tmp_path / "loss.svg")]) == 0
    assert "training loss" in (tmp_path / "loss.svg").read_text()
    pytest.importorskip("matplotlib")
    assert viz_main(["loss", metrics, "--out", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.count("wrote ") == 2


def test_report_path_that_is_a_file_is_a_usage_error(run_train, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    proc = run_train([*COMMON, "--report", blocker / "run"])
    assert proc.returncode == 2 and proc.stdout == "", describe_run(proc)
    assert f"--report {blocker / 'run'}: {blocker} is not a directory" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_report_follows_the_one_rule_for_outputs(run_train, tmp_path):
    """Like every output, --report needs its parent directory to exist (docs/design.md §7)."""
    proc = run_train([*COMMON, "--report", tmp_path / "missing" / "run"])
    assert proc.returncode == 2 and proc.stdout == "", describe_run(proc)
    assert f"directory {tmp_path / 'missing'} does not exist" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (looked for chromium, "
                                               "chromium-browser, google-chrome)")
def test_report_renders_in_chromium_without_errors(runs):
    page = runs["pp"] / "report.html"
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    problems = [line for line in proc.stderr.splitlines()
                if "CONSOLE" in line or "Failed to load resource" in line]
    assert not problems, problems
    assert '<section id="pipeline">' in proc.stdout and "<svg" in proc.stdout


# ---- exposed and overlapped time of non-blocking calls ------------------------------------


def test_requests_record_how_long_their_wait_blocked():
    comm = Comm.self_group("dp", Tracer(0, enabled=True))
    comm.allreduce(np.ones(4))
    recv = comm.irecv(np.empty(3), 0, tag=1)
    send = comm.isend(np.arange(3.0), 0, tag=1)
    wait_all([send, recv])
    polled = comm.iallreduce(np.ones(2))
    while not polled.test():
        pass
    blocking, *requests, polled_record = comm.tracer.records
    assert blocking.waited is None and blocking.exposed == blocking.duration
    for r in requests:
        assert 0.0 <= r.waited <= r.duration and r.exposed == r.waited, r
    assert polled_record.waited == 0.0, "test() never blocks: nothing exposed"
