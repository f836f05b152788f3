"""The start-up agreement: ranks compare notes before the first message of a run.

A rank that finds a problem and exits on its own leaves every other rank waiting forever in
its first collective, with nothing printed. And ranks that quietly disagree, started with
other flags or having read other bytes from the same file name, train something else than
the user asked for, or hang later. So each rank first checks everything it can alone (its
flags, its copy of the data and the checkpoint), then all ranks meet once, in one small
collective that every rank reaches, whatever it found::

    reports = world.allgather_object(RankReport(status, message, config, contents))

From the same list every rank reaches the same :class:`Verdict` (:func:`judge`):

1. a rank failed: every rank exits 2, and rank 0 prints the failures, each prefixed by the
   ranks that saw it (one line as it is when every rank saw the same);
2. some ranks were asked for ``--help`` and others not: exit 2 (all of them: exit 0);
3. configurations differ: exit 2, naming only the settings that differ, per group of ranks;
4. a file's contents differ (a data file or checkpoint replaced while the ranks read it, or
   different copies on different machines): exit 2, naming the file;
5. otherwise the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpipar.comm import Comm
from mpipar.grid import config_differences

OK, ERROR, HELP = "ok", "error", "help"


@dataclass
class RankReport:
    """What one rank found on its own: its status and message, its configuration, and the
    SHA-256 of each input it read (by a label that names the file, e.g. ``--data x.txt``)."""

    status: str = OK
    message: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    contents: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """``exit_code`` None: go on; else exit with it, rank 0 printing ``message`` (if any)."""

    exit_code: int | None
    message: str = ""


def agree(world: Comm, report: RankReport) -> Verdict:
    """All-gather every rank's report (every rank must call this once) and judge them."""
    return judge(world.allgather_object(report))


def judge(reports: list[RankReport]) -> Verdict:
    """The verdict on all ranks' reports, the same on every rank (see the module docstring)."""
    failed = [(rank, r.message) for rank, r in enumerate(reports) if r.status == ERROR]
    if failed:
        return Verdict(2, failure_message(failed, len(reports)))
    helped = [rank for rank, r in enumerate(reports) if r.status == HELP]
    if helped:
        if len(helped) == len(reports):
            return Verdict(0)
        return Verdict(2, f"--help was given to {rank_list(helped)} only")
    differences = config_differences([r.config for r in reports])
    if differences is not None:
        return Verdict(2, differences)
    for label in sorted({label for r in reports for label in r.contents}):
        message = content_differences(label, [r.contents.get(label, "") for r in reports])
        if message is not None:
            return Verdict(2, message)
    return Verdict(None)


def rank_list(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def _groups(values: list[str]) -> dict[str, list[int]]:
    """Ranks by value, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    return groups


def failure_message(failed: list[tuple[int, str]], world_size: int) -> str:
    """The failures of ``failed`` ranks, one group per distinct message, prefixed by the
    ranks that report it; the bare message when every rank reports the same."""
    groups: dict[str, list[int]] = {}
    for rank, message in failed:
        groups.setdefault(message, []).append(rank)
    if len(groups) == 1 and len(failed) == world_size:
        return failed[0][1]
    return "\n".join(f"{rank_list(ranks)}: {message}" for message, ranks in groups.items())


def content_differences(label: str, digests: list[str]) -> str | None:
    """``None`` when every rank read the same bytes for ``label``, else one line naming it."""
    groups = _groups(digests)
    if len(groups) == 1:
        return None
    seen = "; ".join(f"{digest[:12] + '…' if digest else 'nothing'} on {rank_list(ranks)}"
                     for digest, ranks in groups.items())
    return (f"{label}: the ranks read different contents (SHA-256 {seen}); was it changed "
            "while the job started, or do the machines hold different copies?")
