"""Bytes per parameter and the loss scale of runs, read back from their ``--metrics`` files.

    python tutorials/examples/precision_report.py METRICS.jsonl [MORE.jsonl ...]

For each file: the parameters, gradients and optimizer state rank 0 keeps (the summary
line's ``memory_per_rank``), in bytes per parameter; and for an fp16 run, the loss scale of
the first step, every step that was skipped, and the scale the run ended with.
"""

from __future__ import annotations

import argparse
import json


def read(path: str) -> tuple[list[dict], dict]:
    """The step lines and the summary line of a metrics file."""
    steps, summary = [], {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("event") == "summary":
                summary = record
            elif "loss" in record:
                steps.append(record)
    return steps, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", nargs="+")
    args = ap.parse_args()
    for path in args.metrics:
        steps, summary = read(path)
        n = summary["memory_rank0"]["params"]
        mem = summary["memory_per_rank"][0]
        parts = {k: mem[k] / n for k in ("parameters", "gradients", "optimizer_state")}
        print(f"{path}: {n:,} parameters; bytes per parameter: "
              + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in parts.items())
              + f"; total {sum(parts.values()):g}")
        if "loss_scale" not in steps[0]:
            continue
        skipped = [s["step"] for s in steps if s["skipped"]]
        last = steps[-1]["loss_scale"] / (2 if steps[-1]["skipped"] else 1)
        print(f"  loss scale {steps[0]['loss_scale']:g} at step {steps[0]['step']}; "
              f"skipped steps: {skipped or 'none'}; scale at the end {last:g}")


if __name__ == "__main__":
    main()
