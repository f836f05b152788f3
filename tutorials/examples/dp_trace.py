"""What data parallelism sent, read back from a ``--trace`` file.

    python tutorials/examples/dp_trace.py TRACE.jsonl [--rank 0] [--step 1] [--timeline]

Prints, for one rank and one step, the calls made in the data-parallel group, grouped by
operation, phase (backward: gradient reduction; optimizer: ZeRO's parameter all-gather) and
microbatch, with their bytes. Bytes are those of the buffer each call was handed, so for the
ring (many ``sendrecv`` calls) they are the bytes this rank actually sent. The total is also
given as a multiple of the gradient bytes, Ψ × 4 for float32, read from the start-up
broadcast of all parameters.

``--timeline`` adds, for every call, when it started and finished relative to the start of
the last microbatch's backward pass: with overlap, buckets start before backward ends.
"""

from __future__ import annotations

import argparse
from collections import Counter

from mpipar.trace import COMPUTE, load_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--timeline", action="store_true")
    args = ap.parse_args()
    records = [r for r in load_jsonl(args.trace) if r.rank == args.rank]
    grad_bytes = sum(r.nbytes for r in records if r.op == "broadcast" and r.group == "dp")
    calls = [r for r in records if r.group == "dp" and r.step == args.step
             and r.phase != "other"]

    print(f"rank {args.rank}, step {args.step}: communication in the dp group")
    print(f"{'op':<16}{'phase':<11}{'microbatch':>10}{'calls':>7}{'bytes':>12}")
    rows = Counter()
    sizes = Counter()
    for r in calls:
        key = (r.op, r.phase, "-" if r.microbatch is None else str(r.microbatch))
        rows[key] += 1
        sizes[key] += r.nbytes
    for key in sorted(rows):
        op, phase, mb = key
        print(f"{op:<16}{phase:<11}{mb:>10}{rows[key]:>7}{sizes[key]:>12,}")
    total = sum(sizes.values())
    ratio = f" = {total / grad_bytes:.3f} × the {grad_bytes:,} gradient bytes" if grad_bytes else ""
    print(f"{'total':<37}{sum(rows.values()):>7}{total:>12,}{ratio}")

    if args.timeline:
        backward = [r for r in records if r.op == COMPUTE and r.name == "backward"
                    and r.step == args.step]
        last = max(backward, key=lambda r: r.start)
        t0 = last.start
        print(f"timeline (ms from the start of microbatch {last.microbatch}'s backward, "
              f"which lasts {(last.end - t0) * 1e3:.1f} ms):")
        for r in sorted(calls, key=lambda r: r.start):
            print(f"  {r.op:<14}{r.nbytes:>10,} B  starts {(r.start - t0) * 1e3:+8.1f}"
                  f"  done {(r.end - t0) * 1e3:+8.1f}")


if __name__ == "__main__":
    main()
