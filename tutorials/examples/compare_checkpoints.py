"""Do two checkpoints hold the same model and optimizer state, to a tolerance?

    python tutorials/examples/compare_checkpoints.py REFERENCE_DIR OTHER_DIR [--tol 1e-10]

Checkpoints hold full, 1-process-shaped arrays whatever layout wrote them (docs/design.md
§8), so a run that changed layouts on the way can be compared array by array with one that
never stopped. For each array the difference is relative to the array's size,
max|a − b| / max|a|, which stays meaningful for arrays with elements near zero (AdamW's first
moments). Prints the step of each, the largest difference among the parameters
(``model.*``) and among the optimizer state (``optim.*``) with the array it is in, and one
verdict line. Exits 0 when both are within ``--tol`` and the two hold the same arrays at the
same step, 1 otherwise.
"""

from __future__ import annotations

import argparse

import numpy as np

from mpipar.checkpoint import load_checkpoint


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max|a − b| / max|a| (0 for two all-zero arrays; inf for different shapes)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def worst(ref: dict[str, np.ndarray], other: dict[str, np.ndarray],
          prefix: str) -> tuple[float, str, int]:
    """The largest difference over the arrays named ``prefix*``, its array, and their count."""
    names = [n for n in ref if n.startswith(prefix)]
    diffs = {n: relative_difference(ref[n], other[n]) for n in names}
    name = max(diffs, key=diffs.__getitem__) if diffs else "-"
    return (diffs[name] if diffs else 0.0), name, len(names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--tol", type=float, default=1e-10)
    args = ap.parse_args()
    ref, ref_meta = load_checkpoint(args.reference)
    other, other_meta = load_checkpoint(args.other)
    print(f"{args.reference}: step {ref_meta['step']}, saved by {layout(ref_meta)}; "
          f"{args.other}: step {other_meta['step']}, saved by {layout(other_meta)}")
    if set(ref) != set(other) or ref_meta["step"] != other_meta["step"]:
        print(f"DIFFERENT: {len(set(ref) ^ set(other))} array(s) in only one of them, "
              f"steps {ref_meta['step']} and {other_meta['step']}")
        return 1
    model = worst(ref, other, "model.")
    optim = worst(ref, other, "optim.")
    for label, (diff, name, count) in (("parameters", model), ("optimizer state", optim)):
        print(f"{label}: {count} arrays, largest relative difference {diff:.1e} ({name})")
    same = max(model[0], optim[0]) <= args.tol
    print(f"{'same state' if same else 'DIFFERENT'}: largest relative difference "
          f"{model[0]:.1e} in the parameters, {optim[0]:.1e} in the optimizer state "
          f"(tolerance {args.tol:g})")
    return 0 if same else 1


def layout(meta: dict) -> str:
    """``dp 2 × tp 2 × pp 1`` from a checkpoint's ``layout``."""
    lay = meta.get("layout", {})
    return " × ".join(f"{k} {lay.get(k, 1)}" for k in ("dp", "tp", "pp"))


if __name__ == "__main__":
    raise SystemExit(main())
