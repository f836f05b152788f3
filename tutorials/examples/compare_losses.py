"""Compare the step-by-step metrics of two runs, e.g. one run against a stopped-and-resumed one.

    python tutorials/examples/compare_losses.py REFERENCE.jsonl OTHER.jsonl [MORE.jsonl ...]

The files are ``--metrics`` outputs of ``train.py``. The step lines of OTHER and MORE are read
in order (a run stopped with ``--stop-at`` and its ``--resume`` continuation together cover
the same steps as one uninterrupted run). For every step in both, ``loss``, ``lr`` and
``grad_norm`` are compared, and ``val_loss`` wherever both runs evaluated. Exits 0 when
every number is identical, 1 otherwise, naming the first difference.
"""

from __future__ import annotations

import argparse
import json

FIELDS = ("loss", "lr", "grad_norm")


def read(paths: list[str]) -> tuple[dict[int, dict], dict[int, float]]:
    """Training lines by step, and validation losses by step, from one or more files."""
    steps: dict[int, dict] = {}
    evals: dict[int, float] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if "val_loss" in record:
                    evals[record["step"]] = record["val_loss"]
                elif "loss" in record:
                    steps[record["step"]] = record
    return steps, evals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("others", nargs="+")
    args = ap.parse_args()
    ref_steps, ref_evals = read([args.reference])
    steps, evals = read(args.others)

    common = sorted(set(ref_steps) & set(steps))
    if not common:
        print("no step appears in both runs")
        return 1
    differences = []
    for s in common:
        for field in FIELDS:
            a, b = ref_steps[s][field], steps[s][field]
            if a != b:
                differences.append(f"step {s} {field}: {a!r} vs {b!r} ({abs(a - b):.3g} apart)")
    common_evals = sorted(set(ref_evals) & set(evals))
    for s in common_evals:
        if ref_evals[s] != evals[s]:
            differences.append(f"step {s} val_loss: {ref_evals[s]!r} vs {evals[s]!r}")

    print(f"compared steps {common[0]}..{common[-1]} ({len(common)} steps) and "
          f"{len(common_evals)} evaluation(s)")
    print(f"step {common[0]}: loss {ref_steps[common[0]]['loss']:.6f}   "
          f"step {common[-1]}: loss {ref_steps[common[-1]]['loss']:.6f}")
    if differences:
        print(f"{len(differences)} difference(s); first: {differences[0]}")
        return 1
    print(f"identical: every {', '.join(FIELDS)} and val_loss matches bit for bit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
