"""Optimizers against hand-written references, the LR schedule, and gradient clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from mpipar.optim import (
    SGD,
    AdamW,
    adamw_update,
    clip_grad_norm,
    decay_mask,
    grad_norm_sq,
    lr_at,
    sgd_update,
    state_key_param_name,
)


@dataclass
class P:
    """The parameter protocol the optimizers rely on: data, grad, name."""

    data: np.ndarray
    grad: np.ndarray | None
    name: str


def _params(seed: int = 0, dtype=np.float64) -> list[P]:
    """A matrix (decayed), a bias and a gain (not decayed), with random gradients."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (4, 3), "b": (3,), "ln.g": (5,)}
    return [
        P(rng.standard_normal(s).astype(dtype), rng.standard_normal(s).astype(dtype), n)
        for n, s in shapes.items()
    ]


def _grads(params: list[P], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for p in params:
        p.grad = rng.standard_normal(p.data.shape).astype(p.data.dtype)


def _copy(params: list[P]) -> list[P]:
    return [P(p.data.copy(), None if p.grad is None else p.grad.copy(), p.name) for p in params]


# --------------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------------


def test_sgd_update_is_exactly_theta_minus_lr_grad():
    rng = np.random.default_rng(0)
    theta, g = rng.standard_normal(50), rng.standard_normal(50)
    expected = theta - 0.1 * g
    sgd_update(theta, g, 0.1)
    np.testing.assert_array_equal(theta, expected)


def test_sgd_momentum_matches_reference_over_steps():
    params = _params()
    ref = {p.name: p.data.copy() for p in params}
    buf = {p.name: np.zeros_like(p.data) for p in params}
    opt = SGD(params, lr=0.05, momentum=0.9)
    for step in range(4):
        _grads(params, seed=10 + step)
        for p in params:
            buf[p.name] = 0.9 * buf[p.name] + p.grad
            ref[p.name] = ref[p.name] - 0.05 * buf[p.name]
        opt.step()
    for p in params:
        np.testing.assert_allclose(p.data, ref[p.name], rtol=0, atol=1e-15, err_msg=p.name)


def test_sgd_weight_decay_without_momentum_is_l2():
    theta = np.array([1.0, -2.0, 3.0])
    g = np.array([0.5, 0.5, -1.0])
    expected = theta - 0.1 * (g + 0.01 * theta)
    sgd_update(theta, g, 0.1, weight_decay=0.01)
    np.testing.assert_allclose(theta, expected, rtol=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_decays_what_adamw_decays(momentum):
    """One weight-decay rule for both optimizers (decay_mask): with zero gradients the only
    change is the decay, θ ← (1 − αλ)θ on the matrix, and nothing on the bias and gain."""
    params = _params(seed=5)
    for p in params:
        p.grad = np.zeros_like(p.data)
    before = _copy(params)
    SGD(params, lr=0.1, momentum=momentum, weight_decay=0.5).step()
    adamw = _copy(before)
    for p in adamw:
        p.grad = np.zeros_like(p.data)
    AdamW(adamw, lr=0.1, weight_decay=0.5).step()
    for p, q, old in zip(params, adamw, before, strict=True):
        factor = 1.0 - 0.1 * 0.5 if decay_mask(old) else 1.0
        np.testing.assert_allclose(p.data, factor * old.data, rtol=1e-15, err_msg=p.name)
        np.testing.assert_allclose(q.data, factor * old.data, rtol=1e-15, err_msg=p.name)
    assert [decay_mask(p) for p in params] == [True, False, False]


def test_sgd_skips_params_without_grad_and_zero_grad_clears():
    params = _params()
    params[1].grad = None
    before = params[1].data.copy()
    opt = SGD(params, lr=0.1)
    opt.step(lr=0.2)  # the override is used for this step
    np.testing.assert_array_equal(params[1].data, before)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    opt.step()  # nothing to do, nothing fails


def test_sgd_state_dict_round_trip_resumes_exactly():
    a = _params()
    b = _copy(a)
    opt_a = SGD(a, lr=0.1, momentum=0.8)
    for s in range(4):
        _grads(a, s)
        opt_a.step()
    opt_b = SGD(b, lr=0.1, momentum=0.8)
    for s in range(2):
        _grads(b, s)
        opt_b.step()
    state = opt_b.state_dict()
    assert sorted(state) == ["sgd.momentum.b", "sgd.momentum.ln.g", "sgd.momentum.w"]
    opt_c = SGD(b, lr=0.1, momentum=0.8)
    opt_c.load_state_dict(state)
    for s in range(2, 4):
        _grads(b, s)
        opt_c.step()
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=pa.name)


# --------------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------------


def _adamw_reference(theta, grads, *, lr, b1, b2, eps, wd):
    """Textbook AdamW in float64, written independently of the implementation."""
    theta = theta.copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        theta = theta - lr * wd * theta
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def test_adamw_matches_reference_and_decays_only_matrices():
    params = _params()
    start = {p.name: p.data.copy() for p in params}
    grads: dict[str, list[np.ndarray]] = {p.name: [] for p in params}
    lrs = [1e-2, 3e-2, 2e-2, 5e-3, 1e-2]
    opt = AdamW(params, lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step, lr in enumerate(lrs):
        _grads(params, seed=100 + step)
        for p in params:
            grads[p.name].append(p.grad.copy())
        opt.step(lr=lr)
    assert opt.step_count == len(lrs)
    for p in params:
        wd = 0.1 if p.name == "w" else 0.0
        # Per-step lrs: replay the reference one step at a time with its own state.
        theta, m, v = start[p.name].copy(), 0.0, 0.0
        for t, (g, lr) in enumerate(zip(grads[p.name], lrs, strict=True), start=1):
            m = 0.9 * m + 0.1 * g
            v = 0.95 * v + 0.05 * g * g
            theta = theta - lr * wd * theta
            theta = theta - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.95**t)) + 1e-8)
        np.testing.assert_allclose(p.data, theta, rtol=0, atol=1e-14, err_msg=p.name)


def test_adamw_update_function_matches_reference_constant_lr():
    rng = np.random.default_rng(1)
    theta0 = rng.standard_normal(30)
    grads = [rng.standard_normal(30) for _ in range(6)]
    hp = dict(lr=3e-3, b1=0.8, b2=0.99, eps=1e-6, wd=0.05)
    expected = _adamw_reference(theta0, grads, **hp)
    p, m, v = theta0.copy(), np.zeros(30), np.zeros(30)
    for t, g in enumerate(grads, start=1):
        adamw_update(
            p, g, m, v, lr=hp["lr"], beta1=hp["b1"], beta2=hp["b2"], eps=hp["eps"],
            weight_decay=hp["wd"], step=t,
        )  # fmt: skip
    np.testing.assert_allclose(p, expected, rtol=0, atol=1e-14)


def test_adamw_flat_shard_with_decay_array_equals_per_parameter_updates():
    # A ZeRO shard is one flat buffer mixing decayed and non-decayed parameters.
    params = _params(seed=2)
    flat_p = np.concatenate([p.data.ravel() for p in params])
    flat_g = np.concatenate([p.grad.ravel() for p in params])
    wd = np.concatenate([np.full(p.data.size, 0.1 * decay_mask(p)) for p in params])
    m, v = np.zeros_like(flat_p), np.zeros_like(flat_p)
    scratch = np.empty_like(flat_p)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    for t in range(1, 4):
        adamw_update(
            flat_p, flat_g, m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
            weight_decay=wd, step=t, scratch=scratch,
        )  # fmt: skip
        opt.step()
    np.testing.assert_allclose(
        flat_p, np.concatenate([p.data.ravel() for p in params]), rtol=0, atol=1e-15
    )
    with pytest.raises(ValueError, match="boolean"):
        adamw_update(
            flat_p, flat_g, m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
            weight_decay=wd > 0, step=4,
        )  # fmt: skip


def test_adamw_scratch_buffer_does_not_change_the_result():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 5)).astype(np.float32)
    g = rng.standard_normal((6, 5)).astype(np.float32)
    b = a.copy()
    states = [(np.zeros_like(a), np.zeros_like(a)) for _ in range(2)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    adamw_update(a, g, *states[0], **kw)
    adamw_update(b, g, *states[1], scratch=np.full_like(b, np.nan), **kw)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and states[0][0].dtype == np.float32


def test_decay_mask_follows_ndim():
    assert decay_mask(P(np.zeros((2, 2)), None, "w"))
    assert decay_mask(P(np.zeros((65, 8)), None, "wte"))
    assert not decay_mask(P(np.zeros(4), None, "bias"))


def test_adamw_state_dict_round_trip_resumes_exactly():
    a = _params(seed=4)
    b = _copy(a)
    opt_a = AdamW(a, lr=1e-2)
    for s in range(5):
        _grads(a, s)
        opt_a.step()
    opt_b = AdamW(b, lr=1e-2)
    for s in range(3):
        _grads(b, s)
        opt_b.step()
    state = opt_b.state_dict()
    assert int(state["adamw.step"]) == 3
    assert "adamw.m.ln.g" in state and "adamw.v.w" in state and len(state) == 7
    state = {k: v.copy() for k, v in state.items()}  # as if read back from disk
    opt_c = AdamW(b, lr=1e-2)
    opt_c.load_state_dict(state)
    assert opt_c.step_count == 3
    for s in range(3, 5):
        _grads(b, s)
        opt_c.step()
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=pa.name)


def test_state_dict_is_a_snapshot():
    params = _params()
    opt = AdamW(params, lr=1e-2)
    opt.step()
    state = opt.state_dict()
    saved = state["adamw.m.w"].copy()
    opt.step()
    np.testing.assert_array_equal(state["adamw.m.w"], saved)


def test_load_state_dict_errors_name_the_keys():
    opt = AdamW(_params(), lr=1e-2)
    good = opt.state_dict()
    missing = {k: v for k, v in good.items() if k != "adamw.v.b"}
    with pytest.raises(ValueError, match=r"1 missing: adamw\.v\.b"):
        opt.load_state_dict(missing)
    extra = dict(good, **{"adamw.m.ghost": np.zeros(2)})
    with pytest.raises(ValueError, match=r"1 unexpected: adamw\.m\.ghost"):
        opt.load_state_dict(extra)
    wrong = dict(good, **{"adamw.m.w": np.zeros((3, 4))})
    with pytest.raises(ValueError, match=r"adamw\.m\.w \(expected \(4, 3\), got \(3, 4\)\)"):
        opt.load_state_dict(wrong)
    sgd = SGD(_params(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="missing"):
        sgd.load_state_dict({})


def test_optimizer_parameter_list_checks():
    params = _params()
    opt = AdamW(params + [params[0]], lr=1e-3)  # a tied weight listed twice counts once
    assert len(opt.params) == 3
    clash = P(np.zeros(3), None, "b")
    with pytest.raises(ValueError, match="'b'"):
        AdamW(params + [clash], lr=1e-3)
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def test_lr_schedule_known_points():
    kw = dict(max_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway: (max + min) / 2
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_lr_schedule_without_warmup_and_bad_arguments():
    assert lr_at(0, max_lr=3e-4, warmup_steps=0, total_steps=100) == pytest.approx(3e-4)
    assert lr_at(100, max_lr=3e-4, warmup_steps=0, total_steps=100, min_lr_ratio=0.0) == 0.0
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        lr_at(0, max_lr=1.0, warmup_steps=-1, total_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio=2"):
        lr_at(0, max_lr=1.0, warmup_steps=0, total_steps=10, min_lr_ratio=2)
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, max_lr=1.0, warmup_steps=5, total_steps=10)


# --------------------------------------------------------------------------------------------
# Gradient norm and clipping
# --------------------------------------------------------------------------------------------


def test_grad_norm_sq_sums_in_float64_and_skips_none():
    params = [
        P(np.zeros(3, np.float32), np.array([3.0, 4.0, 0.0], np.float32), "a"),
        P(np.zeros((2, 2), np.float32), np.full((2, 2), 0.5, np.float32), "b"),
        P(np.zeros(2, np.float32), None, "c"),
    ]
    assert grad_norm_sq(params) == 25.0 + 4 * 0.25
    # 10**6 squares of 1e-3 in float32 would drift; the float64 sum is 1 to ~1e-9.
    tiny = [P(np.zeros(10**6, np.float32), np.full(10**6, 1e-3, np.float32), "t")]
    assert grad_norm_sq(tiny) == pytest.approx(float(np.float32(1e-3)) ** 2 * 10**6, rel=1e-12)
    assert grad_norm_sq([P(np.zeros(1), None, "z")]) == 0.0


def test_clip_grad_norm_scales_to_max_norm():
    params = _params(seed=5)
    grads = [p.grad.copy() for p in params]
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    assert norm > 1.0
    returned = clip_grad_norm(params, max_norm=1.0)
    assert returned == pytest.approx(norm, rel=1e-14)
    assert math.sqrt(grad_norm_sq(params)) == pytest.approx(1.0, rel=1e-5)  # the 1e-6 guard
    for p, g in zip(params, grads, strict=True):  # one common scale keeps the direction
        np.testing.assert_allclose(p.grad, g / (norm + 1e-6), rtol=1e-14)


def test_clip_grad_norm_leaves_small_or_disabled_or_nonfinite_alone():
    params = _params(seed=6)
    grads = [p.grad.copy() for p in params]
    norm = math.sqrt(grad_norm_sq(params))
    assert clip_grad_norm(params, max_norm=norm * 2) == pytest.approx(norm)
    assert clip_grad_norm(params, max_norm=0.0) == pytest.approx(norm)
    assert math.isinf(clip_grad_norm(params, max_norm=1.0, norm_sq=math.inf))
    for p, g in zip(params, grads, strict=True):
        np.testing.assert_array_equal(p.grad, g)


def test_clip_grad_norm_uses_the_global_norm_sq():
    # A rank holding part of the model clips with the norm of the whole model.
    params = _params(seed=7)
    grads = [p.grad.copy() for p in params]
    global_sq = grad_norm_sq(params) * 4.0  # the other ranks hold 3x as much
    norm = clip_grad_norm(params, max_norm=0.5, norm_sq=global_sq)
    assert norm == pytest.approx(math.sqrt(global_sq), rel=1e-15)
    for p, g in zip(params, grads, strict=True):
        np.testing.assert_allclose(p.grad, g * 0.5 / (norm + 1e-6), rtol=1e-14)


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: AdamW(ps, lr=0.1)], ids=["sgd", "adamw"])
def test_optimizer_norm_and_clip_are_grad_norm_sq_and_clip_grad_norm(make):
    """The methods the trainer calls give exactly the functions' numbers, over owned params."""
    params, ref = _params(), _params()
    opt = make(params)
    expected = grad_norm_sq([p for p in ref if p.name != "b"])
    assert opt.grad_norm_sq(lambda p: p.name != "b") == expected
    norm = clip_grad_norm(ref, max_norm=0.5)
    opt.clip(norm, 0.5)
    for p, q in zip(params, ref, strict=True):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=p.name)
    before = [p.grad.copy() for p in params]
    opt.clip(0.4, 0.5)  # below the threshold: untouched
    opt.clip(float("nan"), 0.5)  # a non-finite norm: untouched
    assert all(np.array_equal(p.grad, b) for p, b in zip(params, before, strict=True))


def test_state_keys_name_their_parameter():
    """Every per-parameter state key maps back to its parameter; scalar state to None."""
    params = _params()
    for opt in (SGD(params, lr=0.1, momentum=0.9), AdamW(params, lr=0.1)):
        owners = {k: state_key_param_name(k) for k in opt.state_dict()}
        scalar = [k for k, name in owners.items() if name is None]
        assert scalar == (["adamw.step"] if isinstance(opt, AdamW) else []), owners
        per_param = [name for name in owners.values() if name is not None]
        slots = 2 if isinstance(opt, AdamW) else 1  # m and v, or the velocity
        assert sorted(per_param) == sorted([p.name for p in params] * slots), owners
