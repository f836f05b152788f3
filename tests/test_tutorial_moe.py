"""Chapter 8b (``tutorials/08b_mixture_of_experts.md``): the numbers it states, against mpipar.

The chapter's commands and their ``expect`` lines run in ``test_tutorials.py``; here are the
numbers no command prints: the parameter count of the experts, the capacities, the ep and
edp groups, the aux loss's extremes and the all-to-all bytes derived from the drop count.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi_util import REPO

from mpipar.autograd import Tensor
from mpipar.model import GPT, GPTConfig
from mpipar.moe import MoE, capacity, route
from mpipar.parallel.expert_parallel import split_colors

CHAPTER = (REPO / "tutorials" / "08b_mixture_of_experts.md").read_text()
ANSWERS = CHAPTER[CHAPTER.index("## Check yourself"):]
TINY = dict(vocab_size=103, n_layer=4, n_head=4, d_model=64, seq_len=32)


def test_the_experts_parameter_count():
    dense = GPT(GPTConfig(**TINY)).num_parameters()
    moe = GPT(GPTConfig(**TINY, n_expert=4)).num_parameters()
    assert (dense, moe, moe - dense) == (208_704, 606_784, 398_080)
    for text in ("208,704", "606,784", "398,080", "33,088"):
        assert text in CHAPTER


def test_capacities():
    assert capacity(32, 4, 2, 1.25) == 20 and "= 20" in CHAPTER
    assert capacity(32, 4, 2, 2.0) == 32  # Try it 1: every token fits
    assert capacity(32, 8, 2, 1.5) == 12 and 8 * 12 == 96
    assert "**12**" in ANSWERS and "**96**" in ANSWERS


def test_ep_and_edp_groups_of_rank_5():
    dp, ep = 8, 4
    colors = {r: split_colors(r, ep) for r in range(dp)}
    ep_group = sorted(r for r in range(dp) if colors[r]["ep"][0] == colors[5]["ep"][0])
    edp_group = sorted(r for r in range(dp) if colors[r]["edp"][0] == colors[5]["edp"][0])
    assert ep_group == [4, 5, 6, 7] and edp_group == [1, 5] and colors[5]["ep"][1] == 1
    held = range(colors[5]["ep"][1] * 8 // ep, (colors[5]["ep"][1] + 1) * 8 // ep)
    assert list(held) == [2, 3]
    for text in ("**{4, 5, 6, 7}**", "**{1, 5}**", "**2 and 3**"):
        assert text in ANSWERS


@pytest.mark.parametrize("probs, value", [
    (np.full((4, 4), 0.25), 1.0),  # uniform
    (np.tile([1.0, 0.0, 0.0, 0.0], (4, 1)), 4.0),  # everything on expert 0
])
def test_aux_loss_extremes(probs, value):
    cfg = GPTConfig(**TINY, n_expert=4, moe_top_k=1)
    layer = MoE(cfg, np.float64, proj_std=0.02)
    r = route(probs, 1, 1, 4)
    assert float(layer.aux_loss(Tensor(probs), r, 1).data) == pytest.approx(value)
    assert "**1**" in ANSWERS and "**4**" in ANSWERS


def test_all_to_all_bytes_from_the_drop_count():
    """Step 0 of the tiny run drops 71 (an ``expect`` of the chapter pins it)."""
    assignments = 8 * 32 * 2 * 4  # sequences × tokens × K × layers
    rows = 2 * (assignments - 71) * 64 * 8
    counts = 2 * 4 * 4 * 8  # ranks × layers × E int64
    assert (assignments, rows, rows + counts) == (2_048, 2_024_448, 2_024_704)
    assert "dropped 71$" in CHAPTER and "2,024,448" in CHAPTER and "**256**" in ANSWERS
