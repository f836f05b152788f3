"""Activation recomputation: the same bits as without it, and the memory it saves.

In this process: `autograd.checkpoint` (what its graph keeps, hooks, no_grad), the attention
core with ``recompute`` (same outputs and gradients, a mask drawn again), whole training runs
of 1 process in float64 and float32 with dropout and microbatches compared bit for bit, and
the bytes every block keeps measured against `mpipar.activations.saved_per_layer` for the
tiny, small and medium shapes.

With MPI (``mpi_scripts/recompute_checks.py``, 4 ranks): the bytes of a block under tp = 2,
with and without sequence parallelism, against the formula; and float32 runs with
dropout under tp + sequence parallelism + dp, and pp + dp with ZeRO-2, compared bit for bit
between the three modes. float64 layouts with ``same_bits_as`` run in the
equivalence launches of test_data_parallel.py, test_tensor_parallel.py and test_pipeline.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import TINY_TEXT
from gradcheck import check_gradients
from mpi_util import assert_check_passed, parse_verdict, run_mpi_ok, script

from mpipar import fused, ops
from mpipar.activations import (
    formula_bytes,
    korthikanti_bytes,
    layer_activation_bytes,
    recompute_flops_per_token,
    saved_per_layer,
)
from mpipar.autograd import Tensor, checkpoint, graph_nbytes, no_grad
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPT, PRESETS, RECOMPUTE_MODES, GPTConfig, flops_per_token
from mpipar.nn import DropoutKey
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

TOK = CharTokenizer.from_text(TINY_TEXT)


# ---- autograd.checkpoint ------------------------------------------------------------------


def _block(dtype: str = "float64") -> tuple[GPT, Tensor]:
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, d_model=8, seq_len=6,
                    dtype=dtype)
    model = GPT(cfg)
    model.initialize(1)
    x = Tensor(np.random.default_rng(2).standard_normal((3, 6, 8)), requires_grad=True)
    return model, x


def test_checkpoint_keeps_only_its_input_and_matches_the_block():
    model, x = _block()
    block, layout = model.blocks[0], model.layers.sequence_layout(6)
    params = block.parameters()
    plain = block(x, layout)
    plain.backward(np.ones_like(plain.data))
    want = [x.grad.copy(), *(p.grad.copy() for p in params)]
    x.grad, fired = None, []
    for p in params:
        p.grad = None
        p.register_grad_hook(lambda q: fired.append(q))
    y = checkpoint(lambda h: block(h, layout), x, params)
    assert graph_nbytes(y, exclude=[p.data for p in params]) == x.data.nbytes
    np.testing.assert_array_equal(y.data, plain.data)
    y.backward(np.ones_like(y.data))
    assert sorted(map(id, fired)) == sorted(map(id, params)), "each hook fires once"
    for got, expected in zip([x.grad, *(p.grad for p in params)], want, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_checkpoint_without_a_graph_is_the_plain_call():
    model, x = _block()
    block, layout = model.blocks[0], model.layers.sequence_layout(6)
    with no_grad():
        y = checkpoint(lambda h: block(h, layout), x, block.parameters())
    assert y.fn is None and not y.requires_grad


def test_checkpoint_reaches_parameters_when_the_input_needs_no_gradient():
    model, x = _block()
    block, layout = model.blocks[0], model.layers.sequence_layout(6)
    x.requires_grad = False
    y = checkpoint(lambda h: block(h, layout), x, block.parameters())
    assert y.requires_grad
    (y * y).sum().backward()
    assert x.grad is None and all(p.grad is not None for p in block.parameters())


# ---- the attention core with recompute ------------------------------------------------------


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("cache_block", [fused.CACHE_BLOCK, 2 * 49 * 2])
def test_attention_recompute_is_the_same_function(dropout, cache_block, monkeypatch):
    """Also with blocks of 2 sequences (of 5): P is recomputed block by block."""
    monkeypatch.setattr(fused, "CACHE_BLOCK", cache_block)
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((5, 7, 3 * 8))
    mask = (rng.random((5, 2, 7, 7)) > 0.2) / 0.8 if dropout else None
    draws = []

    def draw():
        draws.append(1)
        return mask

    outs = []
    for recompute, drop in ((False, mask), (True, draw if dropout else None)):
        x = Tensor(qkv, requires_grad=True)
        y = ops.causal_attention(x, 2, drop, recompute=recompute)
        saved = graph_nbytes(y)
        y.backward(np.cos(y.data))
        outs.append((y.data, x.grad, saved))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert outs[1][2] == qkv.nbytes, "keeps q, k, v only"
    assert draws == ([1, 1] if dropout else []), "the mask is drawn in forward and backward"
    check_gradients(lambda qkv: ops.causal_attention(qkv, 2, mask, recompute=True),
                    {"qkv": Tensor(qkv, requires_grad=True)}, label="attention recompute")


# ---- whole runs on one process, bit for bit ---------------------------------------------------


@pytest.mark.parametrize("dtype, precision", [("float64", "fp32"), ("float32", "fp32"),
                                              ("float32", "bf16"), ("float32", "fp16")])
def test_training_is_the_same_bits_in_every_mode(dtype, precision):
    """16-bit compute too: a recomputed attention core rounds as the forward pass did."""
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, d_model=16, seq_len=8,
                    dtype=dtype, dropout=0.1)
    data = make_dataset(TINY_TEXT, TOK, seq_len=cfg.seq_len)
    tc = TrainConfig(batch_size=4, microbatches=2, steps=3, eval_every=0, warmup_steps=1,
                     precision=precision)
    results = {}
    for mode in RECOMPUTE_MODES:
        trainer = Trainer(cfg, replace(tc, recompute=mode), ProcessGrid.single(), data,
                          Tracer(0))
        losses = [trainer.train_step()["loss"] for _ in range(3)]
        results[mode] = (losses, *trainer.full_state())
    for mode in ("selective", "full"):
        assert results[mode][0] == results["none"][0], mode
        for got, want in zip(results[mode][1:], results["none"][1:], strict=True):
            for key, value in want.items():
                np.testing.assert_array_equal(got[key], value, err_msg=f"{mode}: {key}")


# ---- activation memory: measured against the formula -----------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "small", "medium"])
def test_every_block_keeps_what_the_formula_says(preset):
    """All three modes, float32 and float64, with and without dropout, to the byte.

    medium runs with 2 sequences instead of 32, in float32 only, to stay quick.
    """
    shape = dict(PRESETS[preset])
    b = 2 if preset == "medium" else shape.pop("batch_size")
    shape.pop("batch_size", None)
    idx = np.random.default_rng(0).integers(0, 65, (b, shape["seq_len"]))
    for dtype in ("float32",) if preset == "medium" else ("float32", "float64"):
        for dropout in (0.0, 0.1):
            cfg = GPTConfig(vocab_size=65, dtype=dtype, dropout=dropout, **shape)
            key = DropoutKey(1, 0, b, slice(0, b)) if dropout else None
            for mode in RECOMPUTE_MODES:
                model = GPT(cfg)
                model.initialize(0)
                model.set_recompute(mode)
                want = formula_bytes(b, cfg.seq_len, cfg.d_model, cfg.n_head,
                                     np.dtype(dtype).itemsize, recompute=mode,
                                     dropout=bool(dropout))
                got = layer_activation_bytes(model, idx, key)
                assert got == [want] * cfg.n_layer, (dtype, dropout, mode, got, want)


def test_formula_terms():
    """The itemised terms add up to e·(20bsh + 2bs + abs²) and e·(22bsh + 2bs + 3abs²)."""
    b, s, h, a = 3, 16, 32, 4
    assert formula_bytes(b, s, h, a, 4) == 4 * (20 * b * s * h + 2 * b * s + a * b * s * s)
    assert formula_bytes(b, s, h, a, 4, dropout=True) == 4 * (22 * b * s * h + 2 * b * s
                                                             + 3 * a * b * s * s)
    assert formula_bytes(b, s, h, a, 8, recompute="selective", dropout=True) == 8 * (
        22 * b * s * h + 2 * b * s)
    assert saved_per_layer(b, s, h, a, 8, recompute="full", tp=2, sequence_parallel=True) == {
        "block input": 8 * b * s * h // 2}
    sp = formula_bytes(b, s, h, a, 4, dropout=True, tp=4, sequence_parallel=True)
    assert sp * 4 == formula_bytes(b, s, h, a, 4, dropout=True)
    assert formula_bytes(b, s, h, a, 4, tp=2) == 4 * (4 * b * s * h + 2 * b * s
                                                      + 16 * b * s * h // 2 + a * b * s * s // 2)
    # Korthikanti et al.: 34 + 5as/h, 10 + 24/t + 5as/ht, (34 + 5as/h)/t, 34/t, 2 (per sbh).
    sbh = s * b * h
    assert korthikanti_bytes(b, s, h, a) == sbh * (34 + 5 * a * s / h)
    assert korthikanti_bytes(b, s, h, a, tp=2) == sbh * (10 + 12 + 5 * a * s / h / 2)
    assert korthikanti_bytes(b, s, h, a, tp=2, sequence_parallel=True,
                             recompute="selective") == sbh * 17
    assert korthikanti_bytes(b, s, h, a, recompute="full") == 2 * sbh


def test_full_recomputation_adds_a_third_of_the_flops():
    cfg = GPTConfig(vocab_size=65, **{k: v for k, v in PRESETS["medium"].items()
                                      if k != "batch_size"})
    full = recompute_flops_per_token(cfg, "full") / flops_per_token(cfg)
    assert 0.33 < full < 1 / 3  # the head is not recomputed
    assert recompute_flops_per_token(cfg, "selective") == cfg.n_layer * 128 * 256
    assert recompute_flops_per_token(cfg, "none") == 0


# ---- with MPI -------------------------------------------------------------------------------

RECOMPUTE_CHECKS = [
    *(f"block bytes = formula, tp2{' sp' if sp else ''}{' dropout' if d else ''}"
      for sp in (False, True) for d in (False, True)),
    *(f"{layout} {mode}: same bits as none"
      for layout in ("tp2 dp2 sp mb2", "pp2 dp2 interleaved v2 zero2")
      for mode in ("selective", "full")),
]


@pytest.fixture(scope="module")
def recompute_verdict() -> dict:
    return parse_verdict(run_mpi_ok(4, [script("recompute_checks.py")], timeout=150))


def test_every_recompute_check_ran(recompute_verdict):
    assert sorted(recompute_verdict) == sorted(RECOMPUTE_CHECKS)


@pytest.mark.parametrize("name", RECOMPUTE_CHECKS)
def test_recompute_check(recompute_verdict, name):
    assert_check_passed(recompute_verdict, name)
