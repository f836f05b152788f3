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
from .zero_bubble import zero_bubble_h1

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
