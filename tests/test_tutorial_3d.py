"""Chapter 5 (``tutorials/05_3d_parallelism.md``): the numbers it states, against mpipar.

* the grid table and the Split table it pastes are what ``tutorials/examples/grid_layout.py``
  prints, and the groups that example's ``simulate_split`` makes from
  ``mpipar.grid.split_colors`` are the groups the definition gives (the ranks that differ in
  one coordinate only; a real 8-rank job is checked against the same definition by
  ``mpi_scripts/grid_checks.py``);
* the communication of one dp 2 × tp 2 × pp 2 step, derived per rank from chapters 2–4's
  formulas (:func:`expected_calls`), is what a real traced run records, rank by rank, and
  the chapter states those totals;
* the Check-yourself answers are computed here.

(The chapter's own commands, and their ``expect`` lines, run in ``test_tutorials.py``.)
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter

import pytest
from mpi_util import REPO, run_mpi_ok

from mpipar.grid import rank_coords, split_colors
from mpipar.model import PRESETS
from mpipar.parallel.pipeline.stages import stage_bounds
from mpipar.trace import load_jsonl

CHAPTER = REPO / "tutorials" / "05_3d_parallelism.md"
EXAMPLE = REPO / "tutorials" / "examples" / "grid_layout.py"
TINY = PRESETS["tiny"]
VOCAB = 103  # the built-in corpus's characters
DP, TP, PP, M = 2, 2, 2, 2  # the chapter's run
FLOAT32 = 4


def grid_layout():
    spec = importlib.util.spec_from_file_location("grid_layout", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chapter() -> str:
    return CHAPTER.read_text(encoding="utf-8")


def text_after(command: str) -> list[str]:
    """The lines of the ```text block that follows the ```sh block holding ``command``."""
    page = chapter()
    start = page.index(command + "\n```")
    block = re.search(r"```text\n(.*?)\n```", page[start:], re.DOTALL)
    assert block, f"no output block after {command!r}"
    return block.group(1).splitlines()


# ---- the grid and Split -----------------------------------------------------------------


def test_the_chapters_grid_table_is_what_the_example_prints(capsys, monkeypatch):
    ex = grid_layout()
    monkeypatch.setattr(sys, "argv", ["grid_layout.py", "--dp", "2", "--tp", "2", "--pp", "2"])
    assert ex.main() == 0
    printed = capsys.readouterr().out.splitlines()
    assert text_after("python tutorials/examples/grid_layout.py --dp 2 --tp 2 --pp 2") == printed
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--split"])
    assert ex.main() == 0
    printed = capsys.readouterr().out.splitlines()
    pasted = text_after("python tutorials/examples/grid_layout.py --dp 2 --tp 2 --pp 2 --split")
    assert pasted[0] == "..." and printed[-len(pasted) + 1:] == pasted[1:]


def defined_groups(dp: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Each kind's groups by definition: the ranks equal in the other two coordinates,
    ordered by the one that varies; embed: a pipeline group's first and last stage."""
    coords = {r: rank_coords(r, dp, tp, pp) for r in range(dp * tp * pp)}
    groups: dict[str, list[list[int]]] = {}
    for kind, axis in {"pp": 0, "dp": 1, "tp": 2}.items():
        found = set()
        for c in coords.values():
            same = [r for r, c2 in coords.items()
                    if all(c2[i] == c[i] for i in range(3) if i != axis)]
            found.add(tuple(sorted(same, key=lambda r: coords[r][axis])))
        groups[kind] = sorted(map(list, found))
    if pp > 1:
        groups["embed"] = sorted([g[0], g[-1]] for g in groups["pp"])
    return groups


@pytest.mark.parametrize("dp,tp,pp", [(2, 2, 2), (1, 2, 4), (4, 8, 2), (3, 1, 2), (2, 3, 1)])
def test_simulated_split_makes_the_defined_groups(dp, tp, pp):
    made = {kind: sorted(by_color.values())
            for kind, by_color in grid_layout().grid_groups(dp, tp, pp).items()}
    assert made == defined_groups(dp, tp, pp)


# ---- one step of dp 2 × tp 2 × pp 2, from the formulas ------------------------------------


def parameters_per_rank(stage: int, layers: int) -> int:
    """The numbers a rank of ``stage`` holds: per block 12d²/T + 7d/T split and 6d whole; the
    first stage adds its rows of the padded token table and the position table, the last its
    rows of the token table (the tied head) and the final LayerNorm."""
    d, t = TINY["d_model"], TP
    padded = -(-VOCAB // t) * t
    numbers = layers * (12 * d * d // t + 7 * d // t + 6 * d)
    if stage == 0:
        numbers += padded // t * d + TINY["seq_len"] * d
    if stage == PP - 1:
        numbers += padded // t * d + 2 * d
    return numbers


def expected_calls(rank: int) -> Counter:
    """(group, phase) → calls and (group, phase, "bytes") → bytes one rank makes in a step.

    tp: per microbatch 2 all-reduces per block each way, plus the embedding's g (first stage,
    forward), the head's f (last stage, backward) and the loss's max and sum (last stage,
    forward, b·T and 2·b·T numbers); pp: one message sent per microbatch, an activation
    forward from every stage but the last, a gradient backward from every stage but the
    first; embed: the tied table's gradient once; dp: the whole gradient once; world: the
    gradient norm.
    """
    stage = rank_coords(rank, DP, TP, PP)[0]
    lo, hi = stage_bounds(TINY["n_layer"], PP)[stage]
    layers = hi - lo
    b = TINY["batch_size"] // (DP * M)
    act = b * TINY["seq_len"] * TINY["d_model"] * FLOAT32
    first, last = stage == 0, stage == PP - 1
    c: Counter = Counter()

    def add(group: str, phase: str, calls: int, nbytes: int) -> None:
        c[group, phase] += calls
        c[group, phase, "bytes"] += nbytes

    positions = b * TINY["seq_len"]
    add("tp", "forward", M * (2 * layers + first), M * (2 * layers + first) * act)
    if last:
        add("tp", "forward", 2 * M, M * 3 * positions * FLOAT32)
    add("tp", "backward", M * (2 * layers + last), M * (2 * layers + last) * act)
    if not last:
        add("pp", "forward", M, M * act)
    if not first:
        add("pp", "backward", M, M * act)
    padded = -(-VOCAB // TP) * TP
    add("embed", "backward", 1, padded // TP * TINY["d_model"] * FLOAT32)
    add("dp", "backward", 1, parameters_per_rank(stage, layers) * FLOAT32)
    add("world", "optimizer", 1, 8)
    return c


def traced_calls(records, rank: int) -> Counter:
    """The same counts from a rank's trace records of the training phases; pp counts the
    calls that send (``send`` and ``sendrecv``), one per message."""
    c: Counter = Counter()
    for r in records:
        if r.rank != rank or r.op == "compute" or r.phase not in ("forward", "backward",
                                                                   "optimizer"):
            continue
        if r.group == "pp" and r.op not in ("send", "sendrecv"):
            continue
        c[r.group, r.phase] += 1
        c[r.group, r.phase, "bytes"] += r.nbytes
    return c


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> list:
    path = tmp_path_factory.mktemp("3d") / "3d.jsonl"
    run_mpi_ok(DP * TP * PP, [
        REPO / "train.py", "--preset", "tiny", "--dp", DP, "--tp", TP, "--pp", PP,
        "--microbatches", M, "--steps", 1, "--eval-every", 0, "--eval-tokens", 256, "--quiet",
        "--trace", path], timeout=120)
    return load_jsonl(str(path))


@pytest.mark.parametrize("rank", range(DP * TP * PP))
def test_one_step_communicates_what_the_formulas_say(trace, rank):
    expected, traced = expected_calls(rank), traced_calls(trace, rank)
    differ = {k: (expected.get(k), traced.get(k)) for k in set(expected) | set(traced)
              if expected.get(k) != traced.get(k)}
    assert not differ, f"rank {rank}: formula and trace differ, (formula, trace): {differ}"


def job_totals() -> Counter:
    total: Counter = Counter()
    for rank in range(DP * TP * PP):
        total.update(expected_calls(rank))
    return total


def test_the_chapter_states_the_formulas_totals():
    total = job_totals()
    section = chapter().split("## 3. One step on 8 ranks")[1].split("## 4.")[0]
    stated = [
        f"**{total['tp', 'forward']}**", f"**{total['tp', 'forward', 'bytes']:,}**",
        f"**{total['tp', 'backward']}**", f"**{total['tp', 'backward', 'bytes']:,}**",
        f"**{total['dp', 'backward', 'bytes']:,}**", f"**{total['embed', 'backward', 'bytes']:,}**",
        f"{parameters_per_rank(0, 2) * FLOAT32:,} bytes",
        f"{parameters_per_rank(1, 2) * FLOAT32:,}",
        f"{total['pp', 'forward'] + total['pp', 'backward']} messages of "
        f"{total['pp', 'forward', 'bytes'] // total['pp', 'forward']:,} bytes",
    ]
    for text in stated:
        assert text in section, f"section 3 does not state {text}"


# ---- Check yourself -----------------------------------------------------------------------


def check_yourself_answers() -> list[str]:
    """The answers as Check yourself must write them: rank 37 of dp 4 × tp 8 × pp 2 (its
    coordinates, its dp group, its tp and pp colors and keys), the dp bytes of both stages,
    and the tp all-reduces per microbatch of a last-stage rank."""
    coords = rank_coords(37, 4, 8, 2)
    colors = split_colors(37, 4, 8, 2)
    dp_group = grid_layout().grid_groups(4, 8, 2)["dp"][colors["dp"][0]]
    tp_calls = sum(expected_calls(DP * TP * PP - 1)["tp", phase]
                   for phase in ("forward", "backward"))
    return [
        f"**{coords}**",
        "**{" + ", ".join(map(str, dp_group)) + "}**",
        f"**{colors['tp']}**",
        f"**{colors['pp']}**",
        f"**{parameters_per_rank(0, 2) * FLOAT32:,}**",
        f"**{parameters_per_rank(1, 2) * FLOAT32:,}**",
        f"**{tp_calls // M}m**",
    ]


def test_check_yourself_answers_are_what_mpipar_computes():
    tail = chapter()[chapter().index("## Check yourself"):]
    for answer in check_yourself_answers():
        assert answer in tail, f"Check yourself does not give the answer {answer}"
