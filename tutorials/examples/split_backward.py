"""A Linear layer's backward in two halves, as a zero-bubble pipeline runs it (chapter 8c).

    y = x Wᵀ + b          x (rows, in), W (out, in), b (out,)
    B (now):   dx = dy W                  what the previous stage waits for
    W (later): dW = dyᵀ x,  db = Σ_rows dy  what nobody waits for until the optimizer

Runs ``mpipar.nn.Linear`` once with an ordinary backward and once inside
``defer_weight_grads`` (B), then ``WeightGradients.run`` (W), and prints what each half
produced and the largest difference from the ordinary backward (float64).
"""

from __future__ import annotations

import numpy as np

from mpipar.autograd import Tensor, WeightGradients, defer_weight_grads
from mpipar.nn import Linear


def make(seed: int = 0) -> tuple[Linear, Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    layer = Linear(4, 3, dtype=np.float64)
    layer.weight.data[...] = rng.normal(size=(3, 4))
    layer.bias.data[...] = rng.normal(size=3)
    x = Tensor(rng.normal(size=(5, 4)), requires_grad=True)
    return layer, x, rng.normal(size=(5, 3))  # dy: (rows, out)


def main() -> None:
    layer, x, dy = make()
    layer(x).backward(dy)  # the ordinary backward: everything at once
    fused = (x.grad.copy(), layer.weight.grad.copy(), layer.bias.grad.copy())

    layer, x, dy = make()
    store = WeightGradients()
    with defer_weight_grads(store):
        layer(x).backward(dy)  # B
    print(f"after B: dx {x.grad.shape}, dW {layer.weight.grad}, db {layer.bias.grad}, "
          f"{len(store)} op kept for W")
    kept = sum(a.nbytes for a in store.saved_arrays())
    print(f"kept for W: {kept} bytes (x {x.data.nbytes}, W {layer.weight.data.nbytes}, "
          f"dy {dy.nbytes})")
    store.run()  # W
    print(f"after W: dW {layer.weight.grad.shape}, db {layer.bias.grad.shape}")
    split = (x.grad, layer.weight.grad, layer.bias.grad)
    for name, a, b in zip(("dx", "dW", "db"), fused, split, strict=True):
        print(f"{name}: largest difference from the one-piece backward {np.abs(a - b).max():.1e}")


if __name__ == "__main__":
    main()
