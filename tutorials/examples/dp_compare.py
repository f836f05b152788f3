"""Are two runs the same training run? Compare the losses of two ``--metrics`` files.

    python tutorials/examples/dp_compare.py REFERENCE.jsonl OTHER.jsonl [--tol 1e-10]

Prints both loss curves side by side and the largest relative difference, then one verdict
line. Data parallelism only reorders floating-point sums (a sum over the shards instead of
one sum over the batch), so in float64 two layouts agree to ~1e-13, far inside 1e-10; a bug
(a missing division by dp, a shard taken twice) shows up as differences of 1e-3 and more.
Exits 0 when the runs agree within ``--tol``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json


def losses(path: str) -> dict[int, float]:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--tol", type=float, default=1e-10)
    args = ap.parse_args()
    ref, other = losses(args.reference), losses(args.other)
    steps = sorted(set(ref) & set(other))
    if not steps:
        print("no common steps")
        return 1
    print(f"{'step':>5} {'reference':>20} {'other':>20} {'rel. diff':>10}")
    worst = 0.0
    for s in steps:
        rel = abs(other[s] - ref[s]) / abs(ref[s])
        worst = max(worst, rel)
        print(f"{s:>5} {ref[s]:>20.15f} {other[s]:>20.15f} {rel:>10.1e}")
    same = worst <= args.tol
    print(f"{'same run' if same else 'DIFFERENT'}: largest relative difference {worst:.1e} "
          f"over {len(steps)} steps ({'<=' if same else '>'} {args.tol:g})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
