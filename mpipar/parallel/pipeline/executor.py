"""Run a pipeline schedule: one handler per instruction class, explicit Send/Recv of activations.

The schedule (`schedules`) gives this rank a list of instructions; the executor walks it and
looks each instruction's class up in a dispatch table::

    Forward(mb, c)          run chunk c on microbatch mb; stash what its backward needs
    Backward(mb, c)         backpropagate dL/d(output) through chunk c; free the stash
    BackwardInput(mb, c)    the same for dL/d(input) only; parameter gradients wait for W
    BackwardWeight(mb, c)   the parameter gradients B left (`WeightGradients`); free the rest
    SendActivation(mb, c)   Send chunk c's output for mb to the next virtual stage
    RecvActivation(mb, c)   Recv the input of chunk c for mb from the previous virtual stage
    SendGrad(mb, c)         Send dL/d(input of chunk c) back to the previous virtual stage
    RecvGrad(mb, c)         Recv dL/d(output of chunk c) from the next virtual stage
    SendRecv(send, recv)    both halves in one Sendrecv (the schedule pairs them so that two
                            neighbours sending to each other cannot deadlock)

The last two instructions of every list, ReduceGrads and OptimizerStep, are carried out by
the trainer (`Trainer.finish_gradients`, which calls `sync_tied_grads`, then gradient
clipping and the optimizer), because clipping needs the global gradient norm of all ranks in
between; `train_step` runs the list up to them.

Evaluation and generation run a forward-only program (`forward_only_program`) through a
second table, in which ``Forward`` builds no graph and keeps nothing for a backward.

What travels. Between virtual stages flows the residual stream, an array of known shape
(mb, T / parts, d_model) and the model's dtype in both directions (activations forward,
their gradients backward); under sequence parallelism each tensor-parallel rank holds
T / tp positions of it (the batch's `SequenceLayout`, which the executor also hands every
chunk as the full length T). Both sides compute the shape from the microbatch, so a message
is one raw-buffer ``Send`` matched by one ``Recv`` into a preallocated buffer: no header, no
pickling. Each message carries its instruction's MPI tag (one per kind), so the messages of
a channel arrive in the order the schedule sent them. The dtype is the compute dtype (the
layers'): 16-bit under mixed precision, half the bytes of fp32.

Memory (`memory`). Receive buffers come from a pool and go back to it once their contents are
dead: an input activation after the backward of its microbatch (the autograd graph may have
saved it), an output gradient right after the backward that consumed it. A chunk's output is
needed only to be sent and to start the backward from (its graph and shape, not its values),
so after the send its array is replaced by a single element broadcast to the same shape
(Megatron's ``deallocate_output_tensor``). What a stash holds, the inputs plus every array
the graph saved for backward, is measured in bytes after each forward (`StashStats`): the
number GPipe and 1F1B differ by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from mpipar.autograd import Tensor, WeightGradients, defer_weight_grads, no_grad
from mpipar.backend import get_xp, to_numpy
from mpipar.grid import ProcessGrid
from mpipar.model import GPT
from mpipar.nn import DropoutKey
from mpipar.trace import Tracer

from .checker import ScheduleReport, check_schedule
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
    SendActivation,
    SendGrad,
    SendRecv,
    is_first_stage,
    is_last_stage,
    stage_location,
    virtual_stage,
)
from .measure import span_name
from .memory import BufferPool, Stash, StashStats, memory_ids
from .schedules import build_schedule

Dispatch = dict[type, Callable[[Any], None]]

def forward_only_program(r: int, p: int, m: int, v: int) -> list[Instruction]:
    """Rank r's instructions to run m microbatches forward only (evaluation, generation).

    Microbatch by microbatch, each through the virtual stages 0 .. p·v−1 in order: receive the
    input (except on stage 0), compute, send the output on (except from the last stage). With
    one chunk per rank this is GPipe's forward half, so rank 0 starts microbatch k+1 while k
    is further down; with several chunks a microbatch goes round the ring v times first.
    Every send finds its receive already posted or next in line, so blocking calls suffice.
    """
    program: list[Instruction] = []
    for mb in range(m):
        for c in range(v):
            s = virtual_stage(r, c, p)
            if not is_first_stage(r, c):
                program.append(RecvActivation(mb, c, stage_location(s - 1, p)[0]))
            program.append(Forward(mb, c))
            if not is_last_stage(r, c, p, v):
                program.append(SendActivation(mb, c, stage_location(s + 1, p)[0]))
    return program


class PipelineConfig(Protocol):
    """The fields of a training config the executor reads (`TrainConfig` has them)."""

    schedule: str  # "naive", "gpipe", "1f1b", "interleaved" or "zb-h1"
    microbatches: int  # M
    virtual_stages: int  # v, chunks per rank


class PipelineExecutor:
    """Runs this rank's part of a pipeline schedule on its model chunks.

    ``chunks[c]`` is virtual stage c·p + r (`stages.build_stage_chunks`); ``grid`` gives the
    pipeline communicator (ranks = stages) and the embedding group; ``tc`` the schedule name,
    microbatches and virtual stages. The schedule is built and proven deadlock-free by the
    checker (`check_schedule`) before anything runs; ``report`` keeps what it predicted.
    ``parameter_memory``: arrays besides the parameters' own that hold parameter values
    (ZeRO-3's gather buffers), which the stash must not count as activations.
    """

    def __init__(self, chunks: list[GPT], grid: ProcessGrid, tc: PipelineConfig,
                 tracer: Tracer, parameter_memory: Sequence[Any] = ()) -> None:
        self.chunks, self.grid, self.tracer = chunks, grid, tracer
        self.p, self.r = grid.pp, grid.pp_rank
        self.m, self.v = tc.microbatches, tc.virtual_stages
        if len(chunks) != self.v:
            raise ValueError(f"{len(chunks)} model chunks for {self.v} virtual stages per rank")
        self.schedule_name = tc.schedule
        schedule = build_schedule(tc.schedule, self.p, self.m, self.v)
        self.report: ScheduleReport = check_schedule(schedule, name=tc.schedule)
        program = schedule[self.r]
        if program[-2:] != [ReduceGrads(), OptimizerStep()]:
            raise ValueError(f"rank {self.r}'s list does not end with ReduceGrads, "
                             "OptimizerStep")
        self.program = program[:-2]  # the trainer carries out the last two (module docstring)
        cfg = chunks[0].cfg
        self.d_model, self.vocab_size = cfg.d_model, cfg.vocab_size
        self.layers = chunks[0].layers  # shared by the chunks (serial or tensor-parallel)
        self.dtype = np.dtype(self.layers.dtype)  # the compute dtype: what is sent
        self.comm = grid.pp_comm
        self.pool = BufferPool(self.dtype)
        self.stats = StashStats()
        self.loss_scale = 1.0  # of the step being run (train_step)
        self._params = [p for c in chunks for p in c.parameters()]
        self._param_memory = memory_ids([*(p.data for p in self._params), *parameter_memory])
        transfers: Dispatch = {
            SendActivation: self._send, SendGrad: self._send,
            RecvActivation: self._recv, RecvGrad: self._recv,
            SendRecv: self._sendrecv,
        }
        self.dispatch: Dispatch = {Forward: self._forward, Backward: self._backward,
                                   BackwardInput: self._backward_input,
                                   BackwardWeight: self._backward_weight, **transfers}
        self.eval_dispatch: Dispatch = {Forward: self._forward_eval, **transfers}
        self._start(training=False)

    # -- what the trainer calls ---------------------------------------------------------------
    def train_step(self, xs: Sequence[Any], ys: Sequence[Any], keys: Sequence[DropoutKey],
                   grad_sync: Any = None, loss_scale: float = 1.0) -> float:
        """Run the schedule on microbatches ``xs``/``ys``; gradients accumulate in ``.grad``.

        Each microbatch's loss Lₖ (a mean over its positions) is scaled by 1/M before its
        backward, so the accumulated gradient is that of (1/M) Σₖ Lₖ, the mean over all M·mb
        sequences, times ``loss_scale`` (fp16's loss scale S, which the optimizer divides
        out). Returns that mean loss on the rank that computes it (the last virtual stage) and
        0.0 elsewhere. Data-parallel reduction is held back for the whole schedule
        (``grad_sync.set_sync(False)``); the trainer's ``grad_sync.finish()`` does it after.
        """
        if len(xs) != self.m or len(ys) != self.m or len(keys) != self.m:
            raise ValueError(f"expected {self.m} microbatches, got {len(xs)} inputs, "
                             f"{len(ys)} targets and {len(keys)} dropout keys")
        if grad_sync is not None:
            grad_sync.set_sync(False)
        self.loss_scale = float(loss_scale)
        self._start(training=True, xs=xs, ys=ys, keys=keys)
        self._run(self.program, self.dispatch)
        return self._finish_losses()

    def forward_only(self, xs: Sequence[Any], ys: Sequence[Any]) -> float:
        """Mean loss over the microbatches, forward only (evaluation); 0.0 off the last stage."""
        if len(xs) != len(ys):
            raise ValueError(f"{len(xs)} inputs but {len(ys)} targets")
        with no_grad():
            self._start(training=False, xs=xs, ys=ys)
            self._run(forward_only_program(self.r, self.p, len(xs), self.v), self.eval_dispatch)
        return self._finish_losses()

    def last_logits(self, idx: Any) -> np.ndarray:
        """Next-token logits (1, vocab) of the sequence ``idx`` (1, t), the same on every rank.

        The sequence runs forward through all virtual stages; the last one keeps the logits of
        the last position and broadcasts them over the pipeline group.
        """
        xp = get_xp()
        idx = xp.asarray(idx)
        with no_grad():
            self._start(training=False, xs=[idx], ys=None)
            self._run(forward_only_program(self.r, self.p, 1, self.v), self.eval_dispatch)
        buf = self.logits if self.logits is not None else xp.empty((1, self.vocab_size),
                                                                  dtype=self.dtype)
        with self.tracer.context(phase="other"):
            self.comm.broadcast(buf, root=self.p - 1)
        return to_numpy(buf)

    def sync_tied_grads(self) -> None:
        """Sum dL/d(wte) of the first stage (embedding) and last stage (head) on both.

        dL/dW = Σ over uses of W, and W is used twice in the 1-process model: once to embed,
        once as the head. Here the two uses sit on different ranks, each holding one term; an
        all-reduce over the embedding group (first and last stage) gives both the sum.
        """
        comm = self.grid.embed_comm
        if comm is None:
            return
        tied = [p for p in self._params if p.tied_embedding]
        if len(tied) != 1:
            raise RuntimeError(f"rank {self.r} is in the embedding group but holds "
                               f"{len(tied)} copies of the tied token embedding")
        w = tied[0]
        xp = get_xp()
        if w.grad is None:
            w.grad = xp.zeros_like(w.data)
        if w.grad.flags.c_contiguous:
            comm.allreduce(w.grad)
        else:  # sum a contiguous copy, then write it back where .grad lives (it may be a view
            # into data parallelism's flat gradient buffer)
            w.grad[...] = comm.allreduce(xp.ascontiguousarray(w.grad))

    def memory_summary(self) -> dict[str, int]:
        """``{"peak_inflight", "peak_stash_bytes", "buffers", "predicted_inflight"}``."""
        return {"peak_inflight": self.stats.peak_inflight,
                "peak_stash_bytes": self.stats.peak_bytes,
                "buffers": self.stats.buffers,
                "predicted_inflight": self.report.peak_inflight[self.r]}

    # -- running a list ----------------------------------------------------------------------
    def _start(self, training: bool, xs: Sequence[Any] = (), ys: Sequence[Any] | None = None,
               keys: Sequence[DropoutKey] | None = None) -> None:
        """Forget the last run's books and take this run's microbatches."""
        self.training = training  # labels communication: forward/backward, or other
        self.xs, self.ys, self.keys = list(xs), ys, keys
        self.inputs: dict[tuple[int, int], Any] = {}  # received activations, not yet used
        self.out_grads: dict[tuple[int, int], Any] = {}  # received dL/d(output)
        self.outputs: dict[tuple[int, int], Tensor] = {}  # computed, not yet sent
        self.in_grads: dict[tuple[int, int], Any] = {}  # dL/d(input), not yet sent
        self.losses: dict[int, float] = {}
        self.logits: Any = None
        # The batch's own memory is not activation memory: leave it out of the stash.
        batch_memory = memory_ids([*self.xs, *(ys or ())])
        self.stash = Stash(self.stats, self._param_memory | batch_memory)
        if self.xs:
            b, t = self.xs[0].shape
            # Whether sequence parallelism splits these sequences: every chunk is told T.
            self.layout = self.layers.sequence_layout(t)
            self.act_shape = (b, self.layout.local_length, self.d_model)  # (mb, T/parts, d)

    def _run(self, program: Sequence[Instruction], dispatch: Dispatch) -> None:
        for instr in program:
            dispatch[type(instr)](instr)
        leftovers = [name for name, d in (("stash", self.stash), ("inputs", self.inputs),
                                          ("output grads", self.out_grads),
                                          ("unsent outputs", self.outputs),
                                          ("unsent input grads", self.in_grads)) if d]
        if leftovers:
            raise RuntimeError(f"rank {self.r}: the schedule ended with {', '.join(leftovers)} "
                               "left over")

    def _finish_losses(self) -> float:
        """(1/M) Σₖ Lₖ in microbatch order (the order the 1-process loop adds them)."""
        if not self.losses:
            return 0.0
        m = len(self.losses)
        total = 0.0
        for k in range(m):
            total += self.losses[k] / m
        return total

    # -- compute -----------------------------------------------------------------------------
    def _chunk_input(self, mb: int, c: int, requires_grad: bool) -> tuple[Tensor | None, Any]:
        """What chunk c computes on for microbatch mb, and the leaf ``x`` it came in as.

        Token ids (mb, T) on virtual stage 0 (``x`` None); elsewhere the received activation
        (mb, T/parts, d) wrapped as a leaf, which in training requires a gradient so that
        backward leaves dL/dx in ``x.grad``.
        """
        if is_first_stage(self.r, c):
            return None, self.xs[mb]
        x = Tensor(self.inputs.pop((mb, c)), requires_grad=requires_grad)
        return x, x

    def _forward(self, instr: Forward) -> None:
        """y = chunk_c(x) for microbatch k = mb; on the last virtual stage Lₖ = loss(chunk_c(x)).

        Keeps (x, y) and the graph between them in the stash until `_backward`.
        """
        mb, c = instr.mb, instr.chunk
        last = is_last_stage(self.r, c, self.p, self.v)
        x, inp = self._chunk_input(mb, c, requires_grad=True)
        targets = self.ys[mb] if last else None
        with self.tracer.span(span_name("forward", c), phase="forward", microbatch=mb):
            out = self.chunks[c](inp, targets, self.keys[mb], seq_len=self.layout.length)
            if last:
                self.losses[mb] = float(out.data)
                # backward starts from S·Lₖ/M, as in the 1-process loop (S = 1 but in fp16)
                out = out * (self.loss_scale / self.m)
        if not last:
            self.outputs[(mb, c)] = out
        self.stash.keep((mb, c), x, out)

    def _forward_eval(self, instr: Forward) -> None:
        """y = chunk_c(x) without a graph (evaluation, generation); nothing waits for a backward.

        The input buffer goes back to the pool at once. The last virtual stage keeps the loss
        or, without targets (generation), the logits of the last position, (1, vocab).
        """
        mb, c = instr.mb, instr.chunk
        last = is_last_stage(self.r, c, self.p, self.v)
        x, inp = self._chunk_input(mb, c, requires_grad=False)
        targets = self.ys[mb] if (last and self.ys is not None) else None
        with self.tracer.span(span_name("eval", c), phase="other", microbatch=mb):
            out = self.chunks[c](inp, targets, seq_len=self.layout.length)
            if targets is not None:
                self.losses[mb] = float(out.data)
        if x is not None:
            self.pool.give(x.data)
        if not last:
            self.outputs[(mb, c)] = out
        elif targets is None:
            self.logits = get_xp().ascontiguousarray(out.data[:, -1, :])  # (1, vocab)

    def _backward(self, instr: Backward) -> None:
        """Backpropagate dL/dy through chunk c: parameter gradients accumulate (+=) and
        dL/dx = (∂y/∂x)ᵀ dL/dy is kept for `SendGrad`. dL/dy is the received gradient, or 1
        for y = Lₖ/M on the last virtual stage."""
        mb, c = instr.mb, instr.chunk
        x, out = self.stash.release((mb, c))
        with self.tracer.span(span_name("backward", c), phase="backward", microbatch=mb):
            grad = self._backpropagate(out, mb, c)
        for buf in (grad, None if x is None else x.data):
            if buf is not None:
                self.pool.give(buf)  # the graph that saved them is gone
        if x is not None:
            self.in_grads[(mb, c)] = x.grad

    def _backward_input(self, instr: BackwardInput) -> None:
        """B of a split backward: dL/dx = (∂y/∂x)ᵀ dL/dy only, kept for `SendGrad`; every
        parameter edge is left in a `WeightGradients` for `_backward_weight`. The received
        buffers stay out of the pool until then: W may read them (a Linear's input x or
        dL/dy can be one of them)."""
        mb, c = instr.mb, instr.chunk
        x, out = self.stash.release((mb, c))
        store = WeightGradients()
        with self.tracer.span(span_name("backward", c), phase="backward", microbatch=mb):
            with defer_weight_grads(store):
                grad = self._backpropagate(out, mb, c)
        if x is not None:
            self.in_grads[(mb, c)] = x.grad
        buffers = [b for b in (grad, None if x is None else x.data) if b is not None]
        self.stash.keep_for_weights((mb, c), store, buffers)

    def _backward_weight(self, instr: BackwardWeight) -> None:
        """W of a split backward: dL/dθ of chunk c for microbatch mb, accumulated (+=) into
        ``.grad`` (for a Linear dW = dYᵀ X, db = Σ dY); then its buffers go back to the pool."""
        mb, c = instr.mb, instr.chunk
        store, buffers = self.stash.release_weights((mb, c))
        with self.tracer.span(span_name("weight", c), phase="backward", microbatch=mb):
            store.run()
        for buf in buffers:
            self.pool.give(buf)

    def _backpropagate(self, out: Tensor, mb: int, c: int) -> Any:
        """``out.backward`` from dL/dy; returns the received gradient buffer (None on the last
        virtual stage, where y = Lₖ/M is a scalar and dL/dy = 1)."""
        if is_last_stage(self.r, c, self.p, self.v):
            out.backward()
            return None
        grad = self.out_grads.pop((mb, c))  # (mb, T/parts, d)
        out.backward(grad)
        return grad

    # -- communication -----------------------------------------------------------------------
    def _outgoing(self, part: PointToPoint) -> Any:
        """The array a send of ``part`` transmits (the contiguous buffer handed to MPI)."""
        key = (part.mb, part.chunk)
        if isinstance(part, SendActivation):
            data = self.outputs[key].data
        else:
            data = self.in_grads.pop(key)
        return get_xp().ascontiguousarray(data)

    def _sent(self, part: PointToPoint) -> None:
        """After a send: a sent output keeps only its place in the graph (see module doc)."""
        if isinstance(part, SendActivation):
            out = self.outputs.pop((part.mb, part.chunk))
            if self.training:
                # One element seen through zero strides: the shape backward() checks, no memory.
                xp = get_xp()
                out.data = xp.broadcast_to(xp.zeros((), dtype=self.dtype), out.data.shape)

    def _arrived(self, part: PointToPoint, buf: Any) -> None:
        book = self.inputs if isinstance(part, RecvActivation) else self.out_grads
        book[(part.mb, part.chunk)] = buf

    def _phase(self, part: PointToPoint) -> str:
        if not self.training:
            return "other"
        return "forward" if part.kind == "activation" else "backward"

    def _send(self, instr: SendActivation | SendGrad) -> None:
        """``Send``: blocks until the peer has posted the matching receive (large messages)."""
        with self.tracer.context(phase=self._phase(instr), microbatch=instr.mb):
            self.comm.send(self._outgoing(instr), instr.peer, tag=instr.tag)
        self._sent(instr)

    def _recv(self, instr: RecvActivation | RecvGrad) -> None:
        """``Recv`` into a pooled (mb, T/parts, d) buffer: blocks until the message is in."""
        buf = self.pool.take(self.act_shape)
        with self.tracer.context(phase=self._phase(instr), microbatch=instr.mb):
            self.comm.recv(buf, instr.peer, tag=instr.tag)
        self._arrived(instr, buf)
        self.stats.buffers = self.pool.allocated

    def _sendrecv(self, instr: SendRecv) -> None:
        """``Sendrecv``: both halves posted at once, so two neighbours can exchange."""
        send, recv = instr.send, instr.recv
        buf = self.pool.take(self.act_shape)
        with self.tracer.context(phase=self._phase(send), microbatch=send.mb):
            self.comm.sendrecv(self._outgoing(send), send.peer, buf, recv.peer,
                               sendtag=send.tag, recvtag=recv.tag)
        self._sent(send)
        self._arrived(recv, buf)
        self.stats.buffers = self.pool.allocated


__all__ = ["PipelineConfig", "PipelineExecutor", "forward_only_program"]
