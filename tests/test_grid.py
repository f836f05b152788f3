"""Rank layout and layout validation (pure), and the process groups under ``mpirun -n 8``."""

from __future__ import annotations

import itertools

import pytest
from mpi_util import parse_verdict, run_mpi_ok, script

from mpipar.grid import (
    ConfigError,
    config_digest,
    coords_rank,
    rank_coords,
    resolve_sizes,
    validate_layout,
)

# ---- rank layout (docs/design.md §4) ------------------------------------------------------


def test_layout_of_dp2_tp2_pp2_matches_the_design_picture():
    # (pp, dp, tp) per global rank: tp fastest, then dp, then pp.
    expected = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert [rank_coords(r, 2, 2, 2) for r in range(8)] == expected


@pytest.mark.parametrize("dp,tp,pp", [(1, 1, 1), (4, 1, 1), (1, 4, 1), (1, 1, 4), (2, 3, 2),
                                      (3, 2, 4), (2, 4, 3)])
def test_coords_cover_the_grid_once_and_invert(dp, tp, pp):
    world = dp * tp * pp
    coords = [rank_coords(r, dp, tp, pp) for r in range(world)]
    assert sorted(coords) == sorted(itertools.product(range(pp), range(dp), range(tp)))
    for r, (p, d, t) in enumerate(coords):
        assert coords_rank(p, d, t, dp, tp) == r
        assert t == r % tp and d == (r // tp) % dp and p == r // (tp * dp)


def test_rank_outside_the_grid():
    with pytest.raises(ValueError, match="rank 8 outside a grid of 2 × 2 × 2"):
        rank_coords(8, 2, 2, 2)


# ---- resolve_sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("world,given,expected", [
    (1, {}, (1, 1, 1)),
    (8, {}, (8, 1, 1)),
    (8, {"tp": 2}, (4, 2, 1)),
    (8, {"tp": 2, "pp": 2}, (2, 2, 2)),
    (8, {"dp": 2, "pp": 4}, (2, 1, 4)),
    (6, {"dp": 3, "tp": 2, "pp": 1}, (3, 2, 1)),
])
def test_resolve_sizes(world, given, expected):
    assert resolve_sizes(world, **given) == expected


@pytest.mark.parametrize("world,given,message", [
    (4, {"dp": 2}, "world size 4 != --dp 2 × --tp 1 × --pp 1 = 2"),
    (8, {"dp": 2, "tp": 2, "pp": 1}, "world size 8 != --dp 2 × --tp 2 × --pp 1 = 4"),
    (6, {"tp": 4}, "world size 6 is not divisible by --tp 4 × --pp 1 = 4"),
    (4, {"tp": 0}, "--tp must be at least 1, got 0"),
    (4, {"dp": -1}, "--dp must be at least 1, got -1"),
])
def test_resolve_sizes_errors(world, given, message):
    with pytest.raises(ConfigError) as info:
        resolve_sizes(world, **given)
    assert message in str(info.value)


# ---- validate_layout ----------------------------------------------------------------------

GOOD = dict(batch_size=8, microbatches=2, n_layer=4, n_head=4, d_model=64)


def validate(world=8, dp=2, tp=2, pp=2, **overrides):
    validate_layout(world, dp, tp, pp, **{**GOOD, **overrides})


@pytest.mark.parametrize("world,dp,tp,pp,overrides", [
    (8, 2, 2, 2, {}),
    (1, 1, 1, 1, {"microbatches": 1}),
    (4, 1, 1, 4, {"n_layer": 4}),  # one layer per stage
    (2, 1, 1, 2, {"n_layer": 5}),  # uneven split 3 + 2 is fine
    (2, 1, 1, 2, {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 4}),
    (4, 2, 2, 1, {"sequence_parallel": True, "seq_len": 32}),
    (2, 2, 1, 1, {"sequence_parallel": True}),  # tp == 1: a no-op, seq_len not needed
    (2, 2, 1, 1, {"zero": 2, "schedule": "naive"}),
    (2, 1, 1, 2, {"schedule": "gpipe", "microbatches": 1}),
])
def test_valid_layouts(world, dp, tp, pp, overrides):
    validate(world, dp, tp, pp, **overrides)


@pytest.mark.parametrize("world,dp,tp,pp,overrides,message", [
    (4, 2, 1, 1, {}, "world size 4 != --dp 2 × --tp 1 × --pp 1 = 2"),
    (8, 2, 2, 2, {"batch_size": 6},
     "--batch-size 6 is not divisible by --dp 2 × --microbatches 2 = 4"),
    (2, 2, 1, 1, {"batch_size": 8, "microbatches": 3},
     "--batch-size 8 is not divisible by --dp 2 × --microbatches 3 = 6"),
    (8, 1, 8, 1, {"n_head": 4, "d_model": 64}, "--n-head 4 is not divisible by --tp 8"),
    (3, 1, 3, 1, {"n_head": 3, "d_model": 64}, "--d-model 64 is not divisible by --tp 3"),
    (4, 1, 4, 1, {"n_head": 4, "d_model": 6},
     "--d-model 6 is not divisible by --n-head 4"),
    (8, 1, 1, 8, {"n_layer": 4},
     "--n-layer 4 gives fewer layers than stages: --pp 8 × --virtual-stages 1 = 8"),
    (2, 1, 1, 2, {"n_layer": 4, "schedule": "interleaved", "virtual_stages": 3,
                  "microbatches": 2},
     "--pp 2 × --virtual-stages 3 = 6 model chunks"),
    (2, 1, 1, 2, {"schedule": "interleaved", "microbatches": 2},
     "--schedule interleaved needs --virtual-stages >= 2, got 1"),
    (4, 1, 1, 4, {"schedule": "interleaved", "virtual_stages": 2, "n_layer": 8,
                  "microbatches": 2},
     "--schedule interleaved needs --microbatches 2 divisible by --pp 4"),
    (2, 1, 1, 2, {"schedule": "1f1b", "virtual_stages": 2},
     "--virtual-stages 2 needs --schedule interleaved"),
    (2, 1, 1, 2, {"schedule": "zigzag"},
     "--schedule 'zigzag' is not one of naive, gpipe, 1f1b, interleaved"),
    (4, 1, 4, 1, {"sequence_parallel": True, "seq_len": 30},
     "--sequence-parallel needs --seq-len 30 divisible by --tp 4"),
    (2, 1, 2, 1, {"sequence_parallel": True},
     "--sequence-parallel needs the sequence length (--seq-len)"),
    (2, 2, 1, 1, {"zero": 4}, "--zero 4 is not one of 0, 1, 2, 3"),
    (2, 0, 1, 1, {}, "--dp must be at least 1, got 0"),
    (2, 2, 1, 1, {"microbatches": 0}, "--microbatches must be at least 1, got 0"),
    (2, 1, 1, 2, {"virtual_stages": 0}, "--virtual-stages must be at least 1, got 0"),
    (2, 2, 1, 1, {"batch_size": -4}, "--batch-size must be at least 1, got -4"),
])
def test_invalid_layouts_name_the_flag_and_the_numbers(world, dp, tp, pp, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(world, dp, tp, pp, **overrides)
    assert message in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        validate(6, 2, 2, 2, batch_size=7, n_head=1, zero=5)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert len(lines) == 5, lines  # world, batch, heads vs tp, zero
    assert all(line.startswith("  - ") for line in lines[1:])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_digest_ignores_key_order_but_not_values():
    a = config_digest({"lr": 0.1, "dp": 2, "name": "x"})
    assert a == config_digest({"name": "x", "dp": 2, "lr": 0.1})
    assert a != config_digest({"name": "x", "dp": 2, "lr": 0.10000001})


# ---- the process groups, on 8 ranks -------------------------------------------------------

CHECKS = [
    *(f"groups_dp{d}_tp{t}_pp{p}" for d, t, p in
      [(2, 2, 2), (8, 1, 1), (1, 8, 1), (1, 1, 8), (1, 2, 4), (2, 1, 4), (4, 2, 1)]),
    "check_same_config_equal",
    "check_same_config_differs",
    "size_mismatch",
    "single",
]


@pytest.fixture(scope="module")
def verdict() -> dict:
    return parse_verdict(run_mpi_ok(8, [script("grid_checks.py")], timeout=90))


def test_every_grid_check_ran(verdict):
    assert sorted(verdict) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_grid_check(verdict, name):
    assert verdict.get(name) == [], "\n".join(verdict.get(name) or [f"{name} did not run"])
