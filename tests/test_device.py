"""The GPU code path, on every run: mpipar on a strict stand-in for cupy (tests/fakecupy.py).

cupy refuses what numpy allows: implicit device-to-host conversion, numpy arrays mixed with
device arrays, device buffers handed to an MPI that cannot read them, functions it does not
have. The stand-in refuses the same, so a slip into numpy-only code fails here, on a CPU,
instead of on the first GPU it meets. Each check runs on the stand-in (results equal to
numpy's bit for bit) and, where cupy and a CUDA device are present, on the real GPU too
(``make gpu-check``; float64 results within 1e-10 of numpy's).

First, that the stand-in catches each kind of mistake, so that the rest cannot pass by
accident; then ops and model gradients, training steps, save/resume and generation (train.py
and mpipar.generate with ``--device gpu``), and the dp, tp and pp layouts under mpirun.
"""

from __future__ import annotations

import contextlib
import json

import fakecupy
import numpy as np
import pytest
import test_ops
from conftest import TINY_ARGS, check_ok, describe_run
from device_util import assert_same, device_env, device_names, on_device
from gradcheck import check_gradients
from mpi_util import parse_verdict, run_mpi, script
from test_ops import CASES

from mpipar import backend, comm, ops
from mpipar.autograd import Tensor
from mpipar.checkpoint import load_checkpoint
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig, build_model
from mpipar.parallel.full_state import full_state
from mpipar.precision import resolve_precision
from mpipar.profile import Profiler
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

DEVICES = device_names()


# --------------------------------------------------------------------------------------------
# The stand-in catches each kind of mistake
# --------------------------------------------------------------------------------------------
def _host_conversion(x):
    return np.asarray(x)


def _host_array(x):
    return np.array(x)


def _dunder_array(x):
    return x.__array__()


def _numpy_plus_device(x):
    return np.ones(x.shape) + x


def _device_plus_numpy(x):
    return x * np.ones(x.shape)


def _xp_with_numpy_input(x):
    return fakecupy.add(x, np.ones(x.shape))


def _assign_numpy(x):
    x[...] = np.zeros(x.shape)


def _missing_function(x):
    return fakecupy.tensordot(x, x.T)  # one mpipar does not use: not in the stand-in


def _numpy_ufunc_method(x):
    np.add.at(x, [0], 1.0)  # numpy's ufunc method on a device array: xp.add.at is the one


def _missing_method(x):
    return x.tobytes()


def _bfloat16(x):
    return x.astype("bfloat16")


def _unstaged_mpi_buffer(x, monkeypatch):
    monkeypatch.setenv(comm.CUDA_AWARE_ENV, "0")  # an MPI that cannot read device memory
    monkeypatch.setattr(comm, "_staged", lambda buf, copy_in: buf)  # forget the host copy
    comm.Comm.self_group("check").allreduce(x)


MISTAKES = [_host_conversion, _host_array, _dunder_array, _numpy_plus_device,
            _device_plus_numpy, _xp_with_numpy_input, _assign_numpy, _missing_function,
            _numpy_ufunc_method, _missing_method, _bfloat16, _unstaged_mpi_buffer]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.__name__.strip("_") for m in MISTAKES])
def test_standin_refuses(mistake, monkeypatch):
    """Each mistake raises on a device array, and the same code runs on a numpy array."""
    x = fakecupy.asarray(np.arange(6.0).reshape(2, 3))
    args = (monkeypatch,) if mistake is _unstaged_mpi_buffer else ()
    with pytest.raises((TypeError, AttributeError, BufferError)):
        mistake(x, *args)
    if mistake not in (_missing_function, _bfloat16, _xp_with_numpy_input):
        mistake(np.arange(6.0).reshape(2, 3), *args)  # fine on the host


def test_numpy_written_into_an_op_fails_on_the_standin(monkeypatch):
    """ops.py with numpy in place of xp (a slip that numpy alone never shows): the embedding's
    gradient then builds a host array and scatters device rows into it, which fails."""
    monkeypatch.setattr(ops, "array_module", lambda *arrays: np)
    ids, weight = np.array([[1, 3, 1]]), np.arange(12.0).reshape(4, 3)

    def grad(xp):
        w = Tensor(xp.asarray(weight), requires_grad=True)
        ops.embedding(w, xp.asarray(ids)).backward(xp.ones((1, 3, 3)))
        return w.grad

    assert grad(np)[1].tolist() == [2.0, 2.0, 2.0]
    with on_device("fakecupy") as xp, pytest.raises(TypeError):
        grad(xp)


def test_standin_is_numpy_where_cupy_is():
    """Explicit transfers, 0-d results, scalars, streams: what cupy allows works."""
    x = fakecupy.asarray(np.arange(6.0).reshape(2, 3))
    assert type(x) is fakecupy.ndarray and type(x.get()) is np.ndarray
    s = x.sum()
    assert type(s) is fakecupy.ndarray and s.shape == () and float(s) == 15.0
    y = np.exp(x) * np.float64(2.0) + 1  # numpy ufuncs and numpy scalars dispatch to the device
    assert type(y) is fakecupy.ndarray
    assert np.array_equal(y.get(), np.exp(np.arange(6.0).reshape(2, 3)) * 2.0 + 1)
    with on_device("fakecupy"):
        assert backend.array_module(x) is fakecupy and backend.get_xp() is fakecupy
        assert backend.device() == "gpu"
    before = fakecupy.cuda.Stream.synchronizations
    fakecupy.cuda.Device().synchronize()
    fakecupy.cuda.get_current_stream().synchronize()
    assert fakecupy.cuda.Stream.synchronizations == before + 2


# --------------------------------------------------------------------------------------------
# Ops and model gradients
# --------------------------------------------------------------------------------------------
def _run_case(case, seed: int, to_device):
    rng = np.random.default_rng(seed)
    arrays = {n: np.asarray(make(rng), dtype=np.float64) for n, make in case.inputs.items()}
    tensors = {n: Tensor(to_device(a), requires_grad=n not in case.frozen)
               for n, a in arrays.items()}
    out = case.fn(**tensors)
    r = np.random.default_rng(1).standard_normal(out.shape)
    out.backward(to_device(r))
    grads = {n: None if t.grad is None else backend.to_numpy(t.grad) for n, t in tensors.items()}
    return out.numpy(), grads, tensors


# Arrays the cases of test_ops close over (ids, targets, masks): on the device, device copies.
CONSTANTS = ("IDS", "TARGETS", "ATT_MASK", "DROP_MASK")


@pytest.mark.parametrize("device", DEVICES)
def test_every_op_on_device_matches_numpy(device, monkeypatch):
    """Forward values and gradients of every op (test_ops's cases), device against numpy."""
    exact = device == "fakecupy"
    results = {case.label: _run_case(case, len(case.label), np.asarray) for case in CASES}
    with on_device(device) as xp:
        for name in CONSTANTS:
            monkeypatch.setattr(test_ops, name, xp.asarray(getattr(test_ops, name)))
        got_results = {case.label: _run_case(case, len(case.label), xp.asarray)
                       for case in CASES}
    for case in CASES:
        (out, grads, _), (got, got_grads, tensors) = results[case.label], got_results[case.label]
        assert all(type(t.data) is xp.ndarray for t in tensors.values()), case.label
        assert_same(got, out, f"{case.label}: forward", exact)
        for name, g in grads.items():
            assert (g is None) == (got_grads[name] is None), f"{case.label}: d{name}"
            if g is not None:
                assert_same(got_grads[name], g, f"{case.label}: d{name}", exact)


GRADCHECKED = ("gelu", "layer_norm", "cross_entropy", "causal_attention, 3 heads, T=5")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_on_device(device):
    """Central differences on the device, for a representative subset of the ops."""
    cases = [c for c in CASES if c.label.startswith(GRADCHECKED)]
    assert len(cases) >= len(GRADCHECKED)
    with on_device(device) as xp:
        for case in cases:
            rng = np.random.default_rng(len(case.label))
            tensors = {n: Tensor(xp.asarray(np.asarray(make(rng), dtype=np.float64)),
                                 requires_grad=n not in case.frozen)
                       for n, make in case.inputs.items()}
            check_gradients(case.fn, tensors, label=f"{case.label} on {device}")


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_gradients_on_device(device):
    """The tiny GPT's loss and every parameter gradient on the device equal numpy's."""
    cfg = GPTConfig(vocab_size=7, n_layer=2, n_head=2, d_model=8, seq_len=5, dtype="float64")
    idx = np.random.default_rng(3).integers(0, 7, (2, 5))
    targets = np.random.default_rng(4).integers(0, 7, (2, 5))

    def loss_and_grads():
        model = build_model(cfg, seed=0)
        xp = backend.get_xp()
        loss = model(xp.asarray(idx), xp.asarray(targets))
        loss.backward()
        return loss.numpy(), {n: backend.to_numpy(p.grad) for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    with on_device(device):
        got_loss, got_grads = loss_and_grads()
    exact = device == "fakecupy"
    assert_same(got_loss, loss, "loss", exact)
    for name, g in grads.items():
        assert_same(got_grads[name], g, f"d {name}", exact)


# --------------------------------------------------------------------------------------------
# Training, in process
# --------------------------------------------------------------------------------------------
TEXT = "the quick brown fox jumps over a lazy dog.\n" * 60


def _train(optimizer: str, precision: str = "fp32", dtype: str = "float64", steps: int = 3):
    tok = CharTokenizer.from_text(TEXT)
    data = make_dataset(TEXT, tok, seq_len=16, source="device test")
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=16, seq_len=16,
                    dtype=dtype)
    tc = TrainConfig(steps=steps, batch_size=4, optimizer=optimizer, precision=precision,
                     eval_tokens=64, warmup_steps=1)
    grid = ProcessGrid.single()
    trainer = Trainer(cfg, tc, grid, data, Tracer(0))
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    val = trainer.evaluate()
    model, optim = full_state(trainer.params, trainer.optimizer, grid, trainer.dtype)
    return trainer, losses, val, model, optim


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_steps_on_device_match_numpy(device, optimizer):
    """Losses, validation loss, parameters and optimizer state after 3 steps (float64)."""
    _, losses, val, model, optim = _train(optimizer)
    with on_device(device) as xp:
        trainer, got_losses, got_val, got_model, got_optim = _train(optimizer)
        assert all(type(p.data) is xp.ndarray for p in trainer.params)
    exact = device == "fakecupy"
    assert_same(got_losses, losses, "losses", exact)
    assert_same(got_val, val, "validation loss", exact)
    for name in model:
        assert_same(got_model[name], model[name], name, exact)
    for name in optim:
        assert_same(got_optim[name], optim[name], f"optimizer {name}", exact)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_training_runs_on_device(device):
    """Mixed precision (fp16 compute, fp32 masters, loss scaling) trains on the device."""
    _, losses, *_ = _train("adamw", precision="fp16", dtype="float32", steps=2)
    with on_device(device):
        _, got, *_ = _train("adamw", precision="fp16", dtype="float32", steps=2)
    assert np.all(np.isfinite(got)) and abs(got[0] - losses[0]) < 1e-2, (got, losses)


def test_profiler_waits_for_the_device_at_each_region():
    """Kernels run asynchronously on a GPU: the profiler synchronises at every region
    boundary, so each operation's row holds its own kernels' time (none on the CPU)."""
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=8, seq_len=8)
    tc = TrainConfig(steps=1, batch_size=2, eval_tokens=16)
    counter = fakecupy.cuda.Stream
    for device, expect_syncs in (("numpy", False), ("fakecupy", True)):
        with on_device(device) if device != "numpy" else contextlib.nullcontext():
            profiler = Profiler(0)
            trainer = Trainer(cfg, tc, ProcessGrid.single(), make_dataset(TEXT, tok, seq_len=8),
                              profiler)
            before = counter.synchronizations
            trainer.train_step()
            regions = sum(row[0] for row in profiler.rows.values())
            syncs = counter.synchronizations - before
        assert regions > 20
        assert syncs >= 2 * regions if expect_syncs else syncs == 0, (device, syncs, regions)


def test_each_local_rank_takes_its_own_gpu(monkeypatch):
    """Local rank r of a node uses device r mod (devices); 0 without a launcher."""
    monkeypatch.setattr(fakecupy.cuda.runtime, "getDeviceCount", lambda: 4)
    for env, rank, device in (("", "", 0), ("MPI_LOCALRANKID", "2", 2),
                              ("OMPI_COMM_WORLD_LOCAL_RANK", "5", 1)):
        for v in backend.LOCAL_RANK_ENVS:
            monkeypatch.delenv(v, raising=False)
        if env:
            monkeypatch.setenv(env, rank)
        with on_device("fakecupy"):
            assert fakecupy.cuda.Device.current == device, (env, rank)


def test_bf16_is_refused_on_a_device():
    """cupy has no bfloat16 arrays: --precision bf16 is a usage error on a GPU, not a crash."""
    resolve_precision("bf16", "float32")  # numpy has it (ml_dtypes)
    with on_device("fakecupy"), pytest.raises(ValueError, match="cupy has no bfloat16"):
        resolve_precision("bf16", "float32")


# --------------------------------------------------------------------------------------------
# The command line: train.py and mpipar.generate with --device gpu
# --------------------------------------------------------------------------------------------
def _saved(path) -> dict[str, np.ndarray]:
    return load_checkpoint(path)[0]


@pytest.mark.parametrize("device", DEVICES)
def test_train_resume_and_generate_with_device_gpu(device, run_train, run_python, tiny_data,
                                                   tmp_path):
    """float64, 4 steps on the CPU; on the device 2 steps, saved, resumed for 2 more: the same
    final checkpoint; then generation with the KV cache reads it and writes the same text."""
    common = [*TINY_ARGS[:2], "--steps", "4", "--eval-every", "0", "--dtype", "float64",
              "--data", tiny_data, "--quiet"]
    env = device_env(device)
    check_ok(run_train([*common, "--save", tmp_path / "cpu"]))
    check_ok(run_train([*common, "--device", "gpu", "--stop-at", "2", "--save",
                        tmp_path / "half"], env=env))
    check_ok(run_train([*common, "--device", "gpu", "--resume", tmp_path / "half", "--save",
                        tmp_path / "gpu"], env=env))
    want, got = _saved(tmp_path / "cpu"), _saved(tmp_path / "gpu")
    assert sorted(got) == sorted(want)
    for name in want:
        assert_same(got[name], want[name], name, exact=device == "fakecupy")
    gen = ["-m", "mpipar.generate", "--checkpoint", tmp_path / "cpu", "-n", "24", "--greedy",
           "--prompt", "the "]
    text_cpu = check_ok(run_python(gen)).stdout
    text_gpu = check_ok(run_python([*gen, "--device", "gpu"], env=env)).stdout
    assert text_gpu == text_cpu and len(text_cpu) > 24


# --------------------------------------------------------------------------------------------
# dp, tp and pp under mpirun: host-staged, and with the device buffers handed to MPI
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_layouts_on_device_under_mpirun(device):
    """2 ranks: dp 2, tp 2 and pp 2 on the device equal the numpy run of the same layout
    (host-staged and CUDA-aware), and so do ZeRO-1/2/3, the ring all-reduce, sequence
    parallelism, GPipe and the interleaved pipeline with recomputation (host-staged)."""
    # Device buffers straight to MPI: always on the stand-in; on a GPU only when this
    # environment says the MPI is CUDA-aware (the mpich wheel is not).
    aware = device == "fakecupy" or comm.cuda_aware_mpi()
    spec = {"device": device, "exact": device == "fakecupy", "steps": 2, "cuda_aware": aware}
    proc = run_mpi(2, [script("device_checks.py"), json.dumps(spec)], timeout=150,
                   env=device_env(device))
    verdict = parse_verdict(proc)
    assert proc.returncode == 0, describe_run(proc)
    modes = ("staged", "cuda-aware") if aware else ("staged",)
    expected = [f"{layout} {mode}" for layout in ("dp", "tp", "pp") for mode in modes]
    expected += [f"{variant} staged" for variant in (
        "dp zero1", "dp zero2", "dp zero3", "dp ring all-reduce, per-param", "pp gpipe",
        "tp sequence-parallel", "pp interleaved, recompute")]
    assert sorted(verdict) == sorted(expected), verdict
    failed = {name: msgs for name, msgs in verdict.items() if msgs}
    assert not failed, failed
