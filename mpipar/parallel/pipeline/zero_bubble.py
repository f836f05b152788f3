"""The zero-bubble schedule ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023).

1F1B with each backward split into B (`BackwardInput`, the input gradient the previous stage
waits for) and W (`BackwardWeight`, the parameter gradients nobody waits for), and the W's
moved into the drain: per rank the compute order `zero_bubble_h1_order` (with the derivation
of its bubble, (p − 1)(F + B − W), and of its memory), and the messages around it
(`_messages_around`), placed with the help of the unit-time clock `_unit_end_times`.
`schedules.build_schedule("zb-h1", p, m)` builds it.
"""

from __future__ import annotations

from .instructions import (
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
)


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
    if p < 1 or m < 1:
        raise ValueError(f"a pipeline needs p >= 1 ranks and m >= 1 microbatches, got p={p}, "
                         f"m={m}")
    if m < p:
        raise ValueError(
            f"the zb-h1 schedule needs at least as many microbatches as pipeline ranks: "
            f"m={m} < p={p} (with fewer the pipe never fills and its bubble formula fails)"
        )
    orders = [zero_bubble_h1_order(r, p, m) for r in range(p)]
    return [_messages_around(r, p, orders) + [ReduceGrads(), OptimizerStep()]
            for r in range(p)]
