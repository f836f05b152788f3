"""ZeroAdamW on one rank: the interface AdamW has, and what a sharded optimizer adds.

The multi-rank behaviour (shards on 2 and 4 ranks match the 1-process run, 1/dp memory,
checkpoints across layouts, trace volume) is checked by ``tests/mpi_scripts/dp_checks.py``
and ``equivalence.py`` through ``tests/test_data_parallel.py``. Here one rank owns the whole
(padded) flat space, so every result can be compared directly with :class:`AdamW`.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.comm import MPI, Comm
from mpipar.nn import Init, Parameter
from mpipar.optim import AdamW, clip_grad_norm, grad_norm_sq
from mpipar.parallel.data_parallel import DataParallel
from mpipar.parallel.zero import ZeroAdamW, ZeroGradients, format_memory_report, memory_report


def make_params(seed: int = 0) -> list[Parameter]:
    """A matrix (decays), a bias and a gain (do not), with random values."""
    rng = np.random.default_rng(seed)
    params = []
    for name, shape in (("w", (4, 3)), ("b", (3,)), ("ln.g", (5,))):
        p = Parameter(shape, Init("zeros"), np.float64)
        p.data[...] = rng.standard_normal(shape)
        p.name = name
        params.append(p)
    return params


def fill_grads(params: list[Parameter], seed: int) -> None:
    """Write random gradients in place (into the flat buffer of ZeroGradients when it owns
    them)."""
    rng = np.random.default_rng(100 + seed)
    for p in params:
        g = rng.standard_normal(p.shape)
        if p.grad is None:
            p.grad = g
        else:
            p.grad[...] = g


def zero_pair(zero: int, allreduce: str = "mpi") -> tuple[list[Parameter], ZeroAdamW]:
    params = make_params()
    sync = ZeroGradients(params, Comm(MPI.COMM_SELF, "dp"), zero=zero, allreduce=allreduce)
    return params, ZeroAdamW(params, sync, lr=0.1, weight_decay=0.1)


@pytest.mark.parametrize("zero", [1, 2])
@pytest.mark.parametrize("allreduce", ["mpi", "ring"])
def test_steps_match_adamw(zero, allreduce):
    """Three steps with clipping; parameters and state equal AdamW's to 1e-14."""
    ref = make_params()
    adamw = AdamW(ref, lr=0.1, weight_decay=0.1)
    params, opt = zero_pair(zero, allreduce)
    for step in range(3):
        fill_grads(ref, step)
        norm = clip_grad_norm(ref, 1.5)
        adamw.step(0.1 / (step + 1))
        opt.zero_grad()
        fill_grads(params, step)
        opt.sync.finish()
        assert opt.grad_norm_sq(lambda p: True) == pytest.approx(norm**2, rel=1e-14)
        opt.clip(norm, 1.5)
        opt.step(0.1 / (step + 1))
    for p, q in zip(params, ref, strict=True):
        np.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-14, err_msg=p.name)
    theirs, ours = adamw.state_dict(), opt.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
        np.testing.assert_allclose(ours[key], value, rtol=0, atol=1e-14, err_msg=key)


def test_parameters_become_views_of_the_flat_buffer():
    params, opt = zero_pair(1)
    for p, o in zip(params, opt.sync.offsets, strict=True):
        assert np.shares_memory(p.data, opt.flat_params[o:o + p.size])
    opt.flat_params[:] = 7.0  # what the all-gather does: the model sees it at once
    assert all((p.data == 7.0).all() for p in params)


def test_weight_decay_coefficients_follow_adamw():
    params, opt = zero_pair(1)
    lam = np.asarray(opt.decay)
    np.testing.assert_array_equal(lam[:12], 0.1)  # the (4, 3) matrix decays
    np.testing.assert_array_equal(lam[12:], 0.0)  # bias and gain do not (nor padding)
    no_decay = ZeroAdamW(params, ZeroGradients(params, Comm(MPI.COMM_SELF, "dp"), zero=1),
                         lr=0.1, weight_decay=0.0)
    assert no_decay.decay == 0.0


def test_grad_norm_counts_only_owned_parameters():
    params, opt = zero_pair(2)
    opt.zero_grad()
    fill_grads(params, 0)
    expected = grad_norm_sq([p for p in params if p.name != "b"])
    opt.sync.finish()
    assert opt.grad_norm_sq(lambda p: p.name != "b") == pytest.approx(expected, rel=1e-14)


def test_clip_is_clip_grad_norm():
    params, opt = zero_pair(1)
    opt.zero_grad()
    fill_grads(params, 0)
    ref = [g.copy() for g in (p.grad for p in params)]
    opt.sync.finish()
    opt.clip(10.0, 1.0)
    scale = 1.0 / (10.0 + 1e-6)
    np.testing.assert_allclose(opt.sync.grad_shard[:20], np.concatenate(ref, axis=None) * scale)
    before = opt.sync.grad_shard.copy()
    opt.clip(0.5, 1.0)  # below the threshold: untouched
    opt.clip(float("nan"), 1.0)  # a non-finite norm: untouched
    np.testing.assert_array_equal(opt.sync.grad_shard, before)


def test_state_dict_round_trip_and_key_checks():
    params, opt = zero_pair(2)
    for step in range(2):
        opt.zero_grad()
        fill_grads(params, step)
        opt.sync.finish()
        opt.step()
    state = opt.state_dict()
    assert state["adamw.step"] == 2 and state["adamw.m.w"].shape == (4, 3)
    _, fresh = zero_pair(2)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    broken = dict(state)
    del broken["adamw.v.b"]
    broken["adamw.m.w"] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"1 missing: adamw\.v\.b.*wrong shape: adamw\.m\.w"):
        fresh.load_state_dict(broken)


def test_memory_report_on_one_rank_equals_baseline():
    params, opt = zero_pair(2)
    report = opt.memory_report()
    assert report["optimizer_state_bytes"] == report["baseline_optimizer_state_bytes"] == 320
    assert report["grad_bytes"] == report["baseline_grad_bytes"] == 160
    line = format_memory_report(report)
    assert line == ("ZeRO-2 over dp 1, per rank (× the size without ZeRO): optimizer state "
                    "320 B (1.00 × 320 B), gradients 160 B (1.00 × 160 B)")
    plain = make_params()
    adamw = AdamW(plain, lr=0.1)
    assert memory_report(adamw, None, plain)["optimizer_state_bytes"] == 320


def test_needs_the_zero_gradients_of_the_same_parameters():
    params = make_params()
    comm = Comm(MPI.COMM_SELF, "dp")
    with pytest.raises(ValueError, match="zero=1 or 2"):
        ZeroAdamW(params, DataParallel(params, comm), lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="same parameters"):
        ZeroAdamW(make_params(), ZeroGradients(params, comm, zero=1), lr=0.1,
                  weight_decay=0.0)
