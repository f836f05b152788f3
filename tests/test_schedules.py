"""Pipeline schedules as data: every schedule passes the checker, keeps forward-before-backward
and stage order, has the memory and bubble the theory predicts; broken schedules are rejected
with a message that names the rank and the instruction. Pure Python, no MPI.

Bubble derivation tested below (forward F = 1, backward B = 2 per microbatch and stage): for
GPipe and 1F1B the makespan is (m + p − 1)(F + B) = 3(m + p − 1), every rank computes
m(F + B) = 3m, so the idle share is (p − 1)/(m + p − 1) on every rank. Simulated times are
sums of multiples of 1/v (exact in floating point for v = 1, 2; rounding of thirds stays near
1e-16), so the theory must hold to 1e-12.
"""

from __future__ import annotations

import pytest

from mpipar.parallel.pipeline import (
    Backward,
    Forward,
    Instruction,
    OptimizerStep,
    RecvActivation,
    ReduceGrads,
    Schedule,
    ScheduleError,
    SendActivation,
    SendRecv,
    build_schedule,
    check_schedule,
    gpipe,
    interleaved_one_f_one_b,
    interleaved_order,
    message_parts,
    naive,
    one_f_one_b,
    simulate,
    theoretical_bubble,
    virtual_stage,
)

EXACT = 1e-12  # simulated times carry at most rounding of 1/v; see the module docstring

PLAIN_CASES = [
    (name, p, m)
    for name in ("naive", "gpipe", "1f1b")
    for p in (1, 2, 3, 4)
    for m in (1, 2, 3, 4, 5, 7, 8)  # m < p, m = p, m not a multiple of p, m > p
]
INTERLEAVED_CASES = [(p, k * p, v) for p in (2, 3, 4) for k in (1, 2, 3) for v in (2, 3)]
ALL_CASES = [(name, p, m, 1) for name, p, m in PLAIN_CASES] + [
    ("interleaved", p, m, v) for p, m, v in INTERLEAVED_CASES
]


def _case_id(case: tuple) -> str:
    name, p, m, v = case
    return f"{name}-p{p}-m{m}-v{v}"


def _computes(program: list[Instruction]) -> list[Forward | Backward]:
    return [x for x in program if isinstance(x, (Forward, Backward))]


def _split_sendrecvs(program: list[Instruction]) -> list[Instruction]:
    """The same program with every SendRecv replaced by its blocking send, then its receive."""
    out: list[Instruction] = []
    for instr in program:
        out += [instr.send, instr.recv] if isinstance(instr, SendRecv) else [instr]
    return out


# ---------------------------------------------------------------------------------------------
# Every schedule is valid


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_checker_accepts_every_schedule(case: tuple) -> None:
    name, p, m, v = case
    schedule = build_schedule(name, p, m, v)
    report = check_schedule(schedule, name=name)
    assert (report.num_ranks, report.num_microbatches, report.num_chunks) == (p, m, v)
    for rank, program in enumerate(schedule):
        assert program[-2:] == [ReduceGrads(), OptimizerStep()], f"rank {rank} end of step"


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_forward_before_backward_exactly_once(case: tuple) -> None:
    name, p, m, v = case
    for rank, program in enumerate(build_schedule(name, p, m, v)):
        computes = _computes(program)
        forwards = [(x.mb, x.chunk) for x in computes if isinstance(x, Forward)]
        backwards = [(x.mb, x.chunk) for x in computes if isinstance(x, Backward)]
        expected = sorted((mb, c) for mb in range(m) for c in range(v))
        assert sorted(forwards) == expected, f"rank {rank}: forwards {forwards}"
        assert sorted(backwards) == expected, f"rank {rank}: backwards {backwards}"
        position = {(type(x), x.mb, x.chunk): i for i, x in enumerate(computes)}
        for mb, c in expected:
            assert position[(Forward, mb, c)] < position[(Backward, mb, c)], (
                f"rank {rank}: B(mb={mb}, chunk={c}) before its forward"
            )


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_stage_order_on_simulated_clock(case: tuple) -> None:
    """Forward of a microbatch on virtual stage s starts after it ended on s−1; backward on s
    starts after it ended on s+1 and after the forward on s."""
    name, p, m, v = case
    timeline = simulate(build_schedule(name, p, m, v))
    span: dict[tuple[str, int, int], tuple[float, float]] = {}
    for rank, row in enumerate(timeline.intervals):
        for iv in row:
            span[(iv.kind, iv.mb, virtual_stage(rank, iv.chunk, p))] = (iv.start, iv.end)
    last = p * v - 1
    assert len(span) == 2 * m * (last + 1)
    for mb in range(m):
        for s in range(1, last + 1):
            assert span[("F", mb, s)][0] >= span[("F", mb, s - 1)][1], f"F mb={mb} stage {s}"
        for s in range(last + 1):
            assert span[("B", mb, s)][0] >= span[("F", mb, s)][1], f"B before F mb={mb} s={s}"
            if s < last:
                assert span[("B", mb, s)][0] >= span[("B", mb, s + 1)][1], f"B mb={mb} s={s}"


def _peak_inflight(program: list[Instruction]) -> int:
    live = peak = 0
    for x in _computes(program):
        live += 1 if isinstance(x, Forward) else -1
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("p, m", [(p, m) for _, p, m in PLAIN_CASES if _ == "1f1b"])
def test_memory_1f1b_against_gpipe(p: int, m: int) -> None:
    """1F1B keeps at most p − r microbatches on rank r; GPipe keeps all m."""
    report_1f1b = check_schedule(one_f_one_b(p, m))
    report_gpipe = check_schedule(gpipe(p, m))
    for r in range(p):
        assert report_1f1b.peak_inflight[r] <= p - r
        assert report_1f1b.peak_inflight[r] == min(p - r, m)
        assert report_gpipe.peak_inflight[r] == m
    assert report_1f1b.peak_inflight == [_peak_inflight(x) for x in one_f_one_b(p, m)]
    assert report_gpipe.peak_inflight == [_peak_inflight(x) for x in gpipe(p, m)]


def test_1f1b_warmup_lengths() -> None:
    """Rank r of 1F1B starts with min(p − r − 1, m) forwards, then alternates F, B."""
    for p, m in [(4, 8), (4, 2), (3, 5)]:
        for r, program in enumerate(one_f_one_b(p, m)):
            kinds = "".join("F" if isinstance(x, Forward) else "B" for x in _computes(program))
            warmup = min(p - r - 1, m)
            steady = m - warmup
            assert kinds == "F" * warmup + "FB" * steady + "B" * warmup, f"p={p} m={m} r={r}"


# ---------------------------------------------------------------------------------------------
# Bubble


@pytest.mark.parametrize("name, p, m", [c for c in PLAIN_CASES if c[0] != "naive"])
def test_bubble_gpipe_1f1b_matches_theory(name: str, p: int, m: int) -> None:
    report = check_schedule(build_schedule(name, p, m), name=name)
    assert report.makespan == 3 * (m + p - 1)
    expected = (p - 1) / (m + p - 1)
    assert abs(report.bubble_fraction - expected) <= EXACT, (name, p, m, report.bubble_fraction)
    assert report.theoretical_bubble == pytest.approx(expected, abs=EXACT)


@pytest.mark.parametrize("p, m", [(p, m) for name, p, m in PLAIN_CASES if name == "naive"])
def test_bubble_naive(p: int, m: int) -> None:
    report = check_schedule(naive(p, m), name="naive")
    assert report.makespan == 3 * p * m
    assert abs(report.bubble_fraction - (p - 1) / p) <= EXACT
    assert report.theoretical_bubble == (p - 1) / p


@pytest.mark.parametrize("p, m, v", INTERLEAVED_CASES)
def test_interleaved_bubble_beats_1f1b(p: int, m: int, v: int) -> None:
    interleaved = check_schedule(interleaved_one_f_one_b(p, m, v), name="interleaved")
    plain = check_schedule(one_f_one_b(p, m), name="1f1b")
    assert interleaved.bubble_fraction < plain.bubble_fraction
    # In this model (equal chunks, free communication) Megatron's interleaved schedule reaches
    # its ideal bubble exactly: a chunk costs 1/v and 2/v, and the makespan is 3(m + (p − 1)/v).
    assert abs(interleaved.makespan - 3 * (m + (p - 1) / v)) <= EXACT * interleaved.makespan
    assert abs(interleaved.bubble_fraction - (p - 1) / (v * m + p - 1)) <= EXACT


def test_interleaved_warmup_and_memory() -> None:
    """Rank r warms up with 2(p − r − 1) + (v − 1)p forwards, then alternates F, B."""
    p, m, v = 4, 8, 2
    schedule = interleaved_one_f_one_b(p, m, v)
    for r, program in enumerate(schedule):
        kinds = "".join("F" if isinstance(x, Forward) else "B" for x in _computes(program))
        warmup = 2 * (p - r - 1) + (v - 1) * p
        steady = m * v - warmup
        assert kinds == "F" * warmup + "FB" * steady + "B" * warmup, f"rank {r}"
    report = check_schedule(schedule)
    assert report.peak_inflight == [11, 9, 7, 5]


def test_interleaved_order() -> None:
    assert interleaved_order(2, 4, 2, forward=True) == [
        (0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1),
    ]
    assert interleaved_order(2, 4, 2, forward=False) == [
        (0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0),
    ]


def test_theoretical_bubble_values() -> None:
    assert theoretical_bubble("naive", 4, 8) == 3 / 4
    assert theoretical_bubble("gpipe", 4, 8) == 3 / 11
    assert theoretical_bubble("1f1b", 4, 8) == 3 / 11
    assert theoretical_bubble("interleaved", 4, 8, 2) == 3 / 19
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        theoretical_bubble("zigzag", 4, 8)


def test_simulate_with_communication_cost() -> None:
    """Naive is strictly serial: each microbatch costs 3p compute plus 2(p − 1) messages."""
    p, m, c = 3, 2, 0.25
    timeline = simulate(naive(p, m), comm_time=c)
    assert timeline.makespan == m * (3 * p + 2 * (p - 1) * c)


# ---------------------------------------------------------------------------------------------
# Broken schedules are rejected, naming rank and instruction


def test_rejects_missing_recv() -> None:
    schedule = one_f_one_b(3, 4)
    assert schedule[1][0] == RecvActivation(0, 0, 0)
    del schedule[1][0]
    with pytest.raises(ScheduleError) as err:
        check_schedule(schedule)
    assert str(err.value).startswith(
        "rank 1, instruction 0: F(mb=0, chunk=0) has no input: "
        "no RecvAct(mb=0, chunk=0 <- rank 0) before it"
    )
    assert (err.value.rank, err.value.index) == (1, 0)


def test_rejects_two_blocking_sends_towards_each_other() -> None:
    """Steady 1F1B with plain blocking sends: each neighbour sends first, both wait forever."""
    schedule = [_split_sendrecvs(program) for program in one_f_one_b(2, 2)]
    with pytest.raises(ScheduleError) as err:
        check_schedule(schedule)
    assert str(err.value) == (
        "rank 0, instruction 3: SendAct(mb=1, chunk=0 -> rank 1) never matched: "
        "rank 1 is blocked at 3: SendGrad(mb=0, chunk=0 -> rank 0) "
        "(deadlock, cycle of waits: rank 0 -> rank 1 -> rank 0)"
    )
    assert (err.value.rank, err.value.index) == (0, 3)


def test_deadlock_report_follows_the_chain_of_waits() -> None:
    """Only ranks 1 and 2 deadlock; rank 0 is stuck behind them."""
    schedule = one_f_one_b(3, 3)
    schedule[1] = _split_sendrecvs(schedule[1])
    schedule[2] = _split_sendrecvs(schedule[2])
    with pytest.raises(ScheduleError, match=r"^rank 0, instruction \d+: .* never matched: "
                       r"rank 1 is blocked at \d+: SendAct\(mb=1, chunk=0 -> rank 2\) "
                       r"\(deadlock, cycle of waits: rank 1 -> rank 2 -> rank 1\)$"):
        check_schedule(schedule)


def test_rejects_sends_in_the_wrong_order() -> None:
    schedule = gpipe(2, 2)
    f0, send0, f1, send1 = schedule[0][:4]
    schedule[0][:4] = [f0, f1, send1, send0]
    with pytest.raises(ScheduleError) as err:
        check_schedule(schedule)
    assert str(err.value).startswith(
        "rank 0, instruction 2: SendAct(mb=1, chunk=0 -> rank 1) is matched by rank 1, "
        "instruction 0: RecvAct(mb=0, chunk=0 <- rank 0), which expects another message"
    )


def test_rejects_backward_before_forward() -> None:
    schedule = gpipe(2, 2)
    assert schedule[1][:3] == [RecvActivation(0, 0, 0), Forward(0), RecvActivation(1, 0, 0)]
    schedule[1][1] = Backward(0)
    with pytest.raises(ScheduleError) as err:
        check_schedule(schedule)
    assert str(err.value) == (
        "rank 1, instruction 1: B(mb=0, chunk=0) comes before its forward F(mb=0, chunk=0)"
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        # a send to the wrong neighbour
        (lambda s: s[0].__setitem__(1, SendActivation(0, 0, 2)),
         r"rank 0, instruction 1: SendAct\(mb=0, chunk=0 -> rank 2\) names the wrong peer"),
        # a forward run twice
        (lambda s: s[0].insert(2, Forward(0)),
         r"rank 0, instruction 2: F\(mb=0, chunk=0\) runs a second time"),
        # the step's end missing
        (lambda s: s[2].pop(), r"rank 2: the list must end with ReduceGrads\(\)"),
        # the last stage cannot send forward
        (lambda s: s[2].insert(2, SendActivation(0, 0, 0)),
         r"rank 2, instruction 2: SendAct\(mb=0, chunk=0 -> rank 0\) has no neighbouring"),
        # a microbatch dropped from the middle rank
        (lambda s: s.__setitem__(1, [x for x in s[1] if getattr(x, "mb", 0) != 1]),
         r"rank 1: F\(mb=1, chunk=0\) never runs"),
        # a gradient sent before the backward that computes it
        (lambda s: s[1].remove(Backward(1)),
         r"rank 1, instruction \d+: SendGrad\(mb=1, chunk=0 -> rank 0\) comes before "
         r"B\(mb=1, chunk=0\) has produced it"),
    ],
    ids=["wrong-peer", "twice", "no-end", "last-sends", "dropped-mb", "grad-early"],
)
def test_rejects_other_mistakes(edit, message: str) -> None:
    schedule = gpipe(3, 2)
    edit(schedule)
    with pytest.raises(ScheduleError, match=message):
        check_schedule(schedule, num_microbatches=2)


def _pair_by_neighbour(program: list[Instruction]) -> list[Instruction]:
    """Regroup each run of messages as in `one_f_one_b`: first the exchange with the next rank
    (send activation, receive gradient), then with the previous one (send gradient, receive
    activation), each a SendRecv where both halves exist."""
    out: list[Instruction] = []
    run: list = []
    for instr in program + [None]:  # None flushes the last run
        parts = message_parts(instr) if instr is not None else ()
        if parts:
            run += parts
            continue
        for downstream in (True, False):
            group = [x for x in run if (x.kind == "activation") == (x.is_send == downstream)]
            sends = [x for x in group if x.is_send]
            recvs = [x for x in group if not x.is_send]
            if sends and recvs:
                out.append(SendRecv(sends[0], recvs[0]))
            else:
                out += sends + recvs
        run = []
        if instr is not None:
            out.append(instr)
    return out


def test_interleaved_pairing_by_neighbour_deadlocks_round_the_ring() -> None:
    """Why the interleaved schedule pairs messages by channel: paired by neighbour, every rank
    first sends forward to the next and the ring of ranks closes into a cycle of waits."""
    schedule = [_pair_by_neighbour(x) for x in interleaved_one_f_one_b(3, 6, 2)]
    assert sum(isinstance(x, SendRecv) for x in schedule[0]) > 0
    with pytest.raises(ScheduleError, match=r"cycle of waits: rank 0 -> rank 1 -> rank 2 -> "
                       r"rank 0\)$"):
        check_schedule(schedule)
    # without the ring (one chunk per rank) the same regrouping is harmless
    check_schedule([_pair_by_neighbour(x) for x in one_f_one_b(3, 6)])


def test_simulate_names_a_finished_peer() -> None:
    schedule: Schedule = [
        [Forward(0), SendActivation(0, 0, 1), ReduceGrads(), OptimizerStep()],
        [ReduceGrads(), OptimizerStep()],
    ]
    with pytest.raises(ScheduleError, match=r"^rank 0, instruction 1: SendAct\(mb=0, chunk=0 "
                       r"-> rank 1\) never matched: rank 1 has finished its instructions$"):
        simulate(schedule)


# ---------------------------------------------------------------------------------------------
# Arguments


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="m=6 is not divisible by p=4"):
        interleaved_one_f_one_b(4, 6, 2)
    with pytest.raises(ValueError, match="needs v >= 2 chunks per rank, got v=1"):
        interleaved_one_f_one_b(4, 8, 1)
    with pytest.raises(ValueError, match="needs p >= 2 pipeline ranks, got p=1"):
        interleaved_one_f_one_b(1, 4, 2)
    with pytest.raises(ValueError, match="at least 1 microbatch, got m=0"):
        one_f_one_b(2, 0)
    with pytest.raises(ValueError, match="at least 1 rank, got p=0"):
        gpipe(0, 4)
    with pytest.raises(ValueError, match="'gpipe' runs one chunk per rank, got v=2"):
        build_schedule("gpipe", 2, 4, v=2)
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'; choose one of naive"):
        build_schedule("pipedream", 2, 4)
