"""Prove that a schedule runs: static checks of each rank's list, then a discrete-event
simulation of all ranks together with blocking communication.

Rules of the simulation (see `instructions`):
- Forward and Backward take forward_time/v and backward_time/v (a chunk is 1/v of a rank's
  layers) and never block. A split backward's halves take (backward_time − weight_time)/v
  (`BackwardInput`, B) and weight_time/v (`BackwardWeight`, W).
- A send is synchronous: it completes when the matching receive has been posted. A receive
  completes when the matching send has been posted. Both sides complete at
  max(time the send was posted, time the receive was posted) + comm_time.
- A `SendRecv` posts its two halves at once and completes when both have; each half is
  matched on its own, so a SendRecv on rank a and one on rank b meet crosswise (a's send with
  b's receive and b's send with a's receive).
- Messages match in order within a channel (source, destination, kind); the k-th send of a
  channel must be the message the k-th receive expects.
- ReduceGrads and OptimizerStep take no time here: they come after the pipeline's last message.
If at some point every unfinished rank waits on a message that is never posted, the schedule
deadlocks, and `ScheduleError` names the first rank that is stuck and what its peer is doing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .instructions import (
    COMPUTE_KINDS,
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    Instruction,
    OptimizerStep,
    PointToPoint,
    ReduceGrads,
    Schedule,
    SendRecv,
    is_first_stage,
    is_last_stage,
    message_parts,
    stage_location,
    virtual_stage,
)
from .timeline import BACKWARD, FORWARD, WEIGHT, Interval, Timeline


class ScheduleError(Exception):
    """A schedule that cannot run. `rank` and `index` locate the offending instruction (None
    when the problem is an instruction that is missing altogether)."""

    def __init__(self, message: str, rank: int | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.index = index


@dataclass(frozen=True)
class ScheduleReport:
    """What `check_schedule` proved and measured.

    bubble_fraction     simulated idle share of the step, averaged over ranks (forward 1,
                        backward 2 time units per microbatch and rank, of which a split
                        backward's B and W take 1 each; no communication cost)
    theoretical_bubble  the textbook value for the named schedule (None if no name was given)
    peak_inflight       per rank, the most (microbatch, chunk) pairs whose forward has run and
                        whose backward has not (for a split backward: whose W has not): how
                        many activation stashes the rank holds
    """

    num_ranks: int
    num_microbatches: int
    num_chunks: int
    makespan: float
    bubble_fraction: float
    theoretical_bubble: float | None
    peak_inflight: list[int]
    timeline: Timeline = field(repr=False)


_THEORY = {
    "naive": lambda p, m, v: (p - 1) / p,
    "gpipe": lambda p, m, v: (p - 1) / (m + p - 1),
    "1f1b": lambda p, m, v: (p - 1) / (m + p - 1),
    "interleaved": lambda p, m, v: (p - 1) / (v * m + p - 1),
}

# The most (microbatch, chunk) stashes rank r may hold, for the schedules that promise a bound
# (`check_schedule` enforces it): 1F1B's p − r; ZB-H1 promises 1F1B's peak over all ranks,
# rank 0's min(p, m), on every rank (its stash lives until W, see `zero_bubble_h1_order`).
_INFLIGHT_LIMIT = {
    "1f1b": lambda p, m, r: min(p - r, m),
    "zb-h1": lambda p, m, r: min(p, m),
}


def zero_bubble_h1_bubble(p: int, m: int, forward: float = 1.0, backward_input: float = 1.0,
                          weight: float = 1.0) -> float:
    """Idle share of a ZB-H1 step (Qi et al. 2023, section 3.1) with F, B, W per microbatch.

    Every rank computes m(F + B + W). In 1F1B each of the p − 1 fill-and-drain slots of a rank
    costs F + B + W (the whole backward is on the critical path). In ZB-H1 only B travels
    back along the pipeline, and each rank's deferred W's fill part of the drain, so a rank
    idles (p − 1)(F + B − W) (never less than 0):

        bubble = (p − 1)(F + B − W) / (m(F + B + W) + (p − 1)(F + B − W)).

    With F = B = W that is (p − 1)/(3m + p − 1): a third of 1F1B's idle time (p − 1)·3F.
    """
    idle = max((p - 1) * (forward + backward_input - weight), 0.0)
    return idle / (m * (forward + backward_input + weight) + idle)


def theoretical_bubble(name: str, p: int, m: int, v: int = 1) -> float:
    """Idle share of a step, idle / makespan, for schedule `name` when every stage takes the
    same time F forward and B backward per microbatch.

    gpipe, 1f1b:  makespan = (m + p − 1)(F + B). The last rank starts after the first
                  microbatch's p − 1 forwards above it, rank 0 ends p − 1 backwards after the
                  last rank, and in between the critical path runs m forwards and m backwards
                  back to back. Every rank computes m(F + B), so it idles (p − 1)(F + B) and
                  the fraction is (p − 1)/(m + p − 1), whatever the ratio of B to F.
    interleaved:  a chunk takes F/v and B/v, so the fill and drain shrink to (p − 1)(F + B)/v:
                  (p − 1)/(v·m + p − 1).
    naive:        only one rank computes at a time: (p − 1)/p.
    zb-h1:        the backward split into B and W of 1 unit each, forward 1 (the simulator's
                  default times): (p − 1)/(3m + p − 1), see `zero_bubble_h1_bubble`.
    """
    if name == "zb-h1":
        return zero_bubble_h1_bubble(p, m)
    if name not in _THEORY:
        raise ValueError(f"unknown schedule {name!r}; choose one of "
                         f"{', '.join([*_THEORY, 'zb-h1'])}")
    return _THEORY[name](p, m, v)


def _num_chunks(schedule: Schedule) -> int:
    chunks = [x.chunk for prog in schedule for x in prog if isinstance(x, COMPUTE_KINDS)]
    return max(chunks, default=0) + 1


def _num_microbatches(schedule: Schedule) -> int:
    mbs = [x.mb for prog in schedule for x in prog if isinstance(x, COMPUTE_KINDS)]
    return max(mbs, default=-1) + 1


def _neighbour(rank: int, chunk: int, step: int, p: int) -> tuple[int, int]:
    """(rank, chunk) of the virtual stage `step` (+1 or −1) away from chunk `chunk` of `rank`."""
    return stage_location(virtual_stage(rank, chunk, p) + step, p)


@dataclass
class _Books:
    """One rank's list so far: the index of the instruction that ran each (mb, chunk) forward,
    backward (or a split backward's B) and W, that sent and received each (kind, mb, chunk);
    microbatches in flight. ``split`` holds the (mb, chunk) whose backward was split."""

    rank: int
    p: int
    m: int
    v: int
    forwarded: dict[tuple[int, int], int] = field(default_factory=dict)
    backwarded: dict[tuple[int, int], int] = field(default_factory=dict)
    weighted: dict[tuple[int, int], int] = field(default_factory=dict)
    split: set[tuple[int, int]] = field(default_factory=set)
    received: dict[tuple[str, int, int], int] = field(default_factory=dict)
    sent: dict[tuple[str, int, int], int] = field(default_factory=dict)
    inflight: int = 0
    peak: int = 0

    def fail(self, i: int, instr: Instruction, why: str) -> ScheduleError:
        return ScheduleError(f"rank {self.rank}, instruction {i}: {instr} {why}", self.rank, i)


def _check_program(rank: int, program: list[Instruction], p: int, m: int, v: int) -> int:
    """Check one rank's list on its own; return its peak number of microbatches in flight.

    Each (mb, chunk) must run forward and backward exactly once, backward after forward (a
    split backward: B after the forward, W after B, each once); a
    forward needs its input received before it (except on virtual stage 0), a backward its
    output-gradient (except on the last virtual stage); what is sent must have been computed,
    must go to the neighbouring virtual stage's rank, and must be sent exactly once.
    """
    books = _Books(rank, p, m, v)
    n = len(program)
    if n < 2 or not isinstance(program[-2], ReduceGrads) or not isinstance(program[-1],
                                                                             OptimizerStep):
        raise ScheduleError(f"rank {rank}: the list must end with ReduceGrads(), "
                            "OptimizerStep()", rank, None)
    for i, instr in enumerate(program):
        if isinstance(instr, BackwardWeight):
            _check_weight(books, i, instr)
        elif isinstance(instr, COMPUTE_KINDS):
            _check_compute(books, i, instr)
        elif message_parts(instr):
            for part in message_parts(instr):
                _check_message(books, i, instr, part)
        elif isinstance(instr, (ReduceGrads, OptimizerStep)):  # the trainer's, at the very end
            if i != n - (2 if isinstance(instr, ReduceGrads) else 1):
                raise books.fail(i, instr, "comes before the end of the list")
        else:
            raise books.fail(i, instr, "is not a pipeline instruction")
    _check_all_done(books, program)
    return books.peak


def _check_compute(books: _Books, i: int, instr: Forward | Backward | BackwardInput) -> None:
    """Static checks of a Forward or Backward at index i, then note that it ran."""
    rank, p, m, v = books.rank, books.p, books.m, books.v
    if not (0 <= instr.mb < m and 0 <= instr.chunk < v):
        raise books.fail(i, instr, f"is out of range (m={m} microbatches, v={v} chunks)")
    key = (instr.mb, instr.chunk)
    if isinstance(instr, Forward):
        if key in books.forwarded:
            first = books.forwarded[key]
            raise books.fail(i, instr, f"runs a second time (first at instruction {first})")
        if not is_first_stage(rank, instr.chunk) and ("activation", *key) not in books.received:
            src = _neighbour(rank, instr.chunk, -1, p)[0]
            raise books.fail(i, instr, f"has no input: no RecvAct(mb={instr.mb}, "
                             f"chunk={instr.chunk} <- rank {src}) before it")
        books.forwarded[key] = i
        books.inflight += 1
        books.peak = max(books.peak, books.inflight)
        return
    if key not in books.forwarded:
        raise books.fail(i, instr, f"comes before its forward F(mb={instr.mb}, "
                         f"chunk={instr.chunk})")
    if key in books.backwarded:
        first = books.backwarded[key]
        raise books.fail(i, instr, f"runs a second time (first at instruction {first})")
    if not is_last_stage(rank, instr.chunk, p, v) and ("grad", *key) not in books.received:
        src = _neighbour(rank, instr.chunk, +1, p)[0]
        raise books.fail(i, instr, f"has no output gradient: no RecvGrad(mb={instr.mb}, "
                         f"chunk={instr.chunk} <- rank {src}) before it")
    books.backwarded[key] = i
    if isinstance(instr, BackwardInput):
        books.split.add(key)  # the stash stays until its W
    else:
        books.inflight -= 1


def _check_weight(books: _Books, i: int, instr: BackwardWeight) -> None:
    """W(mb, chunk) needs its B (a `BackwardInput`) before it, and runs once."""
    key = (instr.mb, instr.chunk)
    if not (0 <= instr.mb < books.m and 0 <= instr.chunk < books.v):
        raise books.fail(i, instr, f"is out of range (m={books.m} microbatches, v={books.v} "
                         "chunks)")
    if key not in books.split:
        raise books.fail(i, instr, f"comes before its input-gradient half BI(mb={instr.mb}, "
                         f"chunk={instr.chunk}): nothing has been kept for it yet")
    if key in books.weighted:
        first = books.weighted[key]
        raise books.fail(i, instr, f"runs a second time (first at instruction {first})")
    books.weighted[key] = i
    books.inflight -= 1


def _check_all_done(books: _Books, program: list[Instruction]) -> None:
    """After the whole list: every (mb, chunk) ran both ways and sent what it produced."""
    rank, p, v = books.rank, books.p, books.v
    for mb in range(books.m):
        for chunk in range(v):
            for done, name in ((books.forwarded, "F"), (books.backwarded, "B")):
                if (mb, chunk) not in done:
                    raise ScheduleError(f"rank {rank}: {name}(mb={mb}, chunk={chunk}) never runs",
                                        rank, None)
            if (mb, chunk) in books.split and (mb, chunk) not in books.weighted:
                raise ScheduleError(f"rank {rank}: W(mb={mb}, chunk={chunk}) never runs: its "
                                    "parameter gradients would be missing", rank, None)
            if not is_last_stage(rank, chunk, p, v) and ("activation", mb, chunk) not in books.sent:
                i = books.forwarded[(mb, chunk)]
                raise books.fail(i, program[i], "produces an activation that is never sent")
            if not is_first_stage(rank, chunk) and ("grad", mb, chunk) not in books.sent:
                i = books.backwarded[(mb, chunk)]
                raise books.fail(i, program[i], "produces a gradient that is never sent")


def _check_message(books: _Books, i: int, instr: Instruction, part: PointToPoint) -> None:
    """Static checks of one message of instruction i (a half of it for a SendRecv)."""
    rank, p, m, v = books.rank, books.p, books.m, books.v
    where = f"rank {rank}, instruction {i}: {instr}"
    if isinstance(instr, SendRecv):
        where += f": its {part}"
    if not (0 <= part.mb < m and 0 <= part.chunk < v and 0 <= part.peer < p):
        raise ScheduleError(f"{where} is out of range (p={p}, m={m}, v={v})", rank, i)
    key = (part.kind, part.mb, part.chunk)
    # Activations travel to virtual stage s+1, gradients to s−1.
    step = +1 if part.kind == "activation" else -1
    if not part.is_send:
        step = -step
    has_peer = not (
        (step == +1 and is_last_stage(rank, part.chunk, p, v))
        or (step == -1 and is_first_stage(rank, part.chunk))
    )
    if not has_peer:
        raise ScheduleError(f"{where} has no neighbouring stage to talk to", rank, i)
    expected = _neighbour(rank, part.chunk, step, p)[0]
    if part.peer != expected:
        raise ScheduleError(f"{where} names the wrong peer: the neighbouring virtual stage "
                            f"is on rank {expected}", rank, i)
    book = books.sent if part.is_send else books.received
    if key in book:
        raise ScheduleError(f"{where} repeats the message of instruction {book[key]}", rank, i)
    if part.is_send:
        done = books.forwarded if part.kind == "activation" else books.backwarded
        if (part.mb, part.chunk) not in done:
            what = "F" if part.kind == "activation" else "B"
            raise ScheduleError(f"{where} comes before {what}(mb={part.mb}, chunk={part.chunk}) "
                                "has produced it", rank, i)
    book[key] = i


_INTERVAL_KIND = {Forward: FORWARD, Backward: BACKWARD, BackwardInput: BACKWARD,
                  BackwardWeight: WEIGHT}


@dataclass
class _Posted:
    """A communication instruction a rank has reached and is blocked in."""

    index: int
    instr: Instruction
    time: float  # when the rank reached it
    open: list[PointToPoint]  # halves not matched yet
    done: float  # latest completion among the matched halves


class _Simulation:
    def __init__(self, schedule: Schedule, forward_time: float, backward_time: float,
                 comm_time: float, num_chunks: int, weight_time: float) -> None:
        self.schedule = schedule
        self.p = len(schedule)
        self.v = num_chunks
        self.cost = {Forward: forward_time / self.v, Backward: backward_time / self.v,
                     BackwardInput: (backward_time - weight_time) / self.v,
                     BackwardWeight: weight_time / self.v}
        self.comm_time = comm_time
        self.pc = [0] * self.p
        self.clock = [0.0] * self.p
        self.posted: list[_Posted | None] = [None] * self.p
        self.intervals: list[list[Interval]] = [[] for _ in range(self.p)]

    def run(self) -> Timeline:
        moved = True
        while moved:
            moved = False
            for r in range(self.p):
                moved |= self._advance(r)
        if any(x is not None for x in self.posted):
            raise self._deadlock()
        return Timeline(self.intervals, max(self.clock, default=0.0))

    def _advance(self, r: int) -> bool:
        """Run rank r until it blocks or ends; return whether anything happened."""
        moved = False
        program = self.schedule[r]
        while self.pc[r] < len(program):
            instr = program[self.pc[r]]
            parts = message_parts(instr)
            if not parts:
                if isinstance(instr, COMPUTE_KINDS):
                    start = self.clock[r]
                    self.clock[r] += self.cost[type(instr)]
                    kind = _INTERVAL_KIND[type(instr)]
                    self.intervals[r].append(
                        Interval(start, self.clock[r], kind, instr.mb, instr.chunk))
                self.pc[r] += 1
                moved = True
                continue
            post = self.posted[r]
            if post is None:
                post = _Posted(self.pc[r], instr, self.clock[r], list(parts), self.clock[r])
                self.posted[r] = post
                moved = True
            for part in list(post.open):
                moved |= self._match(r, part)
            if post.open:
                return moved
            self.clock[r] = post.done
            self.posted[r] = None
            self.pc[r] += 1
        return moved

    def _match(self, r: int, part: PointToPoint) -> bool:
        """Match half `part` of rank r's posted instruction with its peer's, if posted."""
        here = self.posted[r]
        assert here is not None
        if not 0 <= part.peer < self.p or part.peer == r:
            raise ScheduleError(f"rank {r}, instruction {here.index}: {here.instr} names peer "
                                f"{part.peer}, which is not another rank of the {self.p}",
                                r, here.index)
        there = self.posted[part.peer]
        if there is None:
            return False
        for other in there.open:
            if other.peer == r and other.kind == part.kind and other.is_send != part.is_send:
                break
        else:
            return False
        send, recv = (part, other) if part.is_send else (other, part)
        sender, receiver = (r, part.peer) if part.is_send else (part.peer, r)
        step = +1 if send.kind == "activation" else -1
        target = _neighbour(sender, send.chunk, step, self.p)
        if send.mb != recv.mb or target != (receiver, recv.chunk):
            s_post, r_post = (here, there) if part.is_send else (there, here)
            raise ScheduleError(
                f"rank {sender}, instruction {s_post.index}: {s_post.instr} is matched by "
                f"rank {receiver}, instruction {r_post.index}: {r_post.instr}, which expects "
                f"another message (the two ranks order their messages differently)",
                sender, s_post.index)
        t = max(here.time, there.time) + self.comm_time
        here.open.remove(part)
        there.open.remove(other)
        here.done = max(here.done, t)
        there.done = max(there.done, t)
        return True

    def _deadlock(self) -> ScheduleError:
        """Describe the first stuck rank, what its peer is doing, and any cycle of waits."""
        stuck = [r for r in range(self.p) if self.posted[r] is not None]
        first = stuck[0]
        post = self.posted[first]
        assert post is not None
        part = post.open[0]
        where = f"rank {first}, instruction {post.index}: {post.instr}"
        if isinstance(post.instr, SendRecv):
            where += f": its {part}"
        peer_post = self.posted[part.peer]
        if peer_post is None:
            peer = f"rank {part.peer} has finished its instructions"
        else:
            peer = f"rank {part.peer} is blocked at {peer_post.index}: {peer_post.instr}"
        # Follow "waits for" from the first stuck rank until a rank repeats (a cycle) or a
        # finished rank ends the chain.
        chain = [first]
        while True:
            waiting = self.posted[chain[-1]]
            if waiting is None:
                break
            nxt = waiting.open[0].peer
            if nxt in chain:
                cycle = chain[chain.index(nxt):] + [nxt]
                peer += " (deadlock, cycle of waits: " + " -> ".join(
                    f"rank {x}" for x in cycle) + ")"
                break
            chain.append(nxt)
        return ScheduleError(f"{where} never matched: {peer}", first, post.index)


def simulate(
    schedule: Schedule,
    forward_time: float = 1.0,
    backward_time: float = 2.0,
    comm_time: float = 0.0,
    num_chunks: int | None = None,
    weight_time: float | None = None,
) -> Timeline:
    """Run all ranks' lists together under the blocking rules of this module's docstring.

    `forward_time` and `backward_time` are the cost of one microbatch through all of a rank's
    layers; with v chunks per rank (`num_chunks`, inferred from the schedule if not given) each
    Forward/Backward costs 1/v of that. A split backward's W (`BackwardWeight`) takes
    `weight_time` (default half the backward) and its B the rest of `backward_time`.
    `comm_time` is added to every message. Returns the
    compute intervals per rank and the makespan; raises ScheduleError on a deadlock or on
    messages matched out of order.
    """
    v = _num_chunks(schedule) if num_chunks is None else num_chunks
    w = backward_time / 2 if weight_time is None else weight_time
    if not 0 <= w <= backward_time:
        raise ValueError(f"weight_time {w} must lie between 0 and backward_time {backward_time}")
    return _Simulation(schedule, forward_time, backward_time, comm_time, v, w).run()


def _check_stage_order(timeline: Timeline, p: int, v: int) -> None:
    """On the simulated clock, forward of mb on virtual stage s starts after it ended on s−1,
    backward on s after it ended on s+1 and after the forward on s, W after the B on s."""
    ends: dict[tuple[str, int, int], Interval] = {}
    where: dict[tuple[str, int, int], int] = {}
    for rank, row in enumerate(timeline.intervals):
        for iv in row:
            key = (iv.kind, iv.mb, virtual_stage(rank, iv.chunk, p))
            ends[key], where[key] = iv, rank
    for (kind, mb, s), iv in ends.items():
        before = {FORWARD: [(FORWARD, mb, s - 1)],
                  BACKWARD: [(BACKWARD, mb, s + 1), (FORWARD, mb, s)],
                  WEIGHT: [(BACKWARD, mb, s)]}[kind]
        for dep in before:
            if dep in ends and iv.start < ends[dep].end:
                raise ScheduleError(
                    f"rank {where[(kind, mb, s)]}: {kind}(mb={mb}, chunk={iv.chunk}) starts at "
                    f"{iv.start} before {dep[0]}(mb={mb}) on virtual stage {dep[2]} ends at "
                    f"{ends[dep].end}", where[(kind, mb, s)], None)


def check_schedule(
    schedule: Schedule,
    name: str | None = None,
    num_microbatches: int | None = None,
    num_chunks: int | None = None,
) -> ScheduleReport:
    """Prove that `schedule` runs, or raise ScheduleError naming the rank and instruction.

    Checks, in this order: each rank's list on its own (`_check_program`: every (mb, chunk)
    forward and backward exactly once, backward after forward, inputs received before use,
    sends after the compute that produces them and to the right neighbour, ReduceGrads and
    OptimizerStep last; W after its B); for 1F1B at most min(p − r, m) microbatches in
    flight on rank r, for ZB-H1 min(p, m); then the simulation (every send meets the receive
    of the same message, in the same order, and no cycle of waits); then stage order on the
    simulated clock.

    m and v are inferred from the largest microbatch and chunk index unless given; `name`
    (e.g. "1f1b") selects the theoretical bubble to report.
    """
    p = len(schedule)
    if p == 0:
        raise ScheduleError("the schedule has no ranks")
    m = _num_microbatches(schedule) if num_microbatches is None else num_microbatches
    v = _num_chunks(schedule) if num_chunks is None else num_chunks
    if m < 1:
        raise ScheduleError("the schedule runs no microbatch")
    peaks = [_check_program(rank, program, p, m, v) for rank, program in enumerate(schedule)]
    if name in _INFLIGHT_LIMIT:
        for rank, peak in enumerate(peaks):
            limit = _INFLIGHT_LIMIT[name](p, m, rank)
            if peak > limit:
                raise ScheduleError(f"rank {rank} holds {peak} microbatches' activations at "
                                    f"once; {name} promises at most {limit}", rank, None)
    timeline = simulate(schedule, num_chunks=v)
    _check_stage_order(timeline, p, v)
    return ScheduleReport(
        num_ranks=p,
        num_microbatches=m,
        num_chunks=v,
        makespan=timeline.makespan,
        bubble_fraction=timeline.bubble_fraction(),
        theoretical_bubble=None if name is None else theoretical_bubble(name, p, m, v),
        peak_inflight=peaks,
        timeline=timeline,
    )
