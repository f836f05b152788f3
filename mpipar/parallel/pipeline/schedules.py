"""Pipeline schedules, each a small named function that returns data: one instruction list per
rank (see `instructions` for the layout of the model and the meaning of every field).

    naive                    one microbatch at a time, no overlap           bubble (p−1)/p
    gpipe                    all forwards, then all backwards               bubble (p−1)/(m+p−1)
    one_f_one_b              warmup / steady 1F1B / cooldown                bubble (p−1)/(m+p−1)
    interleaved_one_f_one_b  1F1B over v chunks per rank                    bubble (p−1)/(v·m+p−1)
    zero_bubble_h1           1F1B with the backward split into B and W      bubble (p−1)/(3m+p−1)
                             (Qi et al., "Zero Bubble Pipeline Parallelism", 2023; F = B = W)

GPipe and 1F1B have the same bubble; 1F1B's gain is memory: rank r never holds more than p − r
microbatches' activations, where GPipe holds all m (Narayanan et al., "PipeDream-Flush", 2021).
Interleaving shrinks the bubble by v at the price of v times more messages (Narayanan et al.,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", 2021).

Sends are synchronous (see `instructions`), so where two neighbours would send to each other at
the same moment the schedules post the send together with a receive as one `SendRecv`.
"""

from __future__ import annotations

from collections.abc import Callable

from .instructions import (
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    Instruction,
    OptimizerStep,
    PointToPoint,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    Schedule,
    SendActivation,
    SendGrad,
    SendRecv,
    is_first_stage,
    is_last_stage,
)

SCHEDULE_NAMES = ("naive", "gpipe", "1f1b", "interleaved", "zb-h1")


def _check_sizes(p: int, m: int) -> None:
    if p < 1:
        raise ValueError(f"a pipeline needs at least 1 rank, got p={p}")
    if m < 1:
        raise ValueError(f"a step needs at least 1 microbatch, got m={m}")


def _end_of_step() -> list[Instruction]:
    return [ReduceGrads(), OptimizerStep()]


# Helpers for the schedules without interleaving (one chunk per rank, so stage = rank). Each
# returns [] where the stage has no such neighbour: the first stage reads data and sends no
# gradient, the last stage starts the backward from its own loss and sends no activation.
# Names follow Megatron's p2p_communication.


def _recv_forward(r: int, p: int, mb: int) -> list[Instruction]:
    return [RecvActivation(mb, 0, r - 1)] if r > 0 else []


def _send_forward(r: int, p: int, mb: int) -> list[Instruction]:
    return [SendActivation(mb, 0, r + 1)] if r < p - 1 else []


def _recv_backward(r: int, p: int, mb: int) -> list[Instruction]:
    return [RecvGrad(mb, 0, r + 1)] if r < p - 1 else []


def _send_backward(r: int, p: int, mb: int) -> list[Instruction]:
    return [SendGrad(mb, 0, r - 1)] if r > 0 else []


def _send_forward_recv_backward(r: int, p: int, send_mb: int, recv_mb: int) -> list[Instruction]:
    # Pairs with rank r+1's _send_backward_recv_forward: each side's send meets the other's recv.
    if r == p - 1:
        return []
    return [SendRecv(SendActivation(send_mb, 0, r + 1), RecvGrad(recv_mb, 0, r + 1))]


def _send_backward_recv_forward(r: int, p: int, send_mb: int, recv_mb: int) -> list[Instruction]:
    if r == 0:
        return []
    return [SendRecv(SendGrad(send_mb, 0, r - 1), RecvActivation(recv_mb, 0, r - 1))]


def naive(p: int, m: int) -> Schedule:
    """One microbatch at a time: its forward through all p stages, then its backward through all
    p stages, and only then the next microbatch. No two ranks ever compute at once, so each rank
    idles (p−1)/p of the time. The baseline every other schedule improves on.
    """
    _check_sizes(p, m)
    schedule: Schedule = []
    for r in range(p):
        program: list[Instruction] = []
        for mb in range(m):
            program += _recv_forward(r, p, mb)
            program.append(Forward(mb))
            program += _send_forward(r, p, mb)
            program += _recv_backward(r, p, mb)
            program.append(Backward(mb))
            program += _send_backward(r, p, mb)
        schedule.append(program + _end_of_step())
    return schedule


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al., 2019): all m forwards, then all m backwards.

    Backwards run in reverse microbatch order m−1, ..., 0, as in the GPipe paper's figure: the
    last stage can start the backward of the microbatch whose forward it has just finished.
    Every rank holds the activations of all m microbatches at the turn (peak in-flight m).
    """
    _check_sizes(p, m)
    schedule: Schedule = []
    for r in range(p):
        program: list[Instruction] = []
        for mb in range(m):
            program += _recv_forward(r, p, mb)
            program.append(Forward(mb))
            program += _send_forward(r, p, mb)
        for mb in reversed(range(m)):
            program += _recv_backward(r, p, mb)
            program.append(Backward(mb))
            program += _send_backward(r, p, mb)
        schedule.append(program + _end_of_step())
    return schedule


def one_f_one_b(p: int, m: int) -> Schedule:
    """PipeDream-Flush / Megatron's non-interleaved 1F1B.

    Rank r runs three phases:
      warmup    num_warmup = min(p − r − 1, m) forwards, just enough to fill the pipe below it;
      steady    m − num_warmup rounds of one forward then one backward (hence "1F1B");
      cooldown  the num_warmup backwards still owed.
    A backward frees a microbatch's activations as soon as possible, so rank r holds at most
    p − r microbatches (min(p − r, m)), against m for GPipe; the bubble is the same.

    In the steady phase rank r sends forward to r+1 exactly while r+1 sends a gradient back, so
    the two sides are posted as `SendRecv` pairs (send activation + receive gradient on r, send
    gradient + receive activation on r+1).
    """
    _check_sizes(p, m)
    schedule: Schedule = []
    for r in range(p):
        num_warmup = min(p - r - 1, m)
        num_steady = m - num_warmup
        program: list[Instruction] = []
        for mb in range(num_warmup):
            program += _recv_forward(r, p, mb)
            program.append(Forward(mb))
            program += _send_forward(r, p, mb)
        if num_steady > 0:
            program += _recv_forward(r, p, num_warmup)
        for i in range(num_steady):
            forward_mb, backward_mb = num_warmup + i, i
            program.append(Forward(forward_mb))
            program += _send_forward_recv_backward(r, p, forward_mb, backward_mb)
            program.append(Backward(backward_mb))
            if i == num_steady - 1:  # nothing left to receive: the last forward is done
                program += _send_backward(r, p, backward_mb)
            else:
                program += _send_backward_recv_forward(r, p, backward_mb, forward_mb + 1)
        for mb in range(num_steady, m):
            program += _recv_backward(r, p, mb)
            program.append(Backward(mb))
            program += _send_backward(r, p, mb)
        schedule.append(program + _end_of_step())
    return schedule


def interleaved_order(p: int, m: int, v: int, forward: bool) -> list[tuple[int, int]]:
    """The (mb, chunk) order in which every rank runs its m·v forwards (or backwards).

    Microbatches go in groups of p: the group's p microbatches through chunk 0, then through
    chunk 1, ..., chunk v−1, then the next group. Backwards visit the chunks in reverse.
    The k-th entry is, with g, j = divmod(k, p·v):  mb = g·p + j mod p,
    chunk = j div p (forward) or v − 1 − j div p (backward).
    """
    order = []
    for k in range(m * v):
        group, j = divmod(k, p * v)
        chunk = j // p if forward else v - 1 - j // p
        order.append((group * p + j % p, chunk))
    return order


def _send_recv(send: PointToPoint | None, recv: PointToPoint | None) -> list[Instruction]:
    """Post `send` and `recv` together (a `SendRecv`), or alone when the other is missing."""
    if send is not None and recv is not None:
        return [SendRecv(send, recv)]  # type: ignore[arg-type]
    return [x for x in (send, recv) if x is not None]


def interleaved_one_f_one_b(p: int, m: int, v: int) -> Schedule:
    """Megatron's interleaved 1F1B: v chunks per rank (see `instructions` for the layout).

    Every rank runs its m·v forwards and m·v backwards in `interleaved_order`, in Megatron's
    three phases:
      warmup    num_warmup = min((p − r − 1)·2 + (v − 1)·p, m·v) forwards;
      steady    rounds of one forward then one backward;
      cooldown  the remaining backwards.
    The (v − 1)·p term fills the ring once for every extra chunk. The 2 per rank below: an
    activation takes one round to reach the next rank and its gradient one round to come back
    (rounds exchange only after their backward), so rank r must start its backwards two rounds
    after rank r+1. When m = p the cap makes the low ranks run all forwards first, like GPipe.

    Communication. After each round rank r exchanges with both neighbours: an activation goes to
    r+1 while one comes from r−1 (the forward channel), then a gradient goes to r−1 while one
    comes from r+1 (the backward channel). Each channel is one `SendRecv`: a shift along the
    ring of ranks, which also carries rank p−1's output to rank 0 for the next chunk. In warmup
    and steady state, round i of rank r meets round i+1 of rank r−1 and round i−1 of rank r+1 on
    both channels, so all ranks' exchanges fall into one consistent order and no cycle of waits
    can form; `check_schedule` proves each case, the capped warmup included. (Pairing with one
    neighbour at a time, as `one_f_one_b` does, would make the ranks wait round the ring.)

    The received data is always the input of the rank's next forward or the output-gradient of
    its next backward; nothing is received where that comes from the data or from the loss.
    """
    _check_sizes(p, m)
    if v < 2:
        raise ValueError(f"the interleaved schedule needs v >= 2 chunks per rank, got v={v}")
    if p < 2:
        raise ValueError(
            f"the interleaved schedule needs p >= 2 pipeline ranks, got p={p}: with one rank "
            "there is no bubble to shrink"
        )
    if m % p != 0:
        raise ValueError(
            f"the interleaved schedule needs the number of microbatches to be a multiple of the "
            f"pipeline size: m={m} is not divisible by p={p}"
        )
    forwards = interleaved_order(p, m, v, forward=True)
    backwards = interleaved_order(p, m, v, forward=False)
    return [_interleaved_program(r, p, m, v, forwards, backwards) for r in range(p)]


def _interleaved_program(
    r: int,
    p: int,
    m: int,
    v: int,
    forwards: list[tuple[int, int]],
    backwards: list[tuple[int, int]],
) -> list[Instruction]:
    """Rank r's instructions in `interleaved_one_f_one_b`."""
    total = m * v
    nxt, prv = (r + 1) % p, (r - 1) % p

    def recv_act(k: int) -> PointToPoint | None:
        """Receive the input of forward k, unless there is none or it is read from the data."""
        if k >= total or is_first_stage(r, forwards[k][1]):
            return None
        mb, chunk = forwards[k]
        return RecvActivation(mb, chunk, prv)

    def send_act(k: int) -> PointToPoint | None:
        mb, chunk = forwards[k]
        return None if is_last_stage(r, chunk, p, v) else SendActivation(mb, chunk, nxt)

    def recv_grad(k: int) -> PointToPoint | None:
        """Receive dL/d(output) for backward k, unless there is none or the loss gives it."""
        if k >= total or is_last_stage(r, backwards[k][1], p, v):
            return None
        mb, chunk = backwards[k]
        return RecvGrad(mb, chunk, nxt)

    def send_grad(k: int) -> PointToPoint | None:
        if k < 0:
            return None
        mb, chunk = backwards[k]
        return None if is_first_stage(r, chunk) else SendGrad(mb, chunk, prv)

    num_warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
    program = _send_recv(None, recv_act(0))
    # Warmup and steady rounds: round k runs forward k and, once warm, backward k − num_warmup.
    for k in range(total):
        program.append(Forward(*forwards[k]))
        b = k - num_warmup
        if b >= 0:
            program.append(Backward(*backwards[b]))
        program += _send_recv(send_act(k), recv_act(k + 1))
        if b >= -1 and num_warmup < total:  # the last warmup round fetches backward 0's grad
            program += _send_recv(send_grad(b), recv_grad(b + 1))
    if num_warmup == total:
        program += _send_recv(None, recv_grad(0))
    for b in range(total - num_warmup, total):
        program.append(Backward(*backwards[b]))
        program += _send_recv(send_grad(b), recv_grad(b + 1))
    return program + _end_of_step()


def zero_bubble_h1_order(r: int, p: int, m: int) -> list[Instruction]:
    """Rank r's compute order in ZB-H1 (Qi et al. 2023, section 3.1 and figure 3).

    The backward is split into B (dL/d(input), which rank r − 1 waits for) and W (the
    parameter gradients, which nobody waits for). With every pass taking one unit, F = B = W:

      warmup   p − r forwards (1F1B's p − r − 1 and the first steady one);
      B-F      r rounds of B then F, no W yet: each B reaches rank r − 1 one unit later than
               in 1F1B would allow (B alone, not B + W, is on the way back), so the ranks
               above start their backwards sooner;
      B-W-F    the steady rounds, one of each;
      cooldown B then W for the backwards still owed, then the r W's held back.

    Why it works. Rank r starts at time r and finishes its p − r warmup forwards at p. The
    first backward starts on rank p − 1 at p and reaches rank r at p + (p − 1 − r)·B, so rank
    r idles r + (p − 1 − r) = p − 1 units before it, and never again: in B-W-F rounds B(j) on
    rank r starts exactly when B(j) on r + 1 ends and the input of F arrives a unit early; in
    the cooldown the r held-back W's fill the unit each rank would wait for its next B, since
    rank r + 1 still runs one F per round while rank r has none left. Every rank computes
    3m units and idles p − 1, so the makespan is 3m + p − 1 against 1F1B's 3(m + p − 1): the
    bubble shrinks from (p − 1)(F + B + W) to (p − 1)(F + B − W), a third of it here.

    Memory. A microbatch's stash lives from its F until its W. Rank r holds the p − r warmup
    stashes plus one per B-F round, at most min(p, m): 1F1B's peak on rank 0, reached on every
    rank. That is the paper's bound, the peak over ranks of 1F1B, not 1F1B's p − r per rank.
    After a B only what W needs remains (each weight's input and output gradient).
    """
    order: list[Instruction] = []
    done = {"F": 0, "B": 0, "W": 0}
    kinds = {"F": Forward, "B": BackwardInput, "W": BackwardWeight}

    def run(*letters: str) -> None:
        for letter in letters:
            order.append(kinds[letter](done[letter]))
            done[letter] += 1

    num_warmup = min(p - r, m)
    run(*"F" * num_warmup)
    for _ in range(min(r, m - num_warmup)):
        run("B", "F")
    while done["F"] < m:
        run("B", "W", "F")
    while done["B"] < m:
        run("B", "W")
    while done["W"] < m:
        run("W")
    return order


def _unit_end_times(orders: list[list[Instruction]]) -> list[list[int]]:
    """When each compute step of `orders` (one chunk per rank) ends if every F, B and W takes
    one unit, messages take none, and a step starts once its rank is free and its input is
    there (F(mb) after F(mb) on the rank above, B(mb) after B(mb) on the rank below)."""
    p = len(orders)
    ends: list[list[int]] = [[] for _ in range(p)]
    made: dict[tuple[type, int, int], int] = {}  # (kind, mb, rank) -> end
    moved = True
    while moved:
        moved = False
        for r in range(p):
            while len(ends[r]) < len(orders[r]):
                instr = orders[r][len(ends[r])]
                need = {Forward: (Forward, r - 1), BackwardInput: (BackwardInput, r + 1)}
                kind, src = need.get(type(instr), (None, -1))
                ready = made.get((kind, instr.mb, src)) if 0 <= src < p else 0
                if ready is None:
                    break
                ends[r].append(max(ends[r][-1] if ends[r] else 0, ready) + 1)
                made[(type(instr), instr.mb, r)] = ends[r][-1]
                moved = True
    return ends


def _messages_around(r: int, p: int, orders: list[list[Instruction]]) -> list[Instruction]:
    """Rank r's compute order with its messages (stage = rank, one chunk).

    Before a compute step comes the receive it needs (F: activation from r − 1, B: gradient
    from r + 1), after it the send of what it made (F: activation to r + 1, B: gradient to
    r − 1); W neither receives nor sends. A send and the receive of the next F or B go out
    together as one `SendRecv` when both are with the same neighbour: that neighbour is then
    making the mirror exchange (F then B on rank r meets B then F on rank r + 1, as in 1F1B's
    steady state). The pair is posted after the W's in between that end, on the unit clock of
    `_unit_end_times`, before the neighbour has the data ready, so a W fills that wait instead
    of the rank blocking in the exchange. Otherwise each message is posted alone: the send at
    once (a rank upstream may be waiting for it), the receive just before the compute that
    needs it. A lone send never meets a lone send coming the other way: rank r − 1 sends
    activations alone only in its warmup, and rank r has received all of them before its
    first B. `check_schedule` proves each case.
    """
    order, ends = orders[r], _unit_end_times(orders)
    producer = {(type(x), x.mb, rank): t for rank, row in enumerate(orders)
                for x, t in zip(row, ends[rank], strict=True)}

    def recv_for(instr: Instruction) -> PointToPoint | None:
        if isinstance(instr, Forward) and r > 0:
            return RecvActivation(instr.mb, 0, r - 1)
        if isinstance(instr, BackwardInput) and r < p - 1:
            return RecvGrad(instr.mb, 0, r + 1)
        return None

    def send_after(instr: Instruction) -> PointToPoint | None:
        if isinstance(instr, Forward) and r < p - 1:
            return SendActivation(instr.mb, 0, r + 1)
        if isinstance(instr, BackwardInput) and r > 0:
            return SendGrad(instr.mb, 0, r - 1)
        return None

    program: list[Instruction] = []
    waiting: dict[int, SendRecv] = {}  # index in `order` -> exchange to post before it
    covered: set[int] = set()  # steps whose receive is part of an exchange
    for i, instr in enumerate(order):
        if i in waiting:
            program.append(waiting.pop(i))
        recv = recv_for(instr)
        if recv is not None and i not in covered:
            program.append(recv)
        program.append(instr)
        send = send_after(instr)
        if send is None:
            continue
        nxt = next((j for j in range(i + 1, len(order))
                    if not isinstance(order[j], BackwardWeight)), None)
        pair = recv_for(order[nxt]) if nxt is not None else None
        if pair is None or pair.peer != send.peer:
            program.append(send)
            continue
        kind = Forward if isinstance(pair, RecvActivation) else BackwardInput
        ready = producer[(kind, pair.mb, pair.peer)]
        # post it after the W's before the next F/B that end by the time the data is ready
        at = next((j for j in range(i + 1, nxt) if ends[r][j] > ready), nxt)
        waiting[at] = SendRecv(send, pair)  # type: ignore[arg-type]
        covered.add(nxt)
    return program


def zero_bubble_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): 1F1B with the backward
    split into B (`BackwardInput`) and W (`BackwardWeight`), and the W's moved to fill the
    drain. Compute order per rank: `zero_bubble_h1_order` (with the derivation of the bubble
    (p − 1)(F + B − W) and of the memory bound); messages: `_messages_around`.
    """
    _check_sizes(p, m)
    if m < p:
        raise ValueError(
            f"the zb-h1 schedule needs at least as many microbatches as pipeline ranks: "
            f"m={m} < p={p} (with fewer the pipe never fills and its bubble formula fails)"
        )
    orders = [zero_bubble_h1_order(r, p, m) for r in range(p)]
    return [_messages_around(r, p, orders) + _end_of_step() for r in range(p)]


_BUILDERS: dict[str, Callable[..., Schedule]] = {
    "naive": naive,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_one_f_one_b,
    "zb-h1": zero_bubble_h1,
}


def build_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The schedule called `name` (one of SCHEDULE_NAMES) for p ranks, m microbatches and v
    chunks per rank; v must be 1 except for "interleaved"."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if name == "interleaved":
        return interleaved_one_f_one_b(p, m, v)
    if v != 1:
        raise ValueError(
            f"schedule {name!r} runs one chunk per rank, got v={v} virtual stages "
            "(only 'interleaved' uses v > 1)"
        )
    return _BUILDERS[name](p, m)


_LETTER = {Forward: "F", Backward: "B", BackwardInput: "B", BackwardWeight: "W"}


def _compact(instr: Instruction, show_chunk: bool) -> str:
    letter = _LETTER[type(instr)]
    return f"{letter}{instr.mb}" + (f"c{instr.chunk}" if show_chunk else "")


def format_schedule(schedule: Schedule, compute_only: bool = False) -> str:
    """Print a schedule rank by rank.

    Default: every instruction on its own numbered line (the numbers are the indices the
    checker's error messages quote). With ``compute_only=True``: one line per rank with just
    the compute order, e.g. ``rank 0: F0 F1 F2 B0 F3 B1 ...`` (``F3c1`` = forward of
    microbatch 3 on chunk 1 when ranks hold several chunks; with a split backward ``B3`` is
    its input-gradient half and ``W3`` its weight-gradient half).
    """
    show_chunk = any(
        isinstance(x, tuple(_LETTER)) and x.chunk > 0 for program in schedule for x in program
    )
    lines = []
    for rank, program in enumerate(schedule):
        if compute_only:
            steps = [
                _compact(instr, show_chunk)
                for instr in program
                if isinstance(instr, tuple(_LETTER))
            ]
            lines.append(f"rank {rank}: " + " ".join(steps))
            continue
        lines.append(f"rank {rank} ({len(program)} instructions):")
        width = len(str(max(len(program) - 1, 0)))
        lines += [f"  {i:>{width}}  {instr}" for i, instr in enumerate(program)]
    return "\n".join(lines)
