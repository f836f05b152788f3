"""What each rank sends per step under ZeRO, read back from ``--trace`` files.

    python tutorials/examples/zero_traffic.py TRACE.jsonl [MORE.jsonl ...] --params PSI

For one rank and one step of each trace, the calls of the data-parallel group by operation
and phase, the bytes of the buffer each was handed (what the trace records), and the bytes
the rank sends for it with the usual algorithms on n ranks: a reduce-scatter, or an in-place
all-gather, of a B-byte buffer sends (n − 1)/n · B; an all-gather of a B-byte part,
(n − 1) · B. The total is given in units of Ψ elements, ``--params`` being Ψ.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from mpipar.trace import load_jsonl

SENT = {"reduce_scatter": lambda n: (n - 1) / n, "iallgather": lambda n: (n - 1) / n,
        "allgather": lambda n: n - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--params", type=int, required=True, help="Ψ, the model's parameters")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--step", type=int, default=1)
    args = ap.parse_args()
    print(f"{'':9} {'op':15} {'phase':10} {'calls':>5} {'buffer bytes':>13} {'sent bytes':>11}")
    totals = []
    for path in args.traces:
        records = load_jsonl(path)
        n = len({r.rank for r in records})
        dp = [r for r in records if r.rank == args.rank and r.step == args.step
              and r.group == "dp" and r.op in SENT]
        calls, nbytes, sent = Counter(), Counter(), Counter()
        for r in dp:
            key = (r.op, r.phase)
            calls[key] += 1
            nbytes[key] += r.nbytes
            sent[key] += SENT[r.op](n) * r.nbytes
        for key in sorted(calls):
            print(f"{'':9} {key[0]:15} {key[1]:10} {calls[key]:5} {nbytes[key]:13,} "
                  f"{sent[key]:11,.0f}")
        itemsize = np.dtype(dp[0].dtype).itemsize
        total = sum(sent.values()) / (args.params * itemsize)
        totals.append(total)
        print(f"{path}: rank {args.rank} sends {sum(sent.values()):,.0f} bytes in step "
              f"{args.step} = {total:.3f} Ψ over {n} ranks")
    if len(totals) == 2:
        print(f"the second sends {totals[1] / totals[0]:.3f} × what the first sends")


if __name__ == "__main__":
    main()
