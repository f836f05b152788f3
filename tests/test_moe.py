"""The mixture-of-experts layer on one process (mpipar/moe.py): routing rules and gradients.

Gradients are checked against central differences in float64 (tests/gradcheck.py). The inputs
are drawn so that no routing decision lies within 1e-6 of a tie, so a finite-difference step
never changes which experts a token goes to.
"""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_gradients

from mpipar import ops
from mpipar.autograd import Tensor
from mpipar.model import GPTConfig, build_model
from mpipar.moe import MoE, capacity, route, scatter_rows, top_k_experts
from mpipar.nn import Parameter

D, E = 8, 4


def moe_layer(k: int = 2, cf: float = 1.0, coef: float = 0.01, seed: int = 0) -> MoE:
    cfg = GPTConfig(vocab_size=11, n_layer=1, n_head=2, d_model=D, seq_len=6,
                    dtype="float64", n_expert=E, moe_top_k=k, capacity_factor=cf,
                    aux_loss_coef=coef)
    layer = MoE(cfg, np.float64, proj_std=0.2)
    for i, (_, p) in enumerate(layer.named_parameters()):
        rng = np.random.default_rng([seed, i])
        p.data[...] = rng.standard_normal(p.shape) * (1.0 if p.ndim == 2 else 0.1)
    return layer


def test_capacity_formula():
    assert capacity(32, 4, 2, 1.25) == 20  # ⌈1.25 · 32 · 2 / 4⌉
    assert capacity(6, 4, 1, 1.0) == 2     # ⌈1.5⌉


def test_top_k_ties_go_to_the_lower_expert():
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]])
    assert top_k_experts(probs, 2).tolist() == [[0, 1], [1, 2]]


def test_route_priority_first_choices_in_position_order_then_second():
    """Every token prefers expert 0, then 1: with C = 2, tokens 0 and 1 keep their first
    choice, and expert 1's two slots go to tokens 0 and 1 again (second choices come after
    all first choices); tokens 2 and 3 lose both assignments."""
    probs = np.tile([0.4, 0.3, 0.2, 0.1], (4, 1))
    r = route(probs, batch=1, k=2, cap=2)
    assert r.kept.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    assert r.dropped == 4 and r.counts.tolist() == [2, 2, 0, 0]
    assert r.tokens.tolist() == [0, 1, 0, 1]  # sorted by expert, then by token
    assert np.allclose(r.load, [[0.5, 0.5, 0.0, 0.0]])  # f before capacity: 4 of 8 each


def test_route_is_per_sequence():
    """Routing two sequences together is routing each alone: a batch split between ranks or
    microbatches changes nothing."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(E), size=2 * 6)
    both = route(probs, batch=2, k=2, cap=2)
    first, second = route(probs[:6], 1, 2, 2), route(probs[6:], 1, 2, 2)
    assert both.kept.tolist() == first.kept.tolist() + second.kept.tolist()
    assert both.dropped == first.dropped + second.dropped > 0


def test_scatter_rows_gradient():
    x = Tensor(np.random.default_rng(1).standard_normal((5, 3)), requires_grad=True)
    idx = np.array([2, 0, 2, 3, 0])
    check_gradients(lambda x: scatter_rows(x, idx, 4), {"x": x}, label="scatter_rows")


@pytest.mark.parametrize("k", [1, 2])
def test_moe_layer_gradients(k):
    """dy/dx, dy/d router, dy/d every expert weight, with capacity dropping assignments.

    Without the aux term (coef 0): its gradient is injected in backward but its value is not
    in y, so finite differences of y cannot see it (the next two tests check it)."""
    layer = moe_layer(k=k, cf=1.0, coef=0.0)
    x = Tensor(np.random.default_rng(2).standard_normal((2, 6, D)), requires_grad=True)
    inputs = {"x": x, **{n.replace(".", "_"): p for n, p in layer.named_parameters()}}
    check_gradients(lambda **kw: layer(x), inputs, label=f"MoE top-{k}")
    assert layer.dropped_sum > 0  # the check covered dropped assignments


def test_aux_loss_gradient_and_uniform_minimum():
    """aux = E Σ f P: its gradient through P, and the value 1 when routing is uniform."""
    layer = moe_layer()
    x = Tensor(np.random.default_rng(4).standard_normal((2, 6, D)), requires_grad=True)

    def aux(x: Tensor, w: Parameter) -> Tensor:
        probs = ops.softmax(layer.router(ops.reshape(x, (12, D))), axis=-1)
        return layer.aux_loss(probs, route(probs.numpy(), 2, 2, 3), 2)

    check_gradients(aux, {"x": x, "w": layer.router.weight}, label="aux loss")
    uniform = Tensor(np.full((4, E), 1.0 / E))
    r = route(np.tile([0.4, 0.3, 0.2, 0.1], (4, 1)), 1, 1, 4)
    assert float(layer.aux_loss(uniform, r, 1).data) == pytest.approx(1.0)


def test_injected_aux_gradient_equals_adding_the_loss():
    """Backward through the layer (the aux term injected with seed s) gives the gradient of
    Σ y⊙R + coef·s·aux computed explicitly."""
    seed, coef = 0.25, 0.5
    x = np.random.default_rng(5).standard_normal((2, 6, D))
    r = np.random.default_rng(6).standard_normal((2, 6, D))
    injected = moe_layer(coef=coef)
    injected.grad_seed = seed
    injected(Tensor(x)).backward(r)
    plain = moe_layer(coef=0.0)
    y = plain(Tensor(x))
    probs = ops.softmax(plain.router(Tensor(x.reshape(12, D))), axis=-1)
    aux = plain.aux_loss(probs, route(probs.numpy(), 2, 2, capacity(6, E, 2, 1.0)), 2)
    (ops.sum(y * Tensor(r)) + aux * (coef * seed)).backward()
    got, want = injected.router.weight.grad, plain.router.weight.grad
    assert np.allclose(got, want, rtol=1e-12, atol=1e-15), np.max(np.abs(got - want))
    assert not np.allclose(got, 0)


def test_dense_config_unchanged_and_moe_model_gradients():
    """A dense config's dictionary has no MoE fields; a tiny MoE GPT's gradient is right."""
    assert "n_expert" not in GPTConfig().to_dict()
    cfg = GPTConfig(vocab_size=7, n_layer=1, n_head=1, d_model=4, seq_len=4,
                    dtype="float64", n_expert=2, moe_top_k=1, aux_loss_coef=0.0)
    assert cfg.to_dict()["n_expert"] == 2
    model = build_model(cfg, seed=1)
    idx = np.random.default_rng(7).integers(0, 7, (2, 4))
    params = {n: p for n, p in model.named_parameters() if "mlp" in n}
    assert any("experts.1" in n for n in params)
    check_gradients(lambda **kw: model(idx, idx), params, label="MoE GPT")


def test_bad_top_k_refused():
    with pytest.raises(ValueError, match="top 3"):
        GPTConfig(n_expert=2, moe_top_k=3)


def test_evaluation_keeps_every_assignment():
    """In eval mode capacity does not bind: a token's output is the same whatever follows it
    in its sequence (what cached generation, one token at a time, relies on)."""
    layer = moe_layer(cf=0.5)
    x = np.random.default_rng(8).standard_normal((2, 6, D))
    layer.eval()
    whole, prefix = layer(Tensor(x)).numpy(), layer(Tensor(x[:, :2].copy())).numpy()
    assert layer.dropped_sum == 0
    assert np.allclose(whole[:, :2], prefix, rtol=1e-13, atol=1e-15)
    layer.train()
    layer(Tensor(x))
    assert layer.dropped_sum > 0  # the same input drops assignments in training
