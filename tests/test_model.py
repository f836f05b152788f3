"""nn modules and the GPT: names, initialisation, state dicts, dropout, gradients, causality."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_gradients

from mpipar import ops
from mpipar.autograd import Tensor
from mpipar.model import (
    GPT,
    PRESETS,
    GPTConfig,
    SequenceLayout,
    SerialLayers,
    build_model,
    flops_per_token,
    matmul_params,
    residual_std,
)
from mpipar.nn import Dropout, DropoutKey, Embedding, LayerNorm, Linear, Module

# The smallest GPT with every feature: 2 layers, 2 heads, ties, positions (float64 for checks).
TINY = GPTConfig(vocab_size=7, n_layer=2, n_head=2, d_model=8, seq_len=5, dtype="float64")


def _tokens(shape=(2, 5), seed=0, vocab=7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def _key(batch: int, rows: slice | None = None, seed: int = 1, step: int = 2) -> DropoutKey:
    return DropoutKey(seed=seed, step=step, global_batch=batch,
                      rows=slice(0, batch) if rows is None else rows)


def _modules(m: Module):
    yield m
    for _, child in m.children():
        yield from _modules(child)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
def test_linear_module():
    lin = Linear(6, 5, std=0.5, dtype=np.float64)
    lin.initialize(seed=0)
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    assert lin.weight.shape == (5, 6) and np.all(lin.bias.data == 0.0)
    x = np.random.default_rng(1).standard_normal((2, 3, 6))
    lin.bias.data[:] = np.arange(5.0)
    np.testing.assert_allclose(lin(Tensor(x)).data, x @ lin.weight.data.T + np.arange(5.0),
                               rtol=1e-12)
    no_bias = Linear(6, 5, bias=False)
    assert [n for n, _ in no_bias.named_parameters()] == ["weight"]
    assert no_bias(Tensor(x.astype(np.float32))).dtype == np.float32


def test_linear_init_std():
    """N(0, std²): with 16384 samples the sample std is within ~0.6% (1σ) of std."""
    lin = Linear(128, 128, std=0.02, dtype=np.float64)
    lin.initialize(seed=3)
    assert abs(lin.weight.data.std() / 0.02 - 1.0) < 0.03
    assert abs(lin.weight.data.mean()) < 0.02 * 5 / 128  # 5σ of the mean of 16384 samples


def test_embedding_module_repeated_ids():
    emb = Embedding(7, 3, dtype=np.float64)
    emb.initialize(seed=0)
    ids = np.array([[1, 1, 4], [6, 1, 0]])
    out = emb(ids)
    np.testing.assert_array_equal(out.data, emb.weight.data[ids])
    g = np.random.default_rng(2).standard_normal((2, 3, 3))
    out.backward(g)
    expected = np.zeros((7, 3))
    for pos, i in np.ndenumerate(ids):
        expected[i] += g[pos]
    np.testing.assert_allclose(emb.weight.grad, expected, rtol=1e-14)
    assert np.all(emb.weight.grad[[2, 3, 5]] == 0.0)  # unused rows get no gradient


def test_layer_norm_module():
    ln = LayerNorm(6, dtype=np.float64)
    ln.initialize(seed=0)
    np.testing.assert_array_equal(ln.weight.data, np.ones(6))
    np.testing.assert_array_equal(ln.bias.data, np.zeros(6))
    x = np.random.default_rng(4).normal(3.0, 2.0, (4, 6))
    y = ln(Tensor(x)).data
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    # Population variance of y is σ²/(σ² + ε) < 1; the ε is what keeps y finite for σ = 0.
    var = x.var(-1)
    np.testing.assert_allclose(y.var(-1), var / (var + 1e-5), rtol=1e-10)
    assert np.all(ln(Tensor(np.ones((2, 6)))).data == 0.0)


# --------------------------------------------------------------------------------------------
# Dropout and DropoutKey
# --------------------------------------------------------------------------------------------
def test_dropout_mask_statistics():
    p = 0.25
    mask = Dropout(p, site=3).mask_from_full(_key(64), (64, 1000))
    values = set(np.unique(mask).tolist())
    assert values == {0.0, 1.0 / (1.0 - p)}, values
    # 64000 Bernoulli(p) draws: the dropped fraction has σ = √(p(1−p)/n) ≈ 0.0017; 0.01 ≈ 6σ.
    assert abs(np.mean(mask == 0.0) - p) < 0.01
    assert abs(mask.mean() - 1.0) < 0.015  # E[mask] = 1: the expectation of x is kept


def test_dropout_masks_are_a_function_of_seed_step_site():
    shape = (8, 50)
    base = Dropout(0.5, site=2).mask_from_full(_key(8), shape)
    same = Dropout(0.5, site=2).mask_from_full(_key(8), shape)  # another layer object
    np.testing.assert_array_equal(base, same)
    for label, mask in {
        "site": Dropout(0.5, site=3).mask_from_full(_key(8), shape),
        "step": Dropout(0.5, site=2).mask_from_full(_key(8, step=3), shape),
        "seed": Dropout(0.5, site=2).mask_from_full(_key(8, seed=2), shape),
    }.items():
        # Independent masks agree on about half of 400 elements; identical ones on all.
        assert np.mean(mask == base) < 0.8, f"changing the {label} did not change the mask"


def test_dropout_rows_slice_the_global_mask():
    """A data-parallel shard or microbatch (rows 16..31 of 64) sees its rows of the full mask."""
    drop = Dropout(0.3, site=5)
    full = drop.mask_from_full(_key(64), (64, 10, 6))
    part = drop.mask_from_full(_key(64, rows=slice(16, 32)), (64, 10, 6))
    np.testing.assert_array_equal(part, full[16:32])
    cols = drop.mask_from_full(_key(64), (64, 10, 6), (slice(None), slice(2, 4)))
    np.testing.assert_array_equal(cols, full[:, :, 2:4])  # a tensor-parallel slice
    x = np.random.default_rng(0).standard_normal((64, 10, 6))
    y_full = drop(Tensor(x), _key(64)).data
    y_part = drop(Tensor(x[16:32]), _key(64, rows=slice(16, 32))).data
    np.testing.assert_array_equal(y_part, y_full[16:32])
    np.testing.assert_array_equal(y_full, x * full)


def test_dropout_is_identity_unless_training_with_a_key():
    x = Tensor(np.ones((4, 3), dtype=np.float32))
    drop = Dropout(0.5, site=0)
    assert drop(x) is x  # no key
    assert Dropout(0.0, site=0)(x, _key(4)) is x  # p = 0
    y = drop(x, _key(4))
    assert y is not x and y.dtype == np.float32
    drop.eval()
    assert drop(x, _key(4)) is x


def test_model_train_and_eval_reach_every_dropout():
    model = GPT(TINY.with_(dropout=0.1))
    drops = [m for m in _modules(model) if isinstance(m, Dropout)]
    assert len(drops) == 1 + 3 * TINY.n_layer
    assert sorted(d.site for d in drops) == list(range(1 + 3 * TINY.n_layer))  # distinct sites
    model.eval()
    assert not any(d.training for d in drops)
    model.train()
    assert all(d.training for d in drops)


# --------------------------------------------------------------------------------------------
# Names, state dicts, initialisation
# --------------------------------------------------------------------------------------------
BLOCK_PARAMS = {
    "ln_1.weight": (8,), "ln_1.bias": (8,),
    "attn.qkv.weight": (24, 8), "attn.qkv.bias": (24,),
    "attn.proj.weight": (8, 8), "attn.proj.bias": (8,),
    "ln_2.weight": (8,), "ln_2.bias": (8,),
    "mlp.fc.weight": (32, 8), "mlp.fc.bias": (32,),
    "mlp.proj.weight": (8, 32), "mlp.proj.bias": (8,),
}


def test_named_parameters():
    model = GPT(TINY)
    expected = {"wte.weight": (7, 8), "wpe.weight": (5, 8)}
    for i in range(2):
        expected.update({f"blocks.{i}.{k}": s for k, s in BLOCK_PARAMS.items()})
    expected.update({"ln_f.weight": (8,), "ln_f.bias": (8,)})
    got = {name: p.shape for name, p in model.named_parameters()}
    assert list(got) == list(expected)  # order too: optimizer state and buckets rely on it
    assert got == expected
    assert all(p.name == name for name, p in model.named_parameters())
    d, L = TINY.d_model, TINY.n_layer
    assert model.num_parameters() == 7 * d + 5 * d + L * (12 * d * d + 13 * d) + 2 * d
    assert model.wte.weight.tied


def test_stage_names_keep_global_block_indices():
    stage = GPT(TINY.with_(n_layer=4), first_layer=2, last_layer=4, pre=False)
    names = [n for n, _ in stage.named_parameters()]
    assert names[0] == "wte.weight" and "wpe.weight" not in names
    assert {n.split(".")[1] for n in names if n.startswith("blocks.")} == {"2", "3"}
    assert not stage.wte.weight.tied  # only a model holding both ends uses wte twice


def test_flags_mark_the_tied_embedding_and_the_position_table():
    """The parallel code finds these parameters by flag, never by name."""
    model = GPT(TINY)
    assert [n for n, p in model.named_parameters() if p.tied_embedding] == ["wte.weight"]
    assert [n for n, p in model.named_parameters() if p.before_sequence_split] == ["wpe.weight"]
    last = GPT(TINY.with_(n_layer=4), first_layer=2, last_layer=4, pre=False)
    assert last.wte.weight.tied_embedding  # the head's copy on the last pipeline stage
    assert not any(p.before_sequence_split for p in last.parameters())


def test_a_stage_without_the_embedding_is_told_the_sequence_length():
    cfg = TINY.with_(n_layer=4)
    first = build_model(cfg, seed=3, first_layer=0, last_layer=2, post=False)
    last = build_model(cfg, seed=3, first_layer=2, last_layer=4, pre=False)
    idx, targets = _tokens(seed=1), _tokens(seed=2)
    hidden = first(idx)
    with pytest.raises(ValueError, match="needs seq_len"):
        last(hidden, targets)
    whole = build_model(cfg, seed=3)
    np.testing.assert_array_equal(last(hidden, targets, seq_len=idx.shape[1]).data,
                                  whole(idx, targets).data)
    assert SerialLayers().sequence_layout(5) == SequenceLayout(5, 1, ())


def test_state_dict_round_trip():
    a = build_model(TINY, seed=0)
    b = build_model(TINY, seed=1)
    state = a.state_dict()
    assert not np.array_equal(state["wte.weight"], b.wte.weight.data)
    b.load_state_dict(state)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=name)
    idx = _tokens()
    np.testing.assert_array_equal(a(idx).data, b(idx).data)
    state["wte.weight"][:] = 123.0  # a state dict holds copies, not the live arrays
    assert not np.any(a.wte.weight.data == 123.0)
    f32 = build_model(TINY.with_(dtype="float32"), seed=5)
    f32.load_state_dict(a.state_dict())
    assert f32.wte.weight.dtype == np.float32
    np.testing.assert_allclose(f32.wte.weight.data, a.wte.weight.data, rtol=1e-7)


def test_load_state_dict_errors_name_the_problem():
    model = GPT(TINY)
    state = model.state_dict()
    del state["wpe.weight"]
    with pytest.raises(KeyError, match=r"missing \['wpe.weight'\]"):
        model.load_state_dict(state)
    state = model.state_dict()
    state["blocks.9.extra"] = np.zeros(3)
    with pytest.raises(KeyError, match=r"unexpected \['blocks.9.extra'\]"):
        model.load_state_dict(state)
    state = model.state_dict()
    state["ln_f.weight"] = np.zeros(9)
    with pytest.raises(ValueError, match=r"ln_f.weight: checkpoint shape \(9,\) != model shape"
                                         r" \(8,\)"):
        model.load_state_dict(state)


def test_initialisation_depends_only_on_seed_and_name():
    cfg = TINY.with_(n_layer=4)
    full = dict(build_model(cfg, seed=7).named_parameters())
    stage = build_model(cfg, seed=7, first_layer=2, last_layer=4, pre=False)
    first = build_model(cfg, seed=7, first_layer=0, last_layer=1, post=False)
    for part in (stage, first):
        for name, p in part.named_parameters():
            np.testing.assert_array_equal(p.data, full[name].data, err_msg=name)
    assert len(dict(stage.named_parameters())) == 2 * 12 + 3
    other_seed = build_model(cfg, seed=8)
    assert not np.array_equal(other_seed.blocks[2].mlp.fc.weight.data,
                              full["blocks.2.mlp.fc.weight"].data)
    # Two same-shaped parameters with different names get different values.
    assert not np.array_equal(full["blocks.0.mlp.fc.weight"].data,
                              full["blocks.1.mlp.fc.weight"].data)
    f32 = build_model(cfg.with_(dtype="float32"), seed=7)
    np.testing.assert_array_equal(f32.blocks[3].attn.qkv.weight.data,
                                  full["blocks.3.attn.qkv.weight"].data.astype(np.float32))


def test_initialisation_scales():
    """GPT-2: N(0, 0.02²) weights, 1/√(2L) smaller for projections into the residual stream."""
    cfg = GPTConfig(n_layer=4, d_model=64, dtype="float64")
    model = build_model(cfg, seed=0)
    expected_std = {"mlp.fc.weight": 0.02, "attn.qkv.weight": 0.02,
                    "mlp.proj.weight": residual_std(4), "attn.proj.weight": residual_std(4)}
    for suffix, std in expected_std.items():
        w = np.concatenate([p.data.ravel() for n, p in model.named_parameters()
                            if n.endswith(suffix)])
        assert abs(w.std() / std - 1.0) < 0.03, f"{suffix}: std {w.std():.4g}, expected {std}"
    assert math.isclose(residual_std(4), 0.02 / math.sqrt(8))
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert np.all(p.data == 0.0), name
        if name.startswith(("ln", "blocks.0.ln")) and name.endswith(".weight"):
            assert np.all(p.data == 1.0), name


# --------------------------------------------------------------------------------------------
# Gradients of the whole model
# --------------------------------------------------------------------------------------------
def _manual_untied_loss(model: GPT, idx, targets, head: Tensor) -> Tensor:
    """The model's loss with the head's use of wte replaced by the separate tensor ``head``."""
    layout = model.layers.sequence_layout(idx.shape[1])
    x = model.embed(idx, layout)
    for block in model.blocks:
        x = block(x, layout)
    return ops.cross_entropy(ops.linear(model.ln_f(x), head), targets)


def test_tied_head_gradient_is_the_sum_of_both_uses():
    model = build_model(TINY, seed=0)
    idx, targets = _tokens(seed=1), _tokens(seed=2)
    wte = model.wte.weight
    model(idx, targets).backward()
    tied = wte.grad.copy()

    model.zero_grad()
    head = Tensor(wte.data.copy(), requires_grad=True)
    untied = _manual_untied_loss(model, idx, targets, head)
    np.testing.assert_allclose(untied.item(), model(idx, targets).item(), rtol=1e-14)
    untied.backward()
    embedding_part, head_part = wte.grad, head.grad
    assert np.abs(embedding_part).max() > 1e-6 and np.abs(head_part).max() > 1e-6
    np.testing.assert_allclose(tied, embedding_part + head_part, rtol=1e-12, atol=1e-15)

    check_gradients(lambda **_: model(idx, targets), {"wte.weight": wte},
                    label="tied wte (embedding + head)")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpt_gradients_of_every_parameter(dropout):
    """Every element of every parameter, against central differences.

    With dropout the masks are a function of the DropoutKey alone, so each of the thousands of
    forward passes of the finite differences applies exactly the same masks.
    """
    cfg = TINY.with_(dropout=dropout)
    model = build_model(cfg, seed=0)
    idx, targets = _tokens(seed=3), _tokens(seed=4)
    key = _key(2) if dropout else None
    if dropout:
        assert model(idx, targets, key=key).item() != model(idx, targets).item()
    params = dict(model.named_parameters())
    assert len(params) == 2 + 12 * 2 + 2
    check_gradients(lambda **_: model(idx, targets, key=key), params,
                    label=f"GPT loss (dropout {dropout})")


def test_causality():
    """Logits at positions ≤ t do not depend on the tokens at positions > t."""
    model = build_model(TINY, seed=0)
    idx = _tokens(seed=5)
    logits = model(idx).data  # (B, T, V)
    assert logits.shape == (2, 5, 7)
    rng = np.random.default_rng(6)
    for t in range(4):
        changed = idx.copy()
        changed[:, t + 1:] = (idx[:, t + 1:] + rng.integers(1, 7, (2, 4 - t))) % 7
        new = model(changed).data
        np.testing.assert_allclose(new[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-13,
                                   err_msg=f"future tokens after position {t} leaked")
        assert np.abs(new[:, -1] - logits[:, -1]).max() > 1e-6  # the change does matter


def test_sequence_longer_than_seq_len_is_rejected():
    with pytest.raises(ValueError, match="length 6 exceeds seq_len 5"):
        GPT(TINY)(_tokens((1, 6)))


# --------------------------------------------------------------------------------------------
# Configuration and cost model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(n_head=3), "n_head 3 does not divide d_model 8"),
    (dict(d_model=0), "d_model must be positive, got 0"),
    (dict(n_layer=-1), "n_layer must be positive, got -1"),
    (dict(vocab_size=0), "vocab_size must be positive"),
    (dict(seq_len=0), "seq_len must be positive"),
    (dict(n_head=0), "n_head must be positive"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dtype="float16"), "dtype must be float32 or float64"),
])
def test_gpt_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.with_(**changes)


def test_flops_per_token_medium_preset():
    shape = {k: v for k, v in PRESETS["medium"].items() if k != "batch_size"}
    cfg = GPTConfig(**shape)  # 4 layers, d_model 256, seq 128, vocab 65
    model = GPT(cfg)
    # Parameters that enter a matrix product: every 2-D block weight, and wte (the head).
    counted = sum(p.size for n, p in model.named_parameters()
                  if n.startswith("blocks.") and p.ndim == 2) + model.wte.weight.size
    assert matmul_params(cfg) == counted == 4 * 12 * 256**2 + 65 * 256
    # 6 FLOPs per matmul parameter per token (forward 2, backward 4) plus attention scores
    # and weighted values over the causal half of the sequence: 6 · L · T · d.
    assert flops_per_token(cfg) == 6 * counted + 6 * 4 * 128 * 256 == 19_760_640
