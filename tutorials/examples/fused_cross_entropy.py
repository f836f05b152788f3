"""Softmax + cross-entropy as one fused op, against the same loss built from small ops.

For logits z (N rows, V classes) and targets t, with p = softmax(z) row by row,

    L = −(1/N) Σₙ log pₙ[tₙ]            and            ∂L/∂zₙ = (pₙ − onehot(tₙ)) / N.

``ops.cross_entropy`` computes exactly that in one Function. Built from small ops instead,
the same loss is a chain log_softmax → pick the target column → mean → negate, four nodes
whose backward passes each walk an (N, V) array. Built naively as log(softmax(z)), it also
breaks: a probability that underflows to 0 has log 0 = −inf, and Log's backward, g/x, then
divides 0 by 0 and sends NaN into every gradient upstream.

    python tutorials/examples/fused_cross_entropy.py
"""

from __future__ import annotations

import time

import numpy as np

from mpipar import ops
from mpipar.autograd import Tensor, topological_order


def fused(z: Tensor, t: np.ndarray) -> Tensor:
    return ops.cross_entropy(z, t)


def composed(z: Tensor, t: np.ndarray) -> Tensor:
    logp = ops.log_softmax(z, axis=-1)  # (N, V), stable: z − max − log Σ exp(z − max)
    return -(logp[np.arange(len(t)), t].mean())


def naive(z: Tensor, t: np.ndarray) -> Tensor:
    logp = ops.softmax(z, axis=-1).log()  # underflow: softmax can round to exactly 0
    return -(logp[np.arange(len(t)), t].mean())


def loss_and_grad(fn, z_value: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray, int]:
    z = Tensor(z_value.copy(), requires_grad=True)
    loss = fn(z, t)
    nodes = sum(1 for n in topological_order(loss) if n.fn is not None)
    loss.backward()
    return loss.item(), z.grad, nodes


def main() -> None:
    rng = np.random.default_rng(0)
    n, v = 256, 103  # one tiny-preset batch: 8 sequences × 32 positions, 103 characters
    z = rng.standard_normal((n, v))
    t = rng.integers(0, v, size=n)

    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(v)[t]
    expected = (p - onehot) / n  # the formula from the docstring, in plain numpy

    print(f"logits (N, V) = ({n}, {v}); uniform guessing would score ln V = {np.log(v):.4f}")
    for name, fn in (("fused", fused), ("composed", composed), ("naive", naive)):
        loss, grad, nodes = loss_and_grad(fn, z, t)
        print(f"{name:<9} loss {loss:.12f}  {nodes} graph node(s)  "
              f"max |grad − (p − onehot)/N| = {np.abs(grad - expected).max():.1e}")

    print("\nlogits ×100 (confident, as a trained model's can be):")
    for name, fn in (("fused", fused), ("composed", composed), ("naive", naive)):
        with np.errstate(divide="ignore", invalid="ignore"):
            loss, grad, _ = loss_and_grad(fn, 100 * z, t)
        bad = int(np.sum(~np.isfinite(grad)))
        print(f"{name:<9} loss {loss:.6f}  non-finite gradient entries: {bad} of {grad.size}")

    big_n, big_v = 4096, 512
    zb = rng.standard_normal((big_n, big_v))
    tb = rng.integers(0, big_v, size=big_n)
    print(f"\nforward + backward time on ({big_n}, {big_v}), best of 5:")
    for name, fn in (("fused", fused), ("composed", composed)):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            loss_and_grad(fn, zb, tb)
            best = min(best, time.perf_counter() - start)
        print(f"{name:<9} {best * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
