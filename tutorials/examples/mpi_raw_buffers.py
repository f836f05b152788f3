"""What ``Comm`` does underneath: one mpi4py call per method, with the array as a raw buffer.

    mpirun -n 2 python tutorials/examples/mpi_raw_buffers.py

mpipar's own code reaches MPI only through ``mpipar/comm.py``; this script calls mpi4py
directly, once, to show what that module hides. mpi4py has two spellings of every call:

* **uppercase** (``Send``, ``Recv``, ``Allreduce``, ...) hand MPI a buffer: the address,
  length and type of an array's memory. Nothing is converted; the receiver has allocated an
  array of the right size and type, and MPI writes straight into it;
* **lowercase** (``send``, ``recv``, ``allreduce``, ...) take any Python object, pickle it
  into bytes, send the bytes with their length, and unpickle a new object at the other end.

Lowercase is convenient for a small message of unknown shape (a configuration, a list of
names). For arrays it costs two copies (pickling and unpickling), a memory allocation on the
receiving side, and the pickle's header. So mpipar moves every array with uppercase calls, and
uses lowercase ones only for small control messages that are not traced.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() != 2:
        raise SystemExit("run with mpirun -n 2")

    # 1. The raw buffer call: the receiver's array exists before the message arrives.
    buf = np.arange(8, dtype=np.float64) if rank == 0 else np.empty(8, dtype=np.float64)
    if rank == 0:
        MPI.COMM_WORLD.Send(buf, dest=1)
    else:
        MPI.COMM_WORLD.Recv(buf, source=0)
        print(f"rank 1: Recv wrote {buf.nbytes} bytes into its own array: {buf}", flush=True)
    comm.Barrier()

    # 2. The pickling call: any object, a new one at the other end.
    if rank == 0:
        comm.send({"step": 3, "loss": 2.5}, dest=1)
    else:
        print(f"rank 1: recv unpickled a new object: {comm.recv(source=0)}", flush=True)
    comm.Barrier()

    # 3. The same 8 MB array both ways, there and back 10 times.
    big = np.ones(1_000_000)
    for name, trip in (("Send/Recv", _buffer_trip), ("send/recv", _pickle_trip)):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(10):
            big = trip(comm, rank, big)
        ms = (time.perf_counter() - start) / 20 * 1e3
        if rank == 0:
            print(f"{name}: {ms:.2f} ms per one-way trip of {big.nbytes:,} bytes", flush=True)


def _buffer_trip(comm, rank: int, a: np.ndarray) -> np.ndarray:
    if rank == 0:
        comm.Send(a, dest=1)
        comm.Recv(a, source=1)
    else:
        comm.Recv(a, source=0)
        comm.Send(a, dest=0)
    return a


def _pickle_trip(comm, rank: int, a: np.ndarray) -> np.ndarray:
    if rank == 0:
        comm.send(a, dest=1)
        return comm.recv(source=1)
    a = comm.recv(source=0)
    comm.send(a, dest=0)
    return a


if __name__ == "__main__":
    main()
