"""Chapter 8 (``tutorials/08_context_parallel.md``): the numbers it states, against mpipar.

* the trace table it pastes: messages per layer from `ring_messages`, bytes from the shape of
  a K block, for the tiny preset on two ranks;
* the chunk table of §4 and the Check-yourself answers, from `chunk_positions`,
  `block_pairs` and `ring_messages`.

(The chapter's commands, and their ``expect`` lines, run in ``test_tutorials.py``.)
"""

from __future__ import annotations

import re

import numpy as np
from mpi_util import REPO

from mpipar.model import PRESETS
from mpipar.parallel.context_parallel import block_pairs, chunk_positions, ring_messages

CHAPTER = REPO / "tutorials" / "08_context_parallel.md"
TINY = PRESETS["tiny"]


def chapter() -> str:
    return CHAPTER.read_text(encoding="utf-8")


def answer(n: int) -> str:
    """The text of the n-th ``<details>`` block (1-based) under Check yourself."""
    part = chapter().split("## Check yourself", 1)[1]
    return re.findall(r"<details>(.*?)</details>", part, re.DOTALL)[n - 1]


def test_trace_table_is_the_theory():
    c, layers, ranks = 2, TINY["n_layer"], 2
    block = TINY["batch_size"] * (TINY["seq_len"] // c) * TINY["d_model"] * 8
    assert block == 65_536 and "65,536 bytes" in chapter()
    for phase, per_layer in ring_messages(c).items():
        calls = layers * per_layer * ranks
        for op in ("isend", "irecv"):
            row = rf"^cp +{op} +{phase} +{calls} +\S+ MiB +{calls * block:,} "
            assert re.search(row, chapter(), re.MULTILINE), row


def test_chunk_table():
    rows = {r: chunk_positions(32, 2, r, np).tolist() for r in range(2)}
    assert rows == {0: [*range(0, 8), *range(24, 32)], 1: list(range(8, 24))}
    assert "cp rank        0    |    1    |    1     |    0" in chapter()


def test_check_yourself_answers():
    layers, c = TINY["n_layer"], 4
    fwd, bwd = (layers * ring_messages(c)[p] for p in ("forward", "backward"))
    assert (fwd, bwd) == (24, 56)
    text = answer(1)
    assert f"= {fwd}" in text and f"= {bwd}" in text and f"{fwd + bwd} in all" in text
    mine = chunk_positions(32, 4, 1, np).tolist()
    assert mine == [4, 5, 6, 7, 24, 25, 26, 27] and "4–7 and 24–27" in answer(2)
    # Without the two chunks: rank C−1 against rank 0, in units of n² pairs (n → ∞).
    contiguous = [(r + 0.5) for r in range(c)]  # r full blocks and one half diagonal
    assert contiguous[-1] / contiguous[0] == 7 and "ratio is 7" in answer(4)
    work = {sum(len(block_pairs(q, k, c)) for k in range(c)) for q in range(c)}
    assert len(work) == 1  # with the two chunks every rank computes as many pairs
