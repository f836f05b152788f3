"""The instruction set of a pipeline schedule.

A schedule is data: one list of instructions per pipeline rank. The same lists are printed
(`format_schedule`), checked and simulated (`checker`), drawn (`timeline`) and executed by the
MPI executor, which keeps one dispatch table from instruction class to handler.

Layout of the model (Megatron's interleaving). With p pipeline ranks and v chunks per rank the
layers are cut into p·v consecutive pieces, the *virtual stages* 0 .. p·v−1. Rank r holds the
chunks c = 0 .. v−1, and chunk c on rank r is virtual stage

    s = c·p + r.

A microbatch's forward runs through s = 0, 1, ..., p·v−1, so it goes round the ring of ranks v
times: from rank p−1 chunk c it goes on to rank 0 chunk c+1. Its backward runs the other way.
Virtual stage 0 reads the microbatch from the data; virtual stage p·v−1 computes the loss and
starts the backward from it. Schedules without interleaving have v = 1, so s = r.

Meaning of the fields of the point-to-point instructions:

- ``mb``: the microbatch the message belongs to.
- ``chunk``: the *local* chunk index, on the rank that executes the instruction, that the data
  belongs to. For a send it is the chunk that produced the data (an activation leaving chunk c,
  or the gradient with respect to chunk c's input). For a receive it is the chunk that will
  consume the data (the activation that chunk c will take as input, or the gradient with respect
  to chunk c's output). The two sides of one message can name different chunks: rank p−1's
  ``SendActivation(mb, chunk=c, peer=0)`` is received on rank 0 as
  ``RecvActivation(mb, chunk=c+1, peer=p−1)``.
- ``peer``: the pipeline-parallel rank (0 .. p−1, a rank of the pp communicator) on the other
  side of the message.

Communication is modelled as *synchronous*: a send completes only once the matching receive has
been posted (rendezvous), which is what MPI does for large messages. Messages between two ranks
are matched in order within one channel (source, destination, kind); an executor gets exactly
this by using the class's ``tag`` as the MPI tag. The checker proves that a schedule completes
under these rules; it then also completes where MPI buffers small messages, since buffering
only removes waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

TAG_ACTIVATION = 1
TAG_GRAD = 2


def virtual_stage(rank: int, chunk: int, num_ranks: int) -> int:
    """Virtual stage s = chunk·p + rank held by `chunk` of pipeline rank `rank`."""
    return chunk * num_ranks + rank


def stage_location(stage: int, num_ranks: int) -> tuple[int, int]:
    """Inverse of `virtual_stage`: the (rank, chunk) that holds virtual stage `stage`."""
    chunk, rank = divmod(stage, num_ranks)
    return rank, chunk


def is_first_stage(rank: int, chunk: int) -> bool:
    """True for virtual stage 0, which takes its input from the data instead of a peer."""
    return rank == 0 and chunk == 0


def is_last_stage(rank: int, chunk: int, num_ranks: int, num_chunks: int) -> bool:
    """True for virtual stage p·v−1, which computes the loss and starts the backward."""
    return rank == num_ranks - 1 and chunk == num_chunks - 1


class Instruction:
    """Base class of everything a schedule can tell a rank to do."""

    __slots__ = ()


@dataclass(frozen=True, repr=False)
class Compute(Instruction):
    """Common fields of the four local compute instructions: microbatch `mb` on chunk `chunk`."""

    mb: int
    chunk: int = 0

    short: ClassVar[str]  # F, B, BI or W

    def __str__(self) -> str:
        return f"{self.short}(mb={self.mb}, chunk={self.chunk})"

    __repr__ = __str__


@dataclass(frozen=True, repr=False)
class Forward(Compute):
    """Run chunk `chunk`'s layers forward on microbatch `mb`. Local, does not block.

    The input is the batch (virtual stage 0) or the activation received earlier by a
    `RecvActivation` with the same (mb, chunk). The chunk's input and the activations its backward
    needs are stashed under (mb, chunk) until `Backward`. On the last virtual stage the forward
    also computes the microbatch's loss.
    """

    short = "F"


@dataclass(frozen=True, repr=False)
class Backward(Compute):
    """Backpropagate microbatch `mb` through chunk `chunk`. Local, does not block.

    The upstream gradient dL/d(output) is the one received by a `RecvGrad` with the same
    (mb, chunk), or, on the last virtual stage, comes from the loss. Parameter gradients are
    accumulated (+=) over microbatches; dL/d(input) is kept for a `SendGrad`. The stash made by
    `Forward(mb, chunk)` is freed.
    """

    short = "B"


@dataclass(frozen=True, repr=False)
class BackwardInput(Compute):
    """The first half of a split backward (zero bubble's "B"). Local, does not block.

    Computes dL/d(input of chunk) only, the gradient the previous stage waits for, and keeps it
    for a `SendGrad`; every parameter gradient is left for `BackwardWeight` (mb, chunk), with
    what it needs (for a Linear: its input x and dL/dy) kept from the forward's stash.
    """

    short = "BI"


@dataclass(frozen=True, repr=False)
class BackwardWeight(Compute):
    """The second half of a split backward (zero bubble's "W"). Local, does not block.

    Computes the parameter gradients of microbatch `mb` on chunk `chunk` that
    `BackwardInput` deferred (for a Linear dW = dYᵀ·X, db = Σ dY) and accumulates them (+=).
    Nothing waits for it before the end of the step, so a schedule can put it in a bubble.
    Frees what was kept for it: the microbatch's stash is gone only now.
    """

    short = "W"


COMPUTE_KINDS = (Forward, Backward, BackwardInput, BackwardWeight)


@dataclass(frozen=True, repr=False)
class PointToPoint(Instruction):
    """Common fields of the four point-to-point messages (see the module docstring)."""

    mb: int
    chunk: int
    peer: int

    is_send: ClassVar[bool]
    kind: ClassVar[str]  # "activation" or "grad"
    tag: ClassVar[int]  # MPI tag; one per kind keeps each channel's messages in order
    short: ClassVar[str]

    def __str__(self) -> str:
        arrow = "->" if self.is_send else "<-"
        return f"{self.short}(mb={self.mb}, chunk={self.chunk} {arrow} rank {self.peer})"

    __repr__ = __str__


@dataclass(frozen=True, repr=False)
class SendActivation(PointToPoint):
    """Send the output activation of `chunk` for `mb` to rank `peer`, the next virtual stage.

    Blocks until `peer` has posted the matching `RecvActivation` (synchronous send).
    """

    is_send = True
    kind = "activation"
    tag = TAG_ACTIVATION
    short = "SendAct"


@dataclass(frozen=True, repr=False)
class RecvActivation(PointToPoint):
    """Receive from rank `peer` the input activation that `chunk` will consume for `mb`.

    Blocks until the message has arrived.
    """

    is_send = False
    kind = "activation"
    tag = TAG_ACTIVATION
    short = "RecvAct"


@dataclass(frozen=True, repr=False)
class SendGrad(PointToPoint):
    """Send dL/d(input of `chunk`) for `mb` to rank `peer`, the previous virtual stage.

    Blocks until `peer` has posted the matching `RecvGrad` (synchronous send).
    """

    is_send = True
    kind = "grad"
    tag = TAG_GRAD
    short = "SendGrad"


@dataclass(frozen=True, repr=False)
class RecvGrad(PointToPoint):
    """Receive from rank `peer` dL/d(output of `chunk`) for `mb`, for the `Backward`.

    Blocks until the message has arrived.
    """

    is_send = False
    kind = "grad"
    tag = TAG_GRAD
    short = "RecvGrad"


@dataclass(frozen=True, repr=False)
class SendRecv(Instruction):
    """One send and one receive posted together and waited for together: one ``MPI Sendrecv``.

    Blocks until both halves are done: the send's matching receive has been posted on
    ``send.peer`` and the message for ``recv`` has arrived from ``recv.peer``. The two peers may
    differ (a shift along the pipeline) or be the same rank (an exchange with one neighbour).

    Why it exists: in steady-state 1F1B, rank r sends an activation to r+1 just when r+1 sends
    a gradient to r. As two blocking sends each would wait for the other's receive forever;
    posted together as a Sendrecv on both sides, each side's send meets the other side's
    receive (crosswise) and both complete. Megatron calls the two sides
    ``send_forward_recv_backward`` and ``send_backward_recv_forward``.
    """

    send: SendActivation | SendGrad
    recv: RecvActivation | RecvGrad

    def __post_init__(self) -> None:
        if not (isinstance(self.send, PointToPoint) and self.send.is_send):
            raise TypeError(f"SendRecv.send must be SendActivation or SendGrad, got {self.send}")
        if not (isinstance(self.recv, PointToPoint) and not self.recv.is_send):
            raise TypeError(f"SendRecv.recv must be RecvActivation or RecvGrad, got {self.recv}")

    def __str__(self) -> str:
        return f"SendRecv({self.send}, {self.recv})"

    __repr__ = __str__


@dataclass(frozen=True, repr=False)
class ReduceGrads(Instruction):
    """End of the step: all-reduce gradients over data parallelism, and sum the tied embedding's
    gradient between the first and last pipeline ranks. A collective: blocks until every member
    of those groups has arrived. Comes after every rank's last pipeline message, so it cannot
    take part in a pipeline deadlock.
    """

    def __str__(self) -> str:
        return "ReduceGrads()"

    __repr__ = __str__


@dataclass(frozen=True, repr=False)
class OptimizerStep(Instruction):
    """Apply the optimizer to the (reduced) gradients and zero them. Local, does not block."""

    def __str__(self) -> str:
        return "OptimizerStep()"

    __repr__ = __str__


Schedule = list[list[Instruction]]


def message_parts(instr: Instruction) -> tuple[PointToPoint, ...]:
    """The point-to-point messages an instruction posts: one, two for a `SendRecv`, or none."""
    if isinstance(instr, SendRecv):
        return (instr.send, instr.recv)
    if isinstance(instr, PointToPoint):
        return (instr,)
    return ()
