"""ZeRO-3: sharded parameters gathered around each block, its optimizer, its traffic.

In this process, over a data-parallel group of one rank (``MPI.COMM_SELF``), where every
result can be compared with plain AdamW: the gather/prefetch/release order, the released
parameters, training equal to AdamW's, checkpoints through ``gathered``/``load``, the
layout rule that refuses ``--allreduce ring``.

With MPI: ``mpi_scripts/zero3_checks.py`` (traffic from the trace, checkpoints across
layouts, memory per rank) on 4 ranks, and serial equivalence of ZeRO-3 alone and with tp,
sequence parallelism, pp and recomputation in the equivalence launches of
``test_data_parallel.py``, ``test_tensor_parallel.py`` and ``test_pipeline.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_ARGS, TINY_TEXT
from mpi_util import assert_check_passed, parse_verdict, run_mpi_ok, script

from mpipar.comm import MPI, Comm
from mpipar.data import CharTokenizer, get_batch, make_dataset
from mpipar.grid import ConfigError, ProcessGrid, validate_layout
from mpipar.model import GPT, GPTConfig
from mpipar.optim import AdamW, clip_grad_norm
from mpipar.parallel.full_state import full_state, load_full_state
from mpipar.parallel.zero3 import ShardedBlock, ShardedParameters, Zero3AdamW

TOK = CharTokenizer.from_text(TINY_TEXT)
CFG = GPTConfig(vocab_size=TOK.vocab_size, n_layer=3, n_head=2, d_model=8, seq_len=8,
                dtype="float64")
DATA = make_dataset(TINY_TEXT, TOK, seq_len=CFG.seq_len)


def model(recompute: str = "none") -> GPT:
    m = GPT(CFG)
    m.initialize(5)
    m.set_recompute(recompute)
    return m


def sharded(m: GPT, prefetch: bool = True) -> tuple[ShardedParameters, Zero3AdamW]:
    s = ShardedParameters([m], Comm(MPI.COMM_SELF, "dp"), prefetch=prefetch)
    return s, Zero3AdamW(m.parameters(), s, lr=0.01, weight_decay=0.1)


def test_blocks_are_wrapped_and_keep_their_names():
    plain, m = model(), model()
    names = [n for n, _ in plain.named_parameters()]
    s, _ = sharded(m)
    assert all(isinstance(b, ShardedBlock) for b in m.blocks)
    assert [n for n, _ in m.named_parameters()] == names
    assert [len(u.params) for u in s.units] == [4, *[12] * CFG.n_layer]  # wte wpe ln_f; blocks


def test_released_parameters_are_nan_of_the_right_shape():
    m = model()
    shapes = [p.shape for p in m.blocks[0].parameters()]
    s, _ = sharded(m)
    block = m.blocks[0].parameters()
    assert [p.shape for p in block] == shapes
    assert all(np.isnan(p.data).all() and p.data.strides == (0,) * p.ndim for p in block)
    assert not any(np.isnan(p.data).any() for p in s.rest.params)  # kept whole
    with s.gathered():
        for p, q in zip(m.blocks[0].parameters(), model().blocks[0].parameters(), strict=True):
            np.testing.assert_array_equal(p.data, q.data)
    assert np.isnan(m.blocks[0].parameters()[0].data).all()


@pytest.mark.parametrize("prefetch", [True, False])
def test_each_block_is_gathered_before_use_and_the_next_one_prefetched(prefetch, monkeypatch):
    m = model()
    s, _ = sharded(m, prefetch)
    index = {id(u): i for i, u in enumerate(s.block_units)}
    events = []
    for name in ("_start_gather", "release"):
        original = getattr(s, name)

        def logged(unit, *args, _name=name, _original=original):
            events.append((_name, index.get(id(unit))))
            return _original(unit, *args)

        monkeypatch.setattr(s, name, logged)
    s.zero_grad()
    x, y = get_batch(DATA.train, 4, CFG.seq_len, 0, 0)
    loss = m(x, y)
    forward, events[:] = list(events), []
    loss.backward()
    start, release = "_start_gather", "release"
    if prefetch:  # block i + 1's all-gather starts before block i computes (and is released)
        assert forward == [(start, 0), (start, 1), (release, 0), (start, 2), (release, 1),
                           (release, 2)]
        assert events == [(start, 2), (start, 1), (release, 2), (start, 0), (release, 1),
                          (release, 0)]
    else:
        assert forward == [(start, 0), (release, 0), (start, 1), (release, 1), (start, 2),
                           (release, 2)]
        assert events == [(start, 2), (release, 2), (start, 1), (release, 1), (start, 0),
                          (release, 0)]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_training_on_one_rank_is_adamw(recompute):
    """Three steps with clipping: the shard equals AdamW's parameters and state to 1e-14."""
    ref, m = model(), model(recompute)
    adamw = AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)
    s, opt = sharded(m)
    for step in range(3):
        x, y = get_batch(DATA.train, 4, CFG.seq_len, 0, step)
        for p in ref.parameters():
            p.grad = None
        ref(x, y).backward()
        norm = clip_grad_norm(ref.parameters(), 0.5)
        adamw.step()
        opt.zero_grad()
        m(x, y).backward()
        s.finish()
        assert opt.grad_norm_sq(lambda p: True) == pytest.approx(norm ** 2, rel=1e-13)
        opt.clip(norm, 0.5)
        opt.step()
    with s.gathered():
        for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
            np.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-14, err_msg=name)
    theirs, ours = adamw.state_dict(), opt.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=0, atol=1e-14, err_msg=key)


def test_checkpoint_round_trip_through_the_shards():
    m, fresh = model(), model()
    fresh.initialize(99)  # other values, overwritten by the load
    s, opt = sharded(m)
    s2, opt2 = sharded(fresh)
    opt.zero_grad()
    x, y = get_batch(DATA.train, 4, CFG.seq_len, 0, 0)
    m(x, y).backward()
    s.finish()
    opt.step()
    state = full_state(m.parameters(), opt, ProcessGrid.single(), np.dtype("float64"))
    load_full_state(fresh.parameters(), opt2, *state)
    again = full_state(fresh.parameters(), opt2, ProcessGrid.single(), np.dtype("float64"))
    for saved, loaded in zip(state, again, strict=True):
        assert sorted(saved) == sorted(loaded)
        for key, value in saved.items():
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_memory_report_names_the_gather_buffers():
    m = model()
    _, opt = sharded(m)
    r = opt.memory_report()
    psi = sum(p.size for p in m.parameters())
    block = m.blocks[0].block.parameters()
    buffers = (2 * sum(p.size for p in block) + psi - CFG.n_layer * sum(p.size for p in block))
    assert r["params"] == psi and r["param_buffer_bytes"] == buffers * 8
    assert r["param_bytes"] == (psi + buffers) * 8  # one rank: the shard is everything
    assert r["optimizer_state_bytes"] == 2 * psi * 8 and r["grad_bytes"] == psi * 8


def test_ring_allreduce_is_refused_with_zero3():
    with pytest.raises(ConfigError, match=r"--zero 3 gathers parameters .* --allreduce ring"):
        validate_layout(2, 2, 1, 1, batch_size=8, microbatches=1, n_layer=2, n_head=2,
                        d_model=8, zero=3, allreduce="ring")
    validate_layout(2, 2, 1, 1, batch_size=8, microbatches=1, n_layer=2, n_head=2, d_model=8,
                    zero=2, allreduce="ring")


def test_cli_refuses_zero3_with_the_ring(run_train, tiny_data):
    proc = run_train([*TINY_ARGS, "--data", tiny_data, "--zero", "3", "--allreduce", "ring"])
    assert proc.returncode == 2, proc.stderr
    assert "--zero 3 gathers parameters" in proc.stderr and proc.stdout == ""


# ---- with MPI ------------------------------------------------------------------------------

ZERO3_CHECKS = [
    "zero3 traffic: calls, phases and bytes per step",
    "zero3 traffic: 3Ψ for the blocks and 2Ψ for the rest vs ZeRO-2's 2Ψ",
    "zero3 checkpoint zero3 -> zero1 ring", "zero3 checkpoint zero3 -> 1 process",
    "zero3 checkpoint zero2 -> zero3",
    "zero3 memory: 16Ψ/N and the gather buffers",
]


@pytest.fixture(scope="module")
def zero3_verdict() -> dict:
    return parse_verdict(run_mpi_ok(4, [script("zero3_checks.py")], timeout=150))


def test_every_zero3_check_ran(zero3_verdict):
    assert sorted(zero3_verdict) == sorted(ZERO3_CHECKS)


@pytest.mark.parametrize("name", ZERO3_CHECKS)
def test_zero3_check(zero3_verdict, name):
    assert_check_passed(zero3_verdict, name)
