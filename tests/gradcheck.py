"""Central-difference gradient checking in float64, shared by the op, autograd and model tests.

``check_gradients`` compares the gradient that ``backward`` computes with one estimated from
function values alone, element by element, for every input that requires a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from mpipar.autograd import Tensor, no_grad
from mpipar.backend import array_module, to_numpy


def _projected(out: Tensor, r: np.ndarray, label: str) -> float:
    """L = Σ out ⊙ R, computed in numpy (no autograd), refusing non-finite outputs."""
    data = np.asarray(out.numpy(), dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise AssertionError(
            f"{label}: output has {int(np.sum(~np.isfinite(data)))} non-finite values; "
            f"finite differences need a finite output (check -inf/nan separately)"
        )
    return float(np.sum(data * r))


def check_gradients(
    fn: Callable[..., Tensor],
    inputs: dict[str, Tensor],
    *,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    label: str,
    seed: int = 0,
) -> None:
    """Check dL/dx of ``fn(**inputs)`` against central differences, for every element.

    The output y = fn(**inputs) may have any shape. It is reduced to the scalar
    L = Σ y ⊙ R with a fixed random projection R (standard normal, scaled by 1/√(y.size)),
    so every output element influences L with a non-zero, unrelated weight: an error in
    any direction of the Jacobian shows up, not only in the direction of y's plain sum.
    The analytic gradient comes from ``y.backward(R)``, i.e. dL/dy = R. The numeric one,
    for each element x_i of each input that requires a gradient, is

        (L(x_i + eps) − L(x_i − eps)) / (2·eps),

    evaluated under ``no_grad`` with the input's array perturbed in place (so ``fn`` may close
    over Parameters, as a whole model does, and ignore its keyword arguments).

    Tolerances, in float64 (unit roundoff u ≈ 1.1e-16):
      * truncation: the central difference is exact up to eps²·L'''/6 ≈ 1e-13·|L'''|;
      * roundoff: each evaluation of L is off by a few ulps of its magnitude (R's 1/√n scale
        keeps L of order 1 whatever the output size), and the difference divides that by
        2·eps, giving ≈ (10 u)/(2e-6) ≈ 1e-9 even after a chain of a dozen ops.
      eps = 1e-6 sits near the optimum u^(1/3) ≈ 5e-6 where both terms are small, so the
      numeric estimate is good to ~1e-9. An element passes when
      |analytic − numeric| ≤ atol + rtol·max(|analytic|, |numeric|): atol = 1e-8 is an order
      above that noise (for gradients near zero), and rtol = 1e-5 still catches every real
      bug, which (a wrong sign, factor or missing term) is off by a large fraction of the
      gradient itself.

    ``fn`` must not modify its inputs; that is checked too. Raises ``AssertionError`` naming
    ``label``, the input, the index and the analytic, numeric and error values of the worst
    element (and how many elements failed).
    """
    checked = {name: t for name, t in inputs.items() if t.requires_grad}
    if not checked:
        raise ValueError(f"{label}: no input requires a gradient, nothing to check")
    for name, t in checked.items():
        if t.dtype != np.float64:
            raise TypeError(f"{label}: input {name!r} is {t.dtype}; gradient checks need float64")
    before = {name: t.numpy().copy() for name, t in inputs.items()}

    for t in checked.values():
        t.grad = None
    out = fn(**inputs)
    if not out.requires_grad:
        raise AssertionError(f"{label}: the output does not require a gradient")
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(out.shape) / math.sqrt(max(out.size, 1))
    _projected(out, r, label)  # refuse a non-finite output before anything else
    out.backward(array_module(out.data).asarray(r.astype(out.dtype)))  # on out's device

    for name, t in inputs.items():
        if not np.array_equal(t.numpy(), before[name]):
            raise AssertionError(f"{label}: fn modified its input {name!r} in place")

    for name, t in checked.items():
        analytic = (np.zeros(t.shape) if t.grad is None
                    else np.asarray(to_numpy(t.grad), dtype=np.float64))
        if analytic.shape != t.shape:
            raise AssertionError(
                f"{label}: gradient of {name!r} has shape {analytic.shape}, input {t.shape}"
            )
        numeric = np.empty(t.shape)
        for i in range(t.size):
            index = np.unravel_index(i, t.shape) if t.shape else ()
            orig = t.data[index]
            with no_grad():
                t.data[index] = orig + eps
                plus = _projected(fn(**inputs), r, label)
                t.data[index] = orig - eps
                minus = _projected(fn(**inputs), r, label)
                t.data[index] = orig
            numeric[index] = (plus - minus) / (2.0 * eps)
        err = np.abs(analytic - numeric)
        tol = atol + rtol * np.maximum(np.abs(analytic), np.abs(numeric))
        bad = err > tol
        if np.any(bad):
            worst = np.unravel_index(int(np.argmax(np.where(bad, err - tol, -np.inf))), t.shape)
            raise AssertionError(
                f"{label}: d/d{name}{list(int(j) for j in worst)}: analytic "
                f"{analytic[worst]:.10g}, numeric {numeric[worst]:.10g}, error "
                f"{err[worst]:.3g} > tolerance {tol[worst]:.3g} (atol {atol:g}, rtol {rtol:g}); "
                f"{int(bad.sum())} of {t.size} elements of {name!r} differ"
            )
