"""Gradient descent on the smallest model there is: a straight line y = w·x + b.

The loss is the mean squared error over N points,

    J(w, b) = (1/N) Σᵢ (w·xᵢ + b − yᵢ)²,

and every step applies the update rule θ ← θ − α ∇J(θ) to both parameters. The gradient
comes from mpipar's autograd (``J.backward()``), not from a formula written here; at the end
the result is compared with the exact least-squares line.

For this J the step size has a hard limit. Along the parameter direction where J curves most
(curvature λ_max, the largest eigenvalue of its Hessian), one step multiplies the error by
(1 − α·λ_max); when α > 2/λ_max that factor is below −1 and the error grows every step. Here
the inputs are drawn so that λ_max ≈ 2, so α above ≈ 1 diverges: try ``--lr 1.05``.

    python tutorials/examples/gradient_descent.py [--lr 0.5] [--steps 40]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from mpipar.autograd import Tensor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=0.5, help="step size α")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()

    # 64 noisy points around the line y = 3x − 1, with x in [−1, 1].
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size=64)
    y = 3.0 * x - 1.0 + 0.1 * rng.standard_normal(64)
    xt, yt = Tensor(x), Tensor(y)  # data: no gradient wanted

    w = Tensor(np.array(0.0), requires_grad=True, name="w")
    b = Tensor(np.array(0.0), requires_grad=True, name="b")
    # J is quadratic, so its Hessian is constant: 2·[[mean x², mean x], [mean x, 1]].
    hessian = 2.0 * np.array([[np.mean(x * x), np.mean(x)], [np.mean(x), 1.0]])
    lam_min, lam_max = np.linalg.eigvalsh(hessian)
    print(f"curvatures λ = {lam_min:.3f}, {lam_max:.3f}: α must stay below 2/λ_max = "
          f"{2.0 / lam_max:.3f}; this run has α = {args.lr}")
    first = None

    for step in range(args.steps + 1):
        residual = w * xt + b - yt  # (N,): w and b are broadcast over the points
        loss = (residual * residual).mean()  # J(w, b), a scalar
        loss.backward()  # fills w.grad = ∂J/∂w and b.grad = ∂J/∂b
        if step % 10 == 0:
            print(f"step {step:3d}  J = {loss.item():10.6f}  w = {w.item():8.4f}  "
                  f"b = {b.item():8.4f}  ∂J/∂w = {float(w.grad):10.3e}  "
                  f"∂J/∂b = {float(b.grad):10.3e}")
        first = loss.item() if first is None else first
        # The update rule. It changes the arrays in place, outside any graph.
        w.data -= args.lr * w.grad
        b.data -= args.lr * b.grad
        # Leaves *accumulate* gradients across backward calls, so clear them for the next step.
        w.grad = None
        b.grad = None

    w_best, b_best = np.polyfit(x, y, 1)  # the exact least-squares line
    print(f"gradient descent: w = {w.item():.4f}, b = {b.item():.4f}")
    print(f"least squares:    w = {w_best:.4f}, b = {b_best:.4f}")
    if not math.isfinite(loss.item()) or loss.item() > first:
        print(f"diverged: J grew from {first:.3g} to {loss.item():.3g} because "
              f"α·λ_max = {args.lr * lam_max:.2f} > 2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
