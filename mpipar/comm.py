"""The communication layer: every byte that leaves a rank goes through :class:`Comm`.

``Comm`` wraps one MPI communicator (the whole job, or one of the dp/tp/pp groups made by
:class:`mpipar.grid.ProcessGrid`) and gives it the handful of operations that data, tensor and
pipeline parallelism are built from:

==================  ==========================================================================
``allreduce``       every rank ends with the elementwise sum (max, min) of all ranks' buffers
``reduce_scatter``  rank i ends with block i of that sum (a 1/n slice)
``allgather``       every rank ends with the concatenation of all ranks' buffers
``broadcast``       every rank ends with the root's buffer
``send``/``recv``   point to point, blocking; ``sendrecv`` both at once (no deadlock)
``isend``/``irecv`` point to point, non-blocking: return a :class:`Request` to ``wait`` on
``iallreduce``      non-blocking all-reduce (lets gradient reduction overlap backward compute)
``alltoallv``       rank i's block j goes to rank j, blocks of any size (expert parallelism)
==================  ==========================================================================

Arrays travel as raw buffers through mpi4py's upper-case calls (``Allreduce``, ``Send``, ...),
never pickled; only small control messages (:meth:`Comm.allgather_object`,
:meth:`Comm.bcast_object`) use the pickling lower-case calls. Buffers must be C-contiguous.

Every data call is traced (see :mod:`mpipar.trace`) with op, group name, peer as a *global*
rank, bytes (the ``nbytes`` of the buffer this rank hands in), dtype and shape. Control-plane
calls are not traced: they are not part of the model's communication.

A ``Comm`` given an :class:`Activity` also notes every blocking call as it starts and ends,
control-plane calls included, so that a watchdog thread (:mod:`mpipar.watchdog`) can tell,
while the main thread is stuck inside MPI, which call it is stuck in. mpi4py releases the
Python lock inside blocking MPI calls, so that thread runs meanwhile; :func:`abort` then ends
the whole job from it.

GPU arrays. With cupy arrays the same code runs: a buffer is first copied to host memory
(``to_numpy``, which waits for the kernels that produced it), MPI moves the host copy, and
received data is copied back to the device. An MPI built with CUDA support can read device
memory directly; set the environment variable ``MPIPAR_CUDA_AWARE_MPI=1`` to skip the host
copies (the device is then synchronised before each call, since MPI does not see CUDA streams).

bfloat16. MPI has no bfloat16 type here, and numpy exports no buffer format for the
``ml_dtypes`` dtype, so a bfloat16 array is handed to MPI as its raw 2-byte elements (a
contiguous type of 2 bytes) with reductions of our own, computed in fp32 and rounded once per
pair of operands, as numpy's bfloat16 addition does (`_bf16_op`). float16 is MPI's own.

This is the only module that imports mpi4py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from mpipar.backend import array_module, to_numpy
from mpipar.precision import BFLOAT16, FLOAT32
from mpipar.trace import Tracer

CUDA_AWARE_ENV = "MPIPAR_CUDA_AWARE_MPI"

# Reductions are named by string at call sites ("sum") and looked up here, once.
_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
_UNTRACED = contextlib.nullcontext()  # what ``Comm._traced`` returns with tracing off


def _mpi_op(op: str, dtype: Any = None) -> MPI.Op:
    try:
        mpi_op = _OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduction {op!r}; expected one of {sorted(_OPS)}") from None
    return _bf16_op(op) if dtype == BFLOAT16 else mpi_op


_BF16_TYPE = MPI.BYTE.Create_contiguous(2).Commit()  # one bfloat16, as MPI sees it
_BF16_OPS: dict[str, MPI.Op] = {}
_BF16_FUNCS = {"sum": np.add, "max": np.maximum, "min": np.minimum}


def _bf16_op(op: str) -> MPI.Op:
    """The reduction ``op`` over bfloat16 elements: inout ← round(fp32(in) op fp32(inout))."""
    if op not in _BF16_OPS:
        func = _BF16_FUNCS[op]

        def reduce(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
            a = np.frombuffer(inbuf, dtype=BFLOAT16)
            b = np.frombuffer(inoutbuf, dtype=BFLOAT16)
            b[...] = func(a.astype(FLOAT32), b.astype(FLOAT32))

        _BF16_OPS[op] = MPI.Op.Create(reduce, commute=True)
    return _BF16_OPS[op]


def cuda_aware_mpi() -> bool:
    """True when ``MPIPAR_CUDA_AWARE_MPI`` is set (non-empty, not ``0``)."""
    return os.environ.get(CUDA_AWARE_ENV, "0") not in ("", "0")


def _staged(buf: Any, *, copy_in: bool) -> Any:
    """The array MPI actually reads or writes for ``buf`` (same shape and dtype).

    numpy: ``buf`` itself. cupy: a host copy of it (``copy_in``: filled with ``buf``'s values,
    else uninitialised, for receive-only buffers), or ``buf`` itself after a device
    synchronisation when the MPI is CUDA-aware.
    """
    if not buf.flags.c_contiguous:
        raise ValueError(
            f"MPI needs a C-contiguous buffer, got shape {buf.shape} with strides "
            f"{buf.strides}; pass ascontiguousarray(x)"
        )
    if isinstance(buf, np.ndarray):
        return _message(buf)
    if cuda_aware_mpi():
        array_module(buf).cuda.get_current_stream().synchronize()
        return buf
    return _message(to_numpy(buf) if copy_in else np.empty(buf.shape, dtype=buf.dtype))


def _message(a: np.ndarray) -> Any:
    """What mpi4py is handed for host array ``a``: ``a`` itself, or for bfloat16 its raw
    2-byte elements with the matching MPI type (see the module docstring)."""
    return [a.view(np.uint16), _BF16_TYPE] if a.dtype == BFLOAT16 else a


def _vector(message: Any, counts: Sequence[int]) -> list:
    """``message`` (`_message`'s) with per-rank ``counts`` and their displacements, as
    mpi4py's ``Alltoallv`` takes it: ``[buffer, (counts, displacements), type]``."""
    counts = [int(c) for c in counts]
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    if isinstance(message, list):  # bfloat16: [raw elements, their MPI type]
        return [message[0], (counts, displs), message[1]]
    return [message, (counts, displs)]


def _unstage(buf: Any, staged: Any) -> None:
    """Copy received data back into ``buf`` when MPI wrote into a host copy of it."""
    if isinstance(staged, list):  # bfloat16 (`_message`): MPI wrote into staged[0]'s memory
        if isinstance(buf, np.ndarray):
            return  # which is buf's own
        staged = staged[0].view(BFLOAT16)
    if staged is not buf:
        buf[...] = array_module(buf).asarray(staged)


def _check_same(a: Any, b: Any, what: str) -> None:
    if a.dtype != b.dtype:
        raise ValueError(f"{what}: dtypes differ ({a.dtype} vs {b.dtype})")


@dataclass
class Call:
    """One blocking communication call of this rank: what, with whom, and since when."""

    op: str
    group: str
    peer: int | None  # the global rank at the other end of a point-to-point call
    nbytes: int
    start: float  # time.perf_counter() seconds
    end: float | None = None  # None while the call has not returned

    def describe(self, now: float) -> str:
        """E.g. ``in recv on pp with rank 1 (2,048 bytes) for 5.0 s``."""
        peer = "" if self.peer is None else f" with rank {self.peer}"
        what = f"{self.op} on {self.group}{peer} ({self.nbytes:,} bytes)"
        if self.end is None:
            return f"in {what} for {now - self.start:.1f} s"
        return f"last call {what} returned {now - self.end:.1f} s ago"


class Activity:
    """What this rank's communication is doing, for a watchdog on another thread.

    ``call`` is the latest blocking call (``end is None`` while it has not returned), and
    ``last_return`` the time the latest call returned: a returned call is progress. The main
    thread writes both, the watchdog only reads them (single attribute stores, no lock needed).
    """

    def __init__(self) -> None:
        self.call: Call | None = None
        self.last_return = time.perf_counter()

    def begin(self, op: str, group: str, peer: int | None, nbytes: int) -> Call:
        self.call = Call(op, group, peer, nbytes, time.perf_counter())
        return self.call

    def end(self, call: Call) -> None:
        call.end = self.last_return = time.perf_counter()


class Request:
    """A non-blocking call in flight. ``wait()`` blocks until it completes; ``test()`` polls.

    Until completion the buffer belongs to MPI: don't read a receive buffer or write a send
    buffer. The trace record spans launch to completion (as seen by ``wait``/``test``), so
    its duration includes the time the call overlapped with compute; its ``waited`` field is
    the part of it this rank spent blocked in ``wait`` (0 when ``test`` found it done), the
    communication time the overlap did not hide.
    """

    def __init__(
        self,
        comm: Comm,
        mpi_request: MPI.Request,
        op: str,
        peer: int | None,
        buf: Any,
        staged: Any,
        copy_out: bool,
        start: float,
    ) -> None:
        self.comm = comm
        self.buf = buf
        self.done = False
        self._req = mpi_request
        self._op = op
        self._peer = peer
        self._staged = staged  # keeps the buffer MPI works on alive until completion
        self._copy_out = copy_out
        self._start = start
        tr = comm.tracer
        # Stamp phase/step/microbatch now: the wait may happen in a later phase.
        self._stamp = (tr.phase, tr.step, tr.microbatch) if tr.enabled else None

    def wait(self) -> Any:
        """Block until complete; returns the buffer (for a receive: now holding the data)."""
        if not self.done:
            blocked_from = self._clock()
            with self.comm._watched(f"wait {self._op}", self.buf, self._peer):
                self._req.Wait()
            self._finish(self._clock() - blocked_from)
        return self.buf

    def test(self) -> bool:
        """True (and the buffer is ready) if the call has completed; never blocks."""
        if not self.done and self._req.Test():
            self._finish(0.0)
        return self.done

    def _clock(self) -> float:
        """``time.perf_counter()`` when traced; untraced, 0.0 without reading the clock."""
        return time.perf_counter() if self._stamp is not None else 0.0

    def _finish(self, waited: float) -> None:
        self.done = True
        if self._copy_out:
            _unstage(self.buf, self._staged)
        if self._stamp is not None:
            phase, step, microbatch = self._stamp
            self.comm._record(self._op, self.buf, self._peer, self._start,
                              phase=phase, step=step, microbatch=microbatch, waited=waited)


def wait_all(requests: Sequence[Request]) -> list[Any]:
    """Wait for every request, in order; returns their buffers in order.

    One ``Wait`` each rather than one ``Waitall``, so that each record's ``waited`` is the
    time this rank blocked until that request completed, after the ones before it: the
    blocked times add up to the whole wait, and none of it is counted twice. (Every request
    is already started, so the order of the waits cannot deadlock.)
    """
    return [r.wait() for r in requests]


class Comm:
    """One communicator (a group of ranks) with traced array collectives and p2p calls.

    ``rank``/``size`` are this process's rank in the group and the group's size; ``members``
    lists the global rank of each group rank, so ``members[self.rank]`` is the global rank.
    Point-to-point ``dest``/``source`` arguments are ranks *in this group*; trace records
    translate them to global ranks.

    Every data method has the same three steps inside one traced block: stage the buffers
    (a host copy of a GPU array, see the module docstring), make the one MPI call, copy what
    was received back (unstage).
    """

    def __init__(self, mpi_comm: MPI.Comm, group: str, tracer: Tracer | None = None,
                 activity: Activity | None = None) -> None:
        self.mpi = mpi_comm
        self.group = group
        self.activity = activity  # shared by the groups split from this one
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        # Without a tracer we still hold a disabled one, so each call checks one attribute.
        self.tracer = tracer if tracer is not None else Tracer(MPI.COMM_WORLD.Get_rank())
        mine, world = mpi_comm.Get_group(), MPI.COMM_WORLD.Get_group()
        self.members: tuple[int, ...] = tuple(
            MPI.Group.Translate_ranks(mine, list(range(self.size)), world)
        )
        mine.Free()
        world.Free()

    @classmethod
    def world(cls, tracer: Tracer | None = None, activity: Activity | None = None) -> Comm:
        """All processes of the job (``MPI.COMM_WORLD``), group name ``"world"``."""
        return cls(MPI.COMM_WORLD, "world", tracer, activity)

    @classmethod
    def self_group(cls, group: str, tracer: Tracer | None = None) -> Comm:
        """This process alone (``MPI.COMM_SELF``), named ``group``.

        Making it needs no collective call, so it works inside a larger job too (a 1-process
        reference computed on one rank, a 1 × 1 × 1 grid).
        """
        return cls(MPI.COMM_SELF, group, tracer)

    def __repr__(self) -> str:
        return (
            f"Comm(group={self.group!r}, rank={self.rank}, size={self.size}, "
            f"members={self.members})"
        )

    # ---- tracing -----------------------------------------------------------------------

    def _traced(self, op: str, buf: Any, peer: int | None = None) -> AbstractContextManager:
        """Record the ``with`` body as one ``op`` call of ``buf``'s bytes, to group rank
        ``peer`` (None for a collective), and note it in the :class:`Activity`. With tracing
        off and no activity this is a shared no-op context: the clock is never read."""
        if not self.tracer.enabled and self.activity is None:
            return _UNTRACED
        return self._timed(op, buf, peer)

    @contextlib.contextmanager
    def _timed(self, op: str, buf: Any, peer: int | None) -> Iterator[None]:
        start = time.perf_counter()
        peer = None if peer is None else self.members[peer]
        with self._watched(op, buf, peer):
            yield  # an exception in the call propagates and leaves no record
        if self.tracer.enabled:
            self._record(op, buf, peer, start)

    @contextlib.contextmanager
    def _watched(self, op: str, buf: Any, peer: int | None, nbytes: int = 0) -> Iterator[None]:
        """Note the ``with`` body as a blocking call in the activity (if any); ``peer`` is a
        global rank."""
        if self.activity is None:
            yield
            return
        call = self.activity.begin(op, self.group, peer, nbytes if buf is None else buf.nbytes)
        yield
        self.activity.end(call)

    def _record(self, op: str, buf: Any, peer: int | None, start: float, **stamp: Any) -> None:
        """One trace record, ending now; ``peer`` is a global rank, ``buf`` None for none."""
        nbytes, dtype, shape = (0, "", ()) if buf is None else (buf.nbytes, buf.dtype, buf.shape)
        self.tracer.record(op, self.group, peer, nbytes, dtype, shape, start,
                           time.perf_counter(), **stamp)

    def _launch_time(self) -> float:
        """When a non-blocking call starts (0.0 untraced: its record is never written)."""
        return time.perf_counter() if self.tracer.enabled else 0.0

    # ---- collectives -------------------------------------------------------------------

    def allreduce(self, buf: Any, out: Any | None = None, op: str = "sum") -> Any:
        """``out = op(buf over all ranks)``, elementwise; in place in ``buf`` when no ``out``.

        Returns the array holding the result. Every rank must pass the same shape and dtype.
        """
        mpi_op = _mpi_op(op, buf.dtype)
        if out is None:
            with self._traced("allreduce", buf):
                staged = _staged(buf, copy_in=True)
                self.mpi.Allreduce(MPI.IN_PLACE, staged, op=mpi_op)
                _unstage(buf, staged)
            return buf
        _check_same(buf, out, "allreduce")
        if out.size != buf.size:
            raise ValueError(f"allreduce: out has {out.size} elements, buf {buf.size}")
        with self._traced("allreduce", buf):
            send, recv = _staged(buf, copy_in=True), _staged(out, copy_in=False)
            self.mpi.Allreduce(send, recv, op=mpi_op)
            _unstage(out, recv)
        return out

    def reduce_scatter(self, send: Any, recv: Any, op: str = "sum") -> Any:
        """``recv = op over ranks of send.reshape(size, -1)[self.rank]`` (equal blocks).

        Viewed flat, ``send`` is ``size`` consecutive blocks of ``recv.size`` elements; rank i
        gets the reduction of every rank's block i. Returns ``recv``.
        """
        if send.size != self.size * recv.size:
            raise ValueError(
                f"reduce_scatter: send has {send.size} elements, expected size {self.size} "
                f"× recv {recv.size} = {self.size * recv.size}"
            )
        _check_same(send, recv, "reduce_scatter")
        mpi_op = _mpi_op(op, send.dtype)
        with self._traced("reduce_scatter", send):
            s, r = _staged(send, copy_in=True), _staged(recv, copy_in=False)
            self.mpi.Reduce_scatter_block(s, r, op=mpi_op)
            _unstage(recv, r)
        return recv

    def allgather(self, send: Any, recv: Any) -> Any:
        """``recv`` (flat) = rank 0's ``send``, then rank 1's, ...; returns ``recv``."""
        if recv.size != self.size * send.size:
            raise ValueError(
                f"allgather: recv has {recv.size} elements, expected size {self.size} "
                f"× send {send.size} = {self.size * send.size}"
            )
        _check_same(send, recv, "allgather")
        with self._traced("allgather", send):
            s, r = _staged(send, copy_in=True), _staged(recv, copy_in=False)
            self.mpi.Allgather(s, r)
            _unstage(recv, r)
        return recv

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        """Copy ``root``'s ``buf`` into every rank's ``buf`` (in place); returns ``buf``."""
        with self._traced("broadcast", buf):
            staged = _staged(buf, copy_in=self.rank == root)
            self.mpi.Bcast(staged, root=root)
            _unstage(buf, staged)
        return buf

    def barrier(self) -> None:
        """Block until every rank of the group has arrived (traced with 0 bytes)."""
        with self._traced("barrier", None):
            self.mpi.Barrier()

    def alltoallv(self, send: Any, send_counts: Sequence[int], recv: Any,
                  recv_counts: Sequence[int]) -> Any:
        """Personalised exchange: this rank's ``send`` holds one block per group rank, in rank
        order, ``send_counts[j]`` elements for rank j; ``recv`` receives rank j's block for
        this rank, ``recv_counts[j]`` elements, in rank order. Returns ``recv``.

        Blocks lie back to back (displacements are the running sums of the counts). Traced
        with the bytes of the whole ``send`` buffer (this rank's contribution, the block it
        keeps for itself included). Every rank's ``send_counts[j]`` must equal rank j's
        ``recv_counts[i]``; the counts usually come from an earlier ``alltoallv`` of counts.
        """
        if send.size != sum(send_counts) or recv.size != sum(recv_counts):
            raise ValueError(
                f"alltoallv: send has {send.size} elements for counts {list(send_counts)}, "
                f"recv {recv.size} for counts {list(recv_counts)}")
        if len(send_counts) != self.size or len(recv_counts) != self.size:
            raise ValueError(f"alltoallv: need one count per rank of {self.size}")
        _check_same(send, recv, "alltoallv")
        with self._traced("alltoallv", send):
            s, r = _staged(send, copy_in=True), _staged(recv, copy_in=False)
            self.mpi.Alltoallv(_vector(s, send_counts), _vector(r, recv_counts))
            _unstage(recv, r)
        return recv

    # ---- point to point ----------------------------------------------------------------

    def send(self, buf: Any, dest: int, tag: int = 0) -> None:
        """Blocking send to group rank ``dest`` (may wait until ``dest`` posts its receive)."""
        with self._traced("send", buf, dest):
            self.mpi.Send(_staged(buf, copy_in=True), dest=dest, tag=tag)

    def recv(self, buf: Any, source: int, tag: int = 0) -> Any:
        """Blocking receive from group rank ``source`` into ``buf``; returns ``buf``."""
        with self._traced("recv", buf, source):
            staged = _staged(buf, copy_in=False)
            self.mpi.Recv(staged, source=source, tag=tag)
            _unstage(buf, staged)
        return buf

    def sendrecv(
        self,
        sendbuf: Any,
        dest: int,
        recvbuf: Any,
        source: int,
        sendtag: int = 0,
        recvtag: int = 0,
    ) -> Any:
        """Send ``sendbuf`` to ``dest`` while receiving into ``recvbuf`` from ``source``.

        One call, so a ring of ranks each sending right and receiving left cannot deadlock
        (two blocking ``send`` s facing each other can). Traced with ``peer`` = ``dest`` and
        the bytes sent. Returns ``recvbuf``.
        """
        with self._traced("sendrecv", sendbuf, dest):
            s, r = _staged(sendbuf, copy_in=True), _staged(recvbuf, copy_in=False)
            self.mpi.Sendrecv(s, dest, sendtag, r, source, recvtag)
            _unstage(recvbuf, r)
        return recvbuf

    # ---- non-blocking ------------------------------------------------------------------

    def isend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        """Start sending ``buf`` to ``dest``; don't modify ``buf`` before ``wait``."""
        start = self._launch_time()
        staged = _staged(buf, copy_in=True)
        req = self.mpi.Isend(staged, dest=dest, tag=tag)
        return Request(self, req, "isend", self.members[dest], buf, staged, False, start)

    def irecv(self, buf: Any, source: int, tag: int = 0) -> Request:
        """Start receiving into ``buf`` from ``source``; ``buf`` holds the data after ``wait``."""
        start = self._launch_time()
        staged = _staged(buf, copy_in=False)
        req = self.mpi.Irecv(staged, source=source, tag=tag)
        return Request(self, req, "irecv", self.members[source], buf, staged, True, start)

    def iallreduce(self, buf: Any, op: str = "sum") -> Request:
        """Start an in-place all-reduce of ``buf``; the result is there after ``wait``."""
        mpi_op = _mpi_op(op, buf.dtype)
        start = self._launch_time()
        staged = _staged(buf, copy_in=True)
        req = self.mpi.Iallreduce(MPI.IN_PLACE, staged, op=mpi_op)
        return Request(self, req, "iallreduce", None, buf, staged, True, start)

    def iallgather(self, buf: Any) -> Request:
        """Start an in-place all-gather: ``buf`` (flat) is ``size`` equal blocks, block r
        holding rank r's contribution on rank r; after ``wait`` every block holds its rank's.

        In place, so the buffer handed to the call, and traced, is the whole of ``buf``.
        """
        if buf.size % self.size:
            raise ValueError(f"iallgather: {buf.size} elements do not split into {self.size} "
                             "equal blocks")
        start = self._launch_time()
        staged = _staged(buf, copy_in=True)
        req = self.mpi.Iallgather(MPI.IN_PLACE, staged)
        return Request(self, req, "iallgather", None, buf, staged, True, start)

    wait_all = staticmethod(wait_all)

    # ---- groups and control messages ---------------------------------------------------

    def split(self, color: int | None, key: int, group: str) -> Comm | None:
        """Partition this group: ranks with equal ``color`` form a new group, ordered by ``key``.

        Collective over this group. ``color=None`` opts out (``MPI.UNDEFINED``) and returns
        ``None``. The new ``Comm`` shares this one's tracer and is named ``group``.
        """
        mpi_color = MPI.UNDEFINED if color is None else color
        with self._watched("split", None, None):
            new = self.mpi.Split(mpi_color, key)
        if new == MPI.COMM_NULL:
            return None
        return Comm(new, group, self.tracer, self.activity)

    def allgather_object(self, obj: Any) -> list[Any]:
        """Control plane: every rank gets the list of all ranks' (pickled) ``obj``.

        For small Python values (config hashes, shapes, metrics); never for tensors.
        """
        with self._watched("allgather_object", None, None):
            return self.mpi.allgather(obj)

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """Control plane: every rank gets ``root``'s (pickled) ``obj``."""
        with self._watched("bcast_object", None, None):
            return self.mpi.bcast(obj, root=root)

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Control plane: ``root`` gets the list of all ranks' ``obj``; others get ``None``.

        Used to collect trace records and metrics on one rank for writing.
        """
        with self._watched("gather_object", None, None):
            return self.mpi.gather(obj, root=root)


def world_size_and_rank() -> tuple[int, int]:
    """``(size, rank)`` of the job; ``(1, 0)`` when started without ``mpirun``."""
    return MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()


def abort(code: int) -> None:
    """End the whole job now with exit code ``code`` (``MPI_Abort``), from any thread.

    The launcher kills every rank, stopped ones included; a 1-process run exits with ``code``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code)


def install_excepthook(world: Comm) -> None:
    """Make an uncaught exception on any rank end the whole job, loudly and promptly.

    Without this, a rank that dies leaves the others blocked forever in their next
    collective. The hook writes the traceback to stderr with every line prefixed
    ``[rank R] `` (the ranks' outputs are interleaved), flushes, and calls
    ``MPI.COMM_WORLD.Abort(1)``; the launcher then kills all ranks and exits non-zero
    (MPICH's ``mpiexec`` exits with the abort code, 1). ``SystemExit`` is not an error here:
    it bypasses the hook, so a configuration error raised as ``SystemExit(2)`` on *every*
    rank exits 2. In a 1-process run the hook prints and lets Python exit 1 without Abort.
    """
    rank = world.members[world.rank]
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, SystemExit):  # Python never routes it here; be explicit
            previous(exc_type, exc, tb)
            return
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        try:
            sys.stdout.flush()
            sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in text.splitlines()))
            sys.stderr.flush()
        finally:
            if MPI.COMM_WORLD.Get_size() > 1:
                MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
