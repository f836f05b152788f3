"""Are two runs the same training run, to a tolerance? Losses and gradient norms, step by step.

    python tutorials/examples/compare_runs.py REFERENCE.jsonl OTHER.jsonl [--tol 1e-10]

The files are ``--metrics`` outputs of ``train.py``. In float64 every parallel layout must
reproduce the 1-process run to about 1e-10 relative (docs/design.md §5): both the loss, which
shows a wrong gradient one step later, and the gradient norm, which shows it at once (and is
the only sign of an element counted twice in the norm itself). Prints the first steps of
both columns, the largest relative difference of each, and one verdict line. Exits 0 when
both agree within ``--tol``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json

FIELDS = ("loss", "grad_norm")


def steps(path: str) -> dict[int, dict]:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in records if "loss" in r and "step" in r}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--tol", type=float, default=1e-10)
    args = ap.parse_args()
    ref, other = steps(args.reference), steps(args.other)
    common = sorted(set(ref) & set(other))
    if not common:
        print("no common steps")
        return 1
    print(f"{'step':>5} {'loss':>19} {'other':>19} {'grad norm':>19} {'other':>19}")
    worst = dict.fromkeys(FIELDS, 0.0)
    for s in common:
        a, b = ref[s], other[s]
        for field in FIELDS:
            worst[field] = max(worst[field], abs(b[field] - a[field]) / abs(a[field]))
        print(f"{s:>5} {a['loss']:>19.15f} {b['loss']:>19.15f} {a['grad_norm']:>19.15f} "
              f"{b['grad_norm']:>19.15f}")
    same = all(w <= args.tol for w in worst.values())
    print(f"{'same run' if same else 'DIFFERENT'}: largest relative difference "
          f"{worst['loss']:.1e} in the loss, {worst['grad_norm']:.1e} in the gradient norm, "
          f"over {len(common)} steps (tolerance {args.tol:g})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
