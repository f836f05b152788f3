"""Backpropagation by hand and by mpipar's autograd, on a graph small enough to read.

    z = w·x + b        y = tanh(z)        L = y·y + w

``w`` is used twice (in z and in L), so its gradient is the *sum* of two paths:

    ∂L/∂y = 2y
    ∂L/∂z = ∂L/∂y · (1 − y²)                  (tanh′ = 1 − tanh²)
    ∂L/∂x = ∂L/∂z · w
    ∂L/∂b = ∂L/∂z · 1
    ∂L/∂w = ∂L/∂z · x  +  1                   (path through z, plus the direct use in L)

The script prints the graph in the order ``backward`` visits it, the gradients from
``L.backward()`` next to the ones above, and then three more behaviours of the engine:
broadcasting, accumulation over two backward passes, and ``no_grad``.

    python tutorials/examples/scalar_backprop.py
"""

from __future__ import annotations

import numpy as np

from mpipar.autograd import Tensor, no_grad, topological_order


def leaf(value: float, name: str) -> Tensor:
    """A scalar we want the gradient of (a 0-d float64 array)."""
    return Tensor(np.array(value), requires_grad=True, name=name)


def graph_and_gradients() -> None:
    x, w, b = leaf(1.5, "x"), leaf(-0.5, "w"), leaf(0.25, "b")
    wx = w * x
    z = wx + b
    y = z.tanh()
    yy = y * y
    loss = yy + w
    for t, name in ((wx, "wx"), (z, "z"), (y, "y"), (yy, "yy"), (loss, "L")):
        t.name = name

    print("graph in reverse topological order (the order backward applies the chain rule):")
    for t in reversed(topological_order(loss)):
        made_by = t.fn.__name__ if t.fn is not None else "leaf"
        inputs = ", ".join(p.name for p in t.parents)
        print(f"  {t.name:>2} = {made_by}({inputs})" if inputs else f"  {t.name:>2}   {made_by}")

    # By hand, from the chain rule in the docstring.
    yv = np.tanh(w.item() * x.item() + b.item())
    dz = 2 * yv * (1 - yv * yv)
    by_hand = {"x": dz * w.item(), "w": dz * x.item() + 1.0, "b": dz}

    loss.backward()  # dL/dL = 1 flows back through every node
    print(f"\nL = {loss.item():.6f}")
    print("      autograd      by hand")
    for t in (x, w, b):
        print(f"dL/d{t.name}  {float(t.grad):+.9f}  {by_hand[t.name]:+.9f}")


def broadcasting() -> None:
    # A bias of shape (1, 4) is added to every row of a (3, 4) matrix. In the graph it was
    # copied 3 times, so its gradient sums the 3 rows' gradients (ops.unbroadcast).
    h = Tensor(np.arange(12.0).reshape(3, 4), requires_grad=True)
    bias = Tensor(np.zeros((1, 4)), requires_grad=True)
    out = (h + bias) * 2.0  # (3, 4)
    out.sum().backward()
    print(f"\nbroadcasting: bias {bias.shape} added to h {h.shape}: "
          f"dL/dbias = {bias.grad.tolist()} (3 rows × 2)")


def accumulation() -> None:
    # Leaves add every backward pass into .grad; that is how microbatches accumulate.
    w = leaf(3.0, "w")
    for k in (1, 2):
        (w * w).backward()  # d(w²)/dw = 2w = 6
        print(f"accumulation: after backward pass {k}, w.grad = {float(w.grad)}")


def without_grad() -> None:
    w = leaf(3.0, "w")
    with no_grad():
        y = w * w  # computed, but no graph is recorded
    print(f"no_grad: y = {y.item()}, y.requires_grad = {y.requires_grad}")


if __name__ == "__main__":
    graph_and_gradients()
    broadcasting()
    accumulation()
    without_grad()
