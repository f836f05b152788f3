"""Pipeline instructions as values, and schedules as text: how instructions print, where a
chunk's virtual stage sits, ``format_schedule`` and ``render_text`` of simulated and measured
timelines. Pure Python, no MPI.
"""

from __future__ import annotations

import dataclasses

import pytest

from mpipar.parallel.pipeline import (
    TAG_ACTIVATION,
    TAG_GRAD,
    Backward,
    Forward,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    SendRecv,
    as_timeline,
    format_schedule,
    interleaved_one_f_one_b,
    one_f_one_b,
    render_text,
    simulate,
    stage_location,
    virtual_stage,
)

EXACT = 1e-12  # simulated and measured times here are sums of exact binary fractions


# ---------------------------------------------------------------------------------------------
# Instructions, printing and drawing


def test_instructions_print_short_and_are_frozen() -> None:
    assert str(Forward(3, 0)) == "F(mb=3, chunk=0)"
    assert repr(Backward(3, 1)) == "B(mb=3, chunk=1)"
    assert str(SendActivation(3, 0, 2)) == "SendAct(mb=3, chunk=0 -> rank 2)"
    assert str(RecvGrad(0, 0, 2)) == "RecvGrad(mb=0, chunk=0 <- rank 2)"
    pair = SendRecv(SendGrad(1, 0, 0), RecvActivation(2, 0, 0))
    assert repr([pair]) == (
        "[SendRecv(SendGrad(mb=1, chunk=0 -> rank 0), RecvAct(mb=2, chunk=0 <- rank 0))]"
    )
    assert (SendActivation.tag, RecvActivation.tag) == (TAG_ACTIVATION, TAG_ACTIVATION)
    assert (SendGrad.tag, RecvGrad.tag) == (TAG_GRAD, TAG_GRAD)
    assert SendActivation(1, 0, 1) != RecvActivation(1, 0, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Forward(0).mb = 1  # type: ignore[misc]
    with pytest.raises(TypeError, match="SendRecv.send must be"):
        SendRecv(RecvGrad(0, 0, 1), RecvActivation(0, 0, 1))  # type: ignore[arg-type]


def test_virtual_stage_layout() -> None:
    """Chunk c of rank r is virtual stage c·p + r; rank p−1 chunk c feeds rank 0 chunk c+1."""
    p = 4
    assert [virtual_stage(r, 1, p) for r in range(p)] == [4, 5, 6, 7]
    assert stage_location(virtual_stage(3, 0, p) + 1, p) == (0, 1)
    assert all(stage_location(virtual_stage(r, c, p), p) == (r, c) for r in range(p)
               for c in range(3))
    # the ring wrap in an actual schedule: rank 3's chunk-0 output arrives as chunk 1's input
    schedule = interleaved_one_f_one_b(4, 4, 2)
    messages = [x.send if isinstance(x, SendRecv) else x for x in schedule[3]]
    assert SendActivation(0, 0, 0) in messages
    received = [x.recv if isinstance(x, SendRecv) else x for x in schedule[0]]
    assert RecvActivation(0, 1, 3) in received


def test_format_schedule_1f1b() -> None:
    assert format_schedule(one_f_one_b(4, 8), compute_only=True) == "\n".join([
        "rank 0: F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
        "rank 1: F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
        "rank 2: F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
        "rank 3: F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
    ])
    text = format_schedule(one_f_one_b(2, 2))
    print(text)
    assert text == "\n".join([
        "rank 0 (9 instructions):",
        "  0  F(mb=0, chunk=0)",
        "  1  SendAct(mb=0, chunk=0 -> rank 1)",
        "  2  F(mb=1, chunk=0)",
        "  3  SendRecv(SendAct(mb=1, chunk=0 -> rank 1), RecvGrad(mb=0, chunk=0 <- rank 1))",
        "  4  B(mb=0, chunk=0)",
        "  5  RecvGrad(mb=1, chunk=0 <- rank 1)",
        "  6  B(mb=1, chunk=0)",
        "  7  ReduceGrads()",
        "  8  OptimizerStep()",
        "rank 1 (9 instructions):",
        "  0  RecvAct(mb=0, chunk=0 <- rank 0)",
        "  1  F(mb=0, chunk=0)",
        "  2  B(mb=0, chunk=0)",
        "  3  SendRecv(SendGrad(mb=0, chunk=0 -> rank 0), RecvAct(mb=1, chunk=0 <- rank 0))",
        "  4  F(mb=1, chunk=0)",
        "  5  B(mb=1, chunk=0)",
        "  6  SendGrad(mb=1, chunk=0 -> rank 0)",
        "  7  ReduceGrads()",
        "  8  OptimizerStep()",
    ])
    assert format_schedule(interleaved_one_f_one_b(2, 2, 2), compute_only=True).splitlines()[0] \
        == "rank 0: F0c0 F1c0 F0c1 F1c1 B0c1 B1c1 B0c0 B1c0"


def test_render_text_1f1b() -> None:
    text = render_text(simulate(one_f_one_b(2, 3)), width=12)
    print(text)
    assert text.splitlines()[:2] == ["rank 0 |AB..aaCbb.cc|", "rank 1 |.AaaBbbCcc..|"]
    assert "makespan 12" in text.splitlines()[2]
    # scaled: 1F1B p=4 m=8 takes 3·(8 + 3) = 33 units; width 66 gives 2 columns per unit
    rows = render_text(simulate(one_f_one_b(4, 8)), width=66).splitlines()
    assert rows[0] == ("rank 0 |AABBCCDD............aaaaEEbbbbFFccccGGddddHHeeee..ffff..gggg"
                       "..hhhh|")
    assert rows[3].startswith("rank 3 |......AAaaaaBB")
    assert all(len(row) == len(rows[0]) for row in rows[:4])


def test_render_text_interleaved_shows_chunks() -> None:
    # A chunk's forward takes 1/2, its backward 1; makespan 3(m + (p − 1)/v) = 7.5, so width 15
    # gives one column per half unit. Rank 0 runs all four forwards first (warmup capped at
    # m·v = 4), rank 1 warms up with 2 and then alternates.
    text = render_text(simulate(interleaved_one_f_one_b(2, 2, 2)), width=15)
    print(text)
    assert text.splitlines()[:4] == [
        "rank 0 |ABAB..aa.bbaabb|",
        " chunk |0011  11 110000|",
        "rank 1 |.ABAaaBbbaabb..|",
        " chunk | 001111110000  |",
    ]
    assert "digits below a rank: chunk" in text.splitlines()[4]


def test_render_text_accepts_a_measured_trace() -> None:
    """Plain tuples with wall-clock times, and kinds other than F/B, draw with the same code."""
    trace = [
        [(100.0, 101.0, "F", 0, 0), (101.0, 102.0, "comm", 0, 0), (102.0, 104.0, "B", 0, 0)],
        [(101.0, 102.0, "F", 0, 0), (102.0, 104.0, "B", 0, 0)],
    ]
    timeline = as_timeline(trace)
    assert timeline.makespan == 4.0
    assert timeline.bubble_fraction() == pytest.approx((1 / 4 + 1 / 4) / 2, abs=EXACT)
    rows = render_text(trace, width=8).splitlines()
    assert rows[0] == "rank 0 |AA~~aaaa|"
    assert rows[1] == "rank 1 |..AAaaaa|"
    assert "'~' other" in rows[2]
