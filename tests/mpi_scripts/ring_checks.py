"""``ring_allreduce`` against MPI's Allreduce: ``mpirun -n N python ring_checks.py`` (N >= 2).

Rings of every size k = 2..N are formed from ranks 0..k-1 (a sub-communicator is as good a
ring as the world). On integer-valued data every summation order gives the same floats, so
the ring result must equal MPI's bit for bit. Lengths cover divisible by k, not divisible,
shorter than k (empty chunks) and 2-D buffers. The trace must show 2(k-1) ``sendrecv`` calls
to the right neighbour carrying 2(k-1)/k of the buffer per rank. Prints a VERDICT.
"""

from __future__ import annotations

import numpy as np
from comm_checks import rank_data
from verdict import Checks

from mpipar.comm import Comm, install_excepthook
from mpipar.parallel.ring import chunk_bounds, ring_allreduce
from mpipar.trace import Tracer


def shapes_for(k: int) -> list[tuple[int, ...]]:
    """Divisible, uneven (remainder 1 and k-1), shorter than the ring, empty, and 2-D."""
    return [(5 * k,), (5 * k + 1,), (5 * k + k - 1,), (1,), (k - 1,), (0,), (3, 7), (4 * k, 3)]


def main() -> None:
    world = Comm.world()
    install_excepthook(world)
    checks = Checks(world)
    n, r = world.size, world.rank

    for k in range(2, n + 1):
        with checks.check(f"ring_of_{k}"):
            tracer = Tracer(r, enabled=True)
            member = r < k
            # Split collectively on every rank; the ones outside this ring get None.
            ring = Comm(world.mpi, "world", tracer).split(0 if member else None, r, "dp")
            cases = []
            if member:
                for dtype in (np.float64, np.float32):
                    for shape in shapes_for(k):
                        buf = rank_data(r, shape, dtype)
                        ref = ring.allreduce(buf.copy())  # MPI's answer
                        tracer.clear()
                        out = ring_allreduce(ring, buf)
                        cases.append((dtype, shape, buf, out, ref, list(tracer.records)))
            sent = [sum(t.nbytes for t in recs) for *_, recs in cases]
            all_sent = ring.allgather_object(sent) if member else []

            right = (r + 1) % k
            for i, (dtype, shape, buf, out, ref, recs) in enumerate(cases):
                what = f"k={k} {np.dtype(dtype).name} shape={shape}"
                expected = sum(rank_data(q, shape, dtype) for q in range(k))
                assert out is buf, f"{what}: must work in place"
                np.testing.assert_array_equal(ref, expected, err_msg=f"MPI, {what}")
                np.testing.assert_array_equal(buf, ref, err_msg=f"ring vs MPI, {what}")
                assert len(recs) == 2 * (k - 1), f"{what}: {len(recs)} calls"
                assert all(t.op == "sendrecv" and t.peer == right for t in recs), what
                nbytes = buf.nbytes
                if buf.size % k == 0:
                    assert sent[i] * k == 2 * (k - 1) * nbytes, f"{what}: sent {sent[i]} B"
                # Each chunk goes round the ring once per phase: n-1 sends of every chunk.
                total = sum(per_rank[i] for per_rank in all_sent)
                assert total == 2 * (k - 1) * nbytes, f"{what}: ring sent {total} B in all"

    with checks.check("ring_of_1"):
        alone = world.split(r, 0, "dp")
        buf = rank_data(r, (5,))
        assert ring_allreduce(alone, buf) is buf
        np.testing.assert_array_equal(buf, rank_data(r, (5,)))

    with checks.check("chunk_bounds"):
        for length in range(0, 12):
            for parts in range(1, 6):
                pieces = np.array_split(np.arange(length), parts)
                want = [(int(p[0]), int(p[-1]) + 1) if p.size else None for p in pieces]
                got = chunk_bounds(length, parts)
                assert len(got) == parts and got[-1][1] == length
                for (lo, hi), w, p in zip(got, want, pieces, strict=True):
                    assert hi - lo == p.size and (w is None or (lo, hi) == w), (length, parts)

    with checks.check("non_contiguous_rejected"):
        try:
            ring_allreduce(world, np.ones((4, 4))[:, 0])
        except ValueError as e:
            assert "C-contiguous" in str(e)
        else:
            raise AssertionError("a strided view would have been reduced into a copy")

    checks.report()


if __name__ == "__main__":
    main()
