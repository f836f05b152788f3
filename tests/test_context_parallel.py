"""Context parallelism (``--cp``): the chunk layout, the grid, ring attention, equivalence.

* pure: which positions a cp rank holds, which block pairs attend (every causal pair
  exactly once), the rank layout and groups, the layout rules;
* one process: ring attention over a ring of one equals the fused causal attention, and
  its gradient passes a finite-difference check;
* ``cp_checks.py`` on 2 ranks: ring attention against the whole sequence, the trace's
  messages per layer, activation memory per rank;
* ``equivalence.py``: float64 losses, norms, parameters and AdamW state of cp2, cp2 × dp2,
  cp2 × tp2, cp2 × pp2 (and ZeRO) against the 1-process run, to 1e-10;
* ``train.py``: bad combinations exit 2 quoting the numbers.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import TINY_ARGS, describe_run
from mpi_util import equivalence_checks, parse_verdict, run_mpi_ok, script

from mpipar import fused
from mpipar.autograd import Tensor
from mpipar.comm import Comm
from mpipar.grid import grid_coords, layout_problems, rank_coords, split_colors
from mpipar.parallel.context_parallel import (
    ContextParallel,
    block_pairs,
    chunk_positions,
    ring_messages,
)
from mpipar.trace import Tracer

# ---- pure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_chunks_cover_the_sequence_once(cp):
    t = 2 * cp * 3
    held = np.concatenate([chunk_positions(t, cp, r, np) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(t))
    assert chunk_positions(8, 2, 0, np).tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 2, 1, np).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_block_pairs_cover_causal_attention_once(cp):
    """Over all (query rank, key rank) pairs, every (query, key) with key ≤ query once, and
    every rank computes the same number of chunk pairs (the load balance)."""
    n = 3
    seen = Counter2D(2 * cp * n)
    work = []
    for qr, kr in itertools.product(range(cp), repeat=2):
        qpos = chunk_positions(2 * cp * n, cp, qr, np).reshape(2, n)
        kpos = chunk_positions(2 * cp * n, cp, kr, np).reshape(2, n)
        for a, b, diagonal in block_pairs(qr, kr, cp):
            for i, j in itertools.product(range(n), repeat=2):
                if not diagonal or j <= i:
                    seen.add(qpos[a, i], kpos[b, j])
    for qr in range(cp):
        work.append(sum(1 for kr in range(cp) for _ in block_pairs(qr, kr, cp)))
    causal = np.tril(np.ones((2 * cp * n,) * 2, dtype=int))
    assert np.array_equal(seen.counts, causal)
    assert len(set(work)) == 1, f"unbalanced block pairs per rank: {work}"


class Counter2D:
    def __init__(self, t: int) -> None:
        self.counts = np.zeros((t, t), dtype=int)

    def add(self, q: int, k: int) -> None:
        assert k <= q, f"key {k} after query {q}"
        self.counts[q, k] += 1


def test_rank_layout_tp_fastest_then_cp_dp_pp():
    d, t, p, c = 2, 2, 2, 2
    for r in range(d * t * p * c):
        pp, dp, cp, tp = grid_coords(r, d, t, p, c)
        assert (tp, cp, dp, pp) == (r % t, (r // t) % c, (r // (t * c)) % d, r // (t * c * d))
        pp1, dp1, tp1 = rank_coords(r % (d * t * p), d, t, p)
        assert grid_coords(r % (d * t * p), d, t, p) == (pp1, dp1, 0, tp1)
    groups: dict[str, dict] = {}
    for r in range(d * t * p * c):
        for kind, (color, key) in split_colors(r, d, t, p, c).items():
            groups.setdefault(kind, {}).setdefault(color, []).append((key, r))
    members = {k: sorted(sorted(r for _, r in sorted(g)) for g in v.values())
               for k, v in groups.items() if k != "embed"}
    assert members["tp"][0] == [0, 1] and members["cp"][0] == [0, 2]
    assert members["dp"][0] == [0, 4] and members["pp"][0] == [0, 8]
    assert members["dpcp"][0] == [0, 2, 4, 6]
    assert split_colors(5, 2, 2, 2) == split_colors(5, 2, 2, 2, 1)  # cp = 1: unchanged


def test_layout_rules_quote_the_numbers():
    base = dict(batch_size=8, microbatches=1, n_layer=4, n_head=4, d_model=64)
    assert layout_problems(4, 1, 1, 2, cp=2, seq_len=32, **base) == []
    problems = layout_problems(4, 1, 1, 1, cp=2, seq_len=30, sequence_parallel=True, **base)
    assert problems == [
        "world size 4 != --dp 1 × --tp 1 × --pp 1 × --cp 2 = 2",
        "--cp 2 needs --seq-len 30 divisible by 2 × --cp = 4 (each rank holds two of 2·cp "
        "equal chunks)",
        "--cp 2 does not combine with --sequence-parallel (both split the sequence; use one "
        "of them)"]


def test_message_counts():
    assert ring_messages(1) == {"forward": 0, "backward": 2}
    assert ring_messages(4) == {"forward": 6, "backward": 14}


# ---- one process: a ring of one ------------------------------------------------------------


def test_ring_of_one_equals_causal_attention_and_gradchecks():
    context = ContextParallel(Comm.self_group("cp", Tracer(0)))
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 6, 3 * 2 * 3))
    dy = rng.standard_normal((2, 6, 2 * 3))
    a, b = Tensor(qkv, requires_grad=True), Tensor(qkv.copy(), requires_grad=True)
    y_ring, y_ref = context.attention(a, 2), fused.CausalAttention.apply(b, n_head=2)
    np.testing.assert_allclose(y_ring.data, y_ref.data, rtol=1e-12, atol=1e-14)
    (y_ring * Tensor(dy)).sum().backward()
    (y_ref * Tensor(dy)).sum().backward()
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    eps, numeric = 1e-6, np.zeros_like(qkv)
    for i in np.ndindex(qkv.shape):
        plus, minus = qkv.copy(), qkv.copy()
        plus[i] += eps
        minus[i] -= eps
        numeric[i] = ((context.attention(Tensor(plus), 2).data * dy).sum()
                      - (context.attention(Tensor(minus), 2).data * dy).sum()) / (2 * eps)
    np.testing.assert_allclose(a.grad, numeric, rtol=1e-6, atol=1e-8)


# ---- multi-process -------------------------------------------------------------------------


def test_ring_attention_trace_and_memory_on_two_ranks():
    proc = run_mpi_ok(2, [script("cp_checks.py")], timeout=120)
    failures = [m for msgs in parse_verdict(proc).values() for m in msgs]
    assert failures == [], "\n".join(failures)
    figures = json.loads(next(line for line in proc.stdout.splitlines()
                              if line.startswith("FIGURES "))[len("FIGURES "):])
    assert figures["cp messages per layer"] == {"forward": 2, "backward": 6}


LAYOUTS = {
    2: [{"name": "cp2", "cp": 2, "train": {"microbatches": 2}},
        {"name": "cp2 zero1", "cp": 2, "train": {"zero": 1}}],
    4: [{"name": "cp4", "cp": 4},
        {"name": "cp2 dp2", "cp": 2, "dp": 2, "train": {"microbatches": 2}},
        {"name": "cp2 dp2 zero3", "cp": 2, "dp": 2, "train": {"zero": 3}},
        {"name": "cp2 tp2", "cp": 2, "tp": 2},
        {"name": "cp2 pp2", "cp": 2, "pp": 2, "train": {"microbatches": 2}},
        {"name": "cp2 pp2 zb-h1", "cp": 2, "pp": 2,
         "train": {"microbatches": 2, "schedule": "zb-h1"}}],
}


@pytest.mark.parametrize("n", [2, 4])
def test_float64_matches_one_process(n):
    spec = {"steps": 3, "layouts": LAYOUTS[n]}
    verdict = parse_verdict(run_mpi_ok(n, [script("equivalence.py"), json.dumps(spec)],
                                       timeout=150))
    names = [check for layout in spec["layouts"] for check in equivalence_checks(layout)]
    assert sorted(verdict) == sorted(names), sorted(verdict)
    failures = [msg for msgs in verdict.values() for msg in msgs]
    assert failures == [], "\n".join(failures)


@pytest.mark.parametrize("flags, message", [
    (["--cp", "2", "--seq-len", "30"],
     "--cp 2 needs --seq-len 30 divisible by 2 × --cp = 4"),
    (["--cp", "2", "--dp", "2"], "world size 2 != --dp 2 × --tp 1 × --pp 1 × --cp 2 = 4"),
    (["--cp", "2", "--dropout", "0.1"], "--cp 2 does not combine with --dropout 0.1"),
])
def test_bad_configurations_exit_2(run_train, flags, message):
    proc = run_train([*TINY_ARGS, *flags], n=2, timeout=120)
    assert proc.returncode == 2, describe_run(proc)
    assert message in proc.stderr, describe_run(proc)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
