"""Data parallelism: serial equivalence of every strategy, communication volume, the CLI.

Multi-process checks run in few launches (launching is the slow part):

* ``equivalence.py`` with the float64 matrix of strategy × ZeRO stage × gradient
  accumulation (plus overlap off, the ring, tiny buckets), on 2 and on 4 ranks;
* ``dp_checks.py``: float32 and dropout equivalence, every strategy against the plain
  per-parameter all-reduce, the communication volume read from the trace against the
  tutorial's arithmetic, the start-up broadcast, ZeRO memory and a ZeRO checkpoint loaded
  into another layout, on 2 and on 4 ranks;
* ``train.py`` itself, as ``make train`` and with ``--zero 1 --allreduce ring --trace``.

dp = 1 runs in this process: ``DataParallel`` over ``MPI.COMM_SELF`` must leave training
exactly as it is without it (the all-reduce of one rank is the identity).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_TEXT
from mpi_util import equivalence_checks, parse_verdict, run_mpi_ok, script

from mpipar.comm import MPI, Comm
from mpipar.data import CharTokenizer, get_batch, make_dataset, split_microbatches
from mpipar.model import GPT, GPTConfig
from mpipar.optim import AdamW, clip_grad_norm, grad_norm_sq
from mpipar.parallel.data_parallel import MIB, DataParallel, assign_buckets
from mpipar.parallel.zero import ZeroAdamW, make_grad_sync
from mpipar.trace import human_bytes, load_jsonl

STRATEGIES = ("per_param", "flat", "bucketed")


# ---- multi-process: serial equivalence in float64 -------------------------------------------


def float64_matrix(dp: int) -> dict:
    """Every strategy × ZeRO stage × accumulation on/off, and the other switches once."""
    layouts = [
        {"name": f"{s} zero{z} mb{m}", "dp": dp,
         "train": {"dp_strategy": s, "zero": z, "microbatches": m}}
        for s in STRATEGIES for z in (0, 1, 2) for m in (1, 2)
    ]
    layouts += [
        {"name": "no overlap mb2", "dp": dp, "train": {"overlap": False, "microbatches": 2}},
        {"name": "ring", "dp": dp, "train": {"allreduce": "ring"}},
        {"name": "ring zero1 mb2", "dp": dp,
         "train": {"allreduce": "ring", "zero": 1, "microbatches": 2}},
        {"name": "ring zero2", "dp": dp, "train": {"allreduce": "ring", "zero": 2}},
        {"name": "tiny buckets mb2", "dp": dp, "train": {"bucket_mb": 0.002, "microbatches": 2}},
        {"name": "zero3 mb2", "dp": dp, "train": {"zero": 3, "microbatches": 2}},
        {"name": "zero3 no prefetch", "dp": dp, "train": {"zero": 3, "overlap": False}},
    ]
    if dp == 2:  # recomputation leaves every bit as it was, whatever dp does around it
        layouts += [
            {"name": "bucketed zero0 mb2 full recompute", "dp": dp,
             "train": {"zero": 0, "microbatches": 2, "recompute": "full"},
             "same_bits_as": "bucketed zero0 mb2"},
            {"name": "flat zero2 mb2 selective recompute", "dp": dp,
             "train": {"dp_strategy": "flat", "zero": 2, "microbatches": 2,
                       "recompute": "selective"},
             "same_bits_as": "flat zero2 mb2"},
            {"name": "zero3 mb2 full recompute", "dp": dp,
             "train": {"zero": 3, "microbatches": 2, "recompute": "full"},
             "same_bits_as": "zero3 mb2"},
        ]
    if dp == 4:  # with tensor parallelism: replicated gradients are summed over tp around dp
        layouts += [
            {"name": f"dp2 tp2 sequence-parallel zero{z}", "dp": 2, "tp": 2,
             "train": {"sequence_parallel": True, "zero": z, "bucket_mb": 0.002}}
            for z in (0, 2, 3)
        ]
    return {"steps": 3, "train": {"batch_size": 8}, "layouts": layouts}


@pytest.mark.parametrize("n", [2, 4])
def test_float64_matches_one_process(n):
    """Losses, grad norms, parameters and AdamW state vs the 1-process run, to 1e-10."""
    spec = float64_matrix(n)
    proc = run_mpi_ok(n, [script("equivalence.py"), json.dumps(spec)], timeout=150)
    verdict = parse_verdict(proc)
    names = [check for layout in spec["layouts"] for check in equivalence_checks(layout)]
    assert sorted(verdict) == sorted(names), sorted(verdict)
    failures = [msg for msgs in verdict.values() for msg in msgs]
    assert failures == [], "\n".join(failures)


# ---- multi-process: dp_checks.py --------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"n{n}")
def checks(request) -> dict:
    proc = run_mpi_ok(request.param, [script("dp_checks.py")], timeout=150)
    return parse_verdict(proc)


def _assert_passed(verdict: dict, prefix: str, at_least: int = 1) -> None:
    names = [k for k in verdict if k.startswith(prefix)]
    assert len(names) >= at_least, f"expected checks named {prefix!r}*, got {sorted(verdict)}"
    failures = [msg for k in names for msg in verdict[k]]
    assert failures == [], "\n".join(failures)


def test_float32_and_dropout_match_one_process(checks):
    _assert_passed(checks, "equivalence", at_least=4)


def test_every_strategy_is_the_per_parameter_allreduce(checks):
    """Buckets, overlap and the ring change the messages, not the averaged gradients."""
    _assert_passed(checks, "per-parameter all-reduce", at_least=7)


def test_communication_volume_is_the_theory(checks):
    """Calls and bytes per step per strategy, the ring's 2(n−1)/n, ZeRO's two halves."""
    _assert_passed(checks, "volume", at_least=6 + 1 + 4)


def test_replicas_start_identical(checks):
    _assert_passed(checks, "broadcast at start")
    _assert_passed(checks, "replicas start identical")


def test_zero_memory_is_one_over_dp(checks):
    _assert_passed(checks, "zero memory is 1/dp")


def test_zero_checkpoint_loads_into_another_layout(checks):
    _assert_passed(checks, "zero checkpoint across layouts")


# ---- multi-process: the command line -----------------------------------------------------------


def test_make_train_command_runs(run_train):
    """``make train`` is ``mpirun -n 4 python train.py``: 4-way dp, bucketed, overlapped."""
    proc = run_train(["--steps", "3"], n=4, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "world 4 = dp 4 × tp 1 × pp 1" in out, out
    assert "communication per rank" in out, out
    table = [line.split()[:3] for line in out.splitlines()]
    assert ["iallreduce", "dp"] in [row[:2] for row in table], out
    assert "done: 3 steps" in out, out


def test_zero_ring_cli_trace_and_summary(run_train, tiny_data, tmp_path):
    """``--dp 4 --zero 1 --allreduce ring --trace``: records, table and memory line agree."""
    trace, metrics = tmp_path / "trace.jsonl", tmp_path / "metrics.jsonl"
    proc = run_train(["--preset", "tiny", "--steps", "3", "--eval-every", "0", "--data",
                      tiny_data, "--dp", "4", "--zero", "1", "--allreduce", "ring",
                      "--trace", trace, "--metrics", metrics], n=4, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = [line.split() for line in proc.stdout.splitlines()]
    sendrecv = [row for row in table if row[:2] == ["sendrecv", "dp"]]
    assert sendrecv and sendrecv[0][2] == str(3 * 2 * 3), proc.stdout  # steps × 2(n−1)

    summary = json.loads(metrics.read_text().splitlines()[-1])
    memory = summary["memory_rank0"]
    psi = memory["params"]
    shard = -(-psi // 4)
    assert memory["optimizer_state_bytes"] == 2 * shard * 4, memory
    assert memory["baseline_optimizer_state_bytes"] == 2 * psi * 4, memory
    line = (f"ZeRO-1 over dp 4, per rank (× the size without ZeRO): optimizer state "
            f"{human_bytes(2 * shard * 4)} (0.25 × {human_bytes(2 * psi * 4)}), gradients "
            f"{human_bytes(4 * shard * 4)} (1.00 × {human_bytes(psi * 4)})")
    assert psi % 4 == 0 and line in proc.stdout, f"{line!r} not in\n{proc.stdout}"

    records = load_jsonl(str(trace))
    assert {r.rank for r in records} == {0, 1, 2, 3}
    dp = [r for r in records if r.group == "dp"]
    broadcast = [r for r in dp if r.op == "broadcast"]
    assert [(r.phase, r.nbytes) for r in broadcast] == [("other", psi * 4)] * 4
    for rank in range(4):
        for step in range(3):
            recs = [r for r in dp if r.rank == rank and r.step == step and r.op == "sendrecv"]
            phases = sorted(r.phase for r in recs)
            assert phases == ["backward"] * 3 + ["optimizer"] * 3, (rank, step, phases)
            assert all(r.nbytes == shard * 4 and r.dtype == "float32" for r in recs)
            assert all(r.peer == (rank + 1) % 4 for r in recs)  # the right neighbour
    assert (tmp_path / "trace.chrome.json").exists()
    chrome = json.loads((tmp_path / "trace.chrome.json").read_text())
    assert any(e.get("name", "").startswith("sendrecv [dp]") for e in chrome["traceEvents"])


# ---- in-process: buckets and gradient buffers ----------------------------------------------------


@pytest.mark.parametrize("sizes,cap,expected", [
    ([4, 4, 4, 4], 8, [[3, 2], [1, 0]]),
    ([4, 4, 4], 8, [[2, 1], [0]]),          # the model's first parameters: a short bucket
    ([2, 100, 2, 2], 8, [[3, 2, 1], [0]]),  # a big parameter closes the bucket it joins
    ([4, 4, 4], 0, [[2], [1], [0]]),        # per-parameter
    ([4, 4, 4], float("inf"), [[2, 1, 0]]),  # flat
])
def test_assign_buckets(sizes, cap, expected):
    assert assign_buckets(sizes, cap) == expected


def tiny_model(dtype: str = "float64", seed: int = 3) -> GPT:
    tok = CharTokenizer.from_text(TINY_TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=8, seq_len=8,
                    dtype=dtype)
    model = GPT(cfg)
    model.initialize(seed)
    return model


def self_comm() -> Comm:
    return Comm(MPI.COMM_SELF, "dp")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_buckets_tile_the_flat_buffer_last_parameter_first(strategy, zero):
    model = tiny_model()
    params = model.parameters()
    sync = make_grad_sync(params, self_comm(), strategy=strategy, bucket_mb=1600 / MIB,
                          zero=zero)
    assert sync.buckets[0].hi == sync.padded and sync.buckets[-1].lo == 0
    for a, b in zip(sync.buckets[:-1], sync.buckets[1:], strict=True):
        assert a.lo == b.hi, "buckets must be contiguous, from the end of the buffer down"
    order = [p for b in sync.buckets for p in b.params]
    assert order == params[::-1], "buckets hold the parameters in reverse model order"
    expected = {"per_param": len(params), "flat": 1,
                "bucketed": len(assign_buckets([p.size * 8 for p in params], 1600))}[strategy]
    assert len(sync.buckets) == expected
    if strategy == "bucketed":
        assert expected > 2 and all(b.numel * 8 >= 1600 for b in sync.buckets[:-1])


def test_grads_are_views_of_one_buffer_kept_across_steps():
    model = tiny_model()
    sync = DataParallel(model.parameters(), self_comm())
    buffer = sync.flat_grads
    for _ in range(2):
        sync.zero_grad()
        assert sync.flat_grads is buffer, "zero_grad must zero in place, not reallocate"
        for p, o in zip(sync.params, sync.offsets, strict=True):
            assert np.shares_memory(p.grad, buffer[o:o + p.size])
            assert not p.grad.any()
        x, y = get_batch(dataset(model).train, 4, 8, 0, 0)
        model(x, y).backward()
        assert buffer.any(), "backward must accumulate into the flat buffer"
        sync.finish()


def test_set_sync_true_on_every_microbatch_is_caught():
    """Launching a bucket and then adding to it would race with MPI: it must raise."""
    model = tiny_model()
    sync = DataParallel(model.parameters(), self_comm(), strategy="per_param")
    x, y = get_batch(dataset(model).train, 4, 8, 0, 0)
    model(x, y).backward()  # sync on: every parameter's all-reduce starts in its hook
    with pytest.raises(RuntimeError, match="changed after its bucket was launched"):
        model(x, y).backward()
    with pytest.raises(RuntimeError, match="in flight"):
        sync.zero_grad()
    sync.finish()
    sync.zero_grad()


def test_bad_arguments_are_named():
    params = tiny_model().parameters()
    for kwargs, match in (({"strategy": "ring"}, "strategy"), ({"allreduce": "nccl"}, "nccl"),
                          ({"zero": 3}, "zero"), ({"bucket_mb": 0}, "bucket_mb")):
        with pytest.raises(ValueError, match=match):
            make_grad_sync(params, self_comm(), **kwargs)


# ---- in-process: dp = 1 changes nothing ----------------------------------------------------------


def dataset(model: GPT):
    return make_dataset(TINY_TEXT, CharTokenizer.from_text(TINY_TEXT), seq_len=model.cfg.seq_len)


def train(model: GPT, steps: int, microbatches: int, sync: DataParallel | None,
          optimizer) -> list[float]:
    """A bare training loop (the Trainer's, without a grid): returns the grad norms."""
    data, norms = dataset(model), []
    for step in range(steps):
        x, y = get_batch(data.train, 8, model.cfg.seq_len, 0, step)
        if sync is not None:
            sync.zero_grad()
        else:
            model.zero_grad()
        xs, ys = split_microbatches(x, microbatches), split_microbatches(y, microbatches)
        for k in range(microbatches):
            if sync is not None:
                sync.set_sync(k == microbatches - 1)
            (model(xs[k], ys[k]) * (1.0 / microbatches)).backward()
        if sync is not None:
            sync.finish()
        if isinstance(optimizer, ZeroAdamW):
            norm = float(np.sqrt(optimizer.grad_norm_sq(lambda p: True)))
            optimizer.clip(norm, 0.5)
        else:
            norm = float(np.sqrt(grad_norm_sq(model.parameters())))
            clip_grad_norm(model.parameters(), 0.5)
        norms.append(norm)
        optimizer.step(1e-2)
    return norms


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("zero", [0, 1, 2])
@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("allreduce", ["mpi", "ring"])
def test_one_rank_data_parallel_changes_nothing(strategy, zero, microbatches, allreduce):
    """Same grad norms and parameters as plain training, to 1e-12 (float64)."""
    ref_model = tiny_model()
    ref_norms = train(ref_model, 3, microbatches, None,
                      AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1))
    model = tiny_model()
    sync = make_grad_sync(model.parameters(), self_comm(), strategy=strategy,
                          allreduce=allreduce, zero=zero, bucket_mb=0.002)
    opt = (ZeroAdamW(model.parameters(), sync, lr=1e-2, weight_decay=0.1) if zero
           else AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    norms = train(model, 3, microbatches, sync, opt)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        np.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-12, err_msg=name)


def test_float32_buffers_keep_the_dtype():
    model = tiny_model("float32")
    sync = make_grad_sync(model.parameters(), self_comm(), zero=2)
    opt = ZeroAdamW(model.parameters(), sync, lr=1e-2, weight_decay=0.1)
    train(model, 1, 1, sync, opt)
    assert sync.grad_shard.dtype == np.float32 and opt.m.dtype == np.float32
    assert all(p.data.dtype == np.float32 for p in model.parameters())


def test_zero_checkpoint_resumes_on_one_process(run_train, tiny_data, tmp_path):
    """Saved by 2 ranks with ZeRO-2, resumed by 1 plain process: the uninterrupted run."""
    common = ["--preset", "tiny", "--steps", "4", "--eval-every", "0", "--data", tiny_data,
              "--dtype", "float64", "--quiet"]
    whole, first, second = (tmp_path / f"{n}.jsonl" for n in ("whole", "first", "second"))
    ckpt = tmp_path / "ckpt"
    for proc in (run_train([*common, "--metrics", whole]),
                 run_train([*common, "--dp", "2", "--zero", "2", "--stop-at", "2", "--save",
                            ckpt, "--metrics", first], n=2),
                 run_train([*common, "--resume", ckpt, "--metrics", second])):
        assert proc.returncode == 0, proc.stderr

    def losses(path) -> dict[int, float]:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return {r["step"]: r["loss"] for r in lines if "loss" in r and "step" in r}

    expected, got = losses(whole), {**losses(first), **losses(second)}
    assert sorted(got) == [0, 1, 2, 3], got
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-10 * abs(loss), (step, got[step], loss)
