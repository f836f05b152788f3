"""A deadlock on purpose, and three ways out of it.

    mpirun -n 2 python tutorials/examples/mpi_deadlock.py [--fix order|sendrecv|nonblocking]
                                                          [--count N]

Two ranks swap arrays of ``--count`` float64 numbers. The naive code is symmetric: each
rank first sends, then receives. A blocking send is allowed to wait until the matching
receive has been posted, and for a large message MPI does wait (it cannot buffer 8 MB just
in case), so both ranks sit in ``send``, each waiting for the other to reach ``recv``,
forever. For a small message MPI copies the data into a buffer of its own and returns
("eager" protocol), so the same code works. Code that works only because messages happen to
be small is the worst kind: it hangs the day the model grows.

A watchdog thread ends this demonstration after 3 seconds (exit code 3) instead of letting it
hang your terminal. The fixes:

* ``order``: break the symmetry: even ranks send then receive, odd ranks receive then send;
* ``sendrecv``: one call that sends and receives at once, and lets MPI order the two
  (:meth:`mpipar.comm.Comm.sendrecv`, what the ring all-reduce uses);
* ``nonblocking``: start the send (``isend``), receive, then wait for the send to finish.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

from mpipar.comm import Comm

WATCHDOG_S = 3.0


def watchdog(rank: int, what: str) -> threading.Timer:
    def fire() -> None:
        # One write of the whole line: print() writes the text and the newline separately,
        # and the two ranks' lines could then interleave in the launcher's output.
        line = f"rank {rank}: still blocked in {what} after {WATCHDOG_S:.0f} s: deadlock\n"
        os.write(sys.stdout.fileno(), line.encode())
        time.sleep(1.0)  # let the other rank's watchdog have its say before the job ends
        os._exit(3)  # every rank's watchdog fires, so the whole job ends

    timer = threading.Timer(WATCHDOG_S, fire)
    timer.daemon = True
    timer.start()
    return timer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fix", choices=["order", "sendrecv", "nonblocking"])
    ap.add_argument("--count", type=int, default=1_000_000, help="float64 numbers to swap")
    args = ap.parse_args()
    world = Comm.world()
    if world.size != 2:
        raise SystemExit("run with mpirun -n 2")
    r, other = world.rank, 1 - world.rank
    mine = np.full(args.count, float(r))
    theirs = np.empty(args.count)

    # Both ranks start the swap (and the watchdog's clock) together: a rank still starting up
    # on a busy machine must not look like a deadlock to the other.
    world.barrier()
    timer = watchdog(r, "the swap")
    if args.fix is None:  # both ranks: send, then receive
        world.send(mine, dest=other)
        world.recv(theirs, source=other)
    elif args.fix == "order":
        if r % 2 == 0:
            world.send(mine, dest=other)
            world.recv(theirs, source=other)
        else:
            world.recv(theirs, source=other)
            world.send(mine, dest=other)
    elif args.fix == "sendrecv":
        world.sendrecv(mine, other, theirs, other)
    else:
        request = world.isend(mine, dest=other)
        world.recv(theirs, source=other)
        request.wait()  # only now may `mine` be changed again
    timer.cancel()

    ok = bool((theirs == other).all())
    lines = world.gather_object(f"rank {r}: swapped {mine.nbytes:,} bytes with rank {other} "
                                f"({args.fix or 'send then recv'}): {'ok' if ok else 'WRONG'}")
    if r == 0:
        print("\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
