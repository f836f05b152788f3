"""float32, float16 and bfloat16 side by side, and what each does to a few numbers.

    python tutorials/examples/precision_formats.py

Prints each format's bits (sign / exponent / fraction), its largest number, its smallest
normal and subnormal numbers and the gap after 1 (the relative precision), from
``mpipar.precision.finfo``; then rounds the numbers that matter to mixed precision: a small
gradient, the same gradient times a loss scale, a large one, and a weight plus a small update.
"""

from __future__ import annotations

import numpy as np

from mpipar.precision import BFLOAT16, FLOAT16, FLOAT32, finfo

FORMATS = {"float32": FLOAT32, "float16": FLOAT16, "bfloat16": BFLOAT16}
EXAMPLES = [
    ("a gradient of 1e-8", 1e-8),
    ("the same times the loss scale 2**16", 1e-8 * 2.0**16),
    ("a gradient of 7e4", 7e4),
    ("a weight of 1 plus an update of 1e-3", 1.0 + 1e-3),
    ("a weight of 1 plus an update of 1e-4", 1.0 + 1e-4),
]


def main() -> None:
    print(f"{'format':9} {'bits':>8} {'largest':>9} {'min normal':>11} {'min subnormal':>14} "
          f"{'gap after 1':>12}")
    for name, dtype in FORMATS.items():
        f = finfo(dtype)
        bits = f"1/{f.nexp}/{f.nmant}"
        print(f"{name:9} {bits:>8} {float(f.max):9.3g} {float(f.smallest_normal):11.3g} "
              f"{float(f.smallest_subnormal):14.3g} {float(f.eps):12.3g}")
    print()
    print(f"{'value':38} " + " ".join(f"{name:>12}" for name in FORMATS))
    for label, x in EXAMPLES:
        with np.errstate(over="ignore"):  # 7e4 overflows float16 to inf, as shown
            rounded = [float(np.array(x, dtype=np.float64).astype(dtype))
                       for dtype in FORMATS.values()]
        print(f"{label:38} " + " ".join(f"{r:12.7g}" for r in rounded))


if __name__ == "__main__":
    main()
