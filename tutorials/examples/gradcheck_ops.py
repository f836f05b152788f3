"""Check backward against central differences, for single ops and for a whole (small) GPT.

For an output y = f(x) of any shape, fix a random R shaped like y and check the scalar
L = Σ y ⊙ R. Its gradient from autograd is ``y.backward(R)``; numerically, for every
element xᵢ of every input,

    ∂L/∂xᵢ ≈ (L(x + ε·eᵢ) − L(x − ε·eᵢ)) / (2ε),

whose error is O(ε²) from truncation plus O(u/ε) from rounding (u ≈ 1e-16 in float64);
ε = 1e-6 balances the two at about 1e-10 relative. A random R (rather than R = 1, i.e.
L = Σ y) makes every output element count with a different weight, so a backward that is
wrong in any direction of the Jacobian shows up. All arrays are float64: in float32 rounding
alone would be ~1e-3 and real bugs could hide in it.

``--broken`` swaps in a GELU whose backward forgets one term of the product rule, to show
what a failure looks like (the script then exits 1).

    python tutorials/examples/gradcheck_ops.py [--broken]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from mpipar import fused, ops
from mpipar.autograd import Function, Tensor, no_grad
from mpipar.model import GPT, GPTConfig

EPS = 1e-6
TOLERANCE = 1e-6  # max |analytic − numeric| relative to max |numeric|; float64 gives ~1e-9


def gradient_error(fn: Callable[[], Tensor], inputs: dict[str, Tensor],
                   rng: np.random.Generator, per_input: int | None = None) -> tuple[float, str]:
    """The worst relative error over all inputs, and where it occurred.

    ``per_input`` limits the check to that many random elements of each input (two forward
    passes per element add up quickly for a whole model); ``None`` checks every element.
    """
    out = fn()
    r = rng.standard_normal(out.shape)
    for t in inputs.values():
        t.grad = None
    out.backward(r)
    worst, where = 0.0, ""
    for name, t in inputs.items():
        numeric = t.grad.copy()  # elements left unchecked compare equal
        elements = list(np.ndindex(t.shape))
        if per_input is not None and len(elements) > per_input:
            elements = [elements[k] for k in rng.choice(len(elements), per_input, False)]
        for i in elements:
            original = t.data[i]
            with no_grad():
                t.data[i] = original + EPS
                plus = float(np.sum(fn().data * r))
                t.data[i] = original - EPS
                minus = float(np.sum(fn().data * r))
            t.data[i] = original
            numeric[i] = (plus - minus) / (2 * EPS)
        error = np.abs(t.grad - numeric)
        relative = error.max() / max(np.abs(numeric).max(), 1e-12)
        if relative >= worst:
            i = np.unravel_index(int(error.argmax()), t.shape)
            worst = relative
            where = (f"d/d{name}{list(map(int, i))}: autograd {t.grad[i]:.8f}, "
                     f"numeric {numeric[i]:.8f}")
    return worst, where


class ForgetfulGelu(Function):
    """GELU with a buggy backward: keeps ½(1 + tanh u) and drops the ½x·tanh′(u)·u′ term."""

    @staticmethod
    def forward(ctx, x):
        t = np.tanh(fused.GELU_C * (x + fused.GELU_K * x**3))
        ctx.save_for_backward(t)
        return 0.5 * x * (1.0 + t)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved
        return (g * 0.5 * (1.0 + t),)


def cases(rng: np.random.Generator, broken: bool):
    """(label, fn, inputs, elements per input) for each check; inputs are float64 leaves."""
    def leaf(*shape: int) -> Tensor:
        return Tensor(rng.standard_normal(shape), requires_grad=True)

    x = leaf(3, 5)
    yield "tanh", lambda: x.tanh(), {"x": x}, None
    gelu = ForgetfulGelu.apply if broken else ops.gelu
    yield "gelu" + (" (broken)" if broken else ""), lambda: gelu(x), {"x": x}, None
    a, w, b = leaf(2, 3, 4), leaf(5, 4), leaf(5)
    yield "linear", lambda: ops.linear(a, w, b), {"x": a, "W": w, "b": b}, None
    gamma, beta = leaf(4), leaf(4)
    yield ("layer_norm", lambda: ops.layer_norm(a, gamma, beta),
           {"x": a, "γ": gamma, "β": beta}, None)
    logits, targets = leaf(6, 7), rng.integers(0, 7, size=6)
    yield "cross_entropy", lambda: ops.cross_entropy(logits, targets), {"logits": logits}, None
    qkv = leaf(2, 5, 3 * 8)  # B=2, T=5, two heads of size 4
    yield "causal_attention", lambda: ops.causal_attention(qkv, 2), {"qkv": qkv}, None

    cfg = GPTConfig(vocab_size=11, n_layer=2, n_head=2, d_model=8, seq_len=6, dtype="float64")
    model = GPT(cfg)
    model.initialize(seed=0)
    for p in model.parameters():  # larger than the GPT-2 init so no gradient is ~0
        p.data += 0.3 * rng.standard_normal(p.shape)
    idx, tgt = rng.integers(0, 11, size=(2, 6)), rng.integers(0, 11, size=(2, 6))
    n = len(list(model.named_parameters()))
    yield (f"GPT: 8 elements of each of {n} tensors", lambda: model(idx, tgt),
           dict(model.named_parameters()), 8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broken", action="store_true", help="check a GELU with a wrong backward")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    failed = 0
    for label, fn, inputs, per_input in cases(rng, args.broken):
        error, where = gradient_error(fn, inputs, rng, per_input)
        ok = error < TOLERANCE
        failed += not ok
        print(f"{label:<38} max relative error {error:.1e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            print(f"    worst element {where}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
