"""The planner (`python -m mpipar.plan`): published numbers, the command line, infeasible
layouts with their reasons, and calibration. Traced bytes and measured memory of real runs
are `test_plan_trace.py`'s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import check_ok

from mpipar.autograd import graph_nbytes
from mpipar.model import build_model
from mpipar.parallel.pipeline.checker import simulate
from mpipar.parallel.pipeline.schedules import build_schedule
from mpipar.plan.cluster import A100_CLUSTER, Cluster, load_cluster
from mpipar.plan.compute import bubble_fraction, flops_per_step, megatron_flops
from mpipar.plan.layout import Layout
from mpipar.plan.memory import (
    activation_bytes,
    block_activation_bytes,
    model_state_bytes,
    parameter_count,
    state_bytes,
)
from mpipar.plan.model_shape import MEGATRON_TABLE1, PUBLISHED, ModelShape, from_preset
from mpipar.plan.search import evaluate


def test_zero_paper_figure_1():
    """Rajbhandari et al. 2020 (ZeRO), Figure 1: Ψ = 7.5B, N_d = 64, mixed-precision Adam
    (K = 12): 120 GB, 31.4 GB, 16.6 GB and 1.9 GB per device for stages 0, 1, 2, 3."""
    got = [model_state_bytes(7_500_000_000, 64, z) / 1e9 for z in range(4)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]
    # mpipar's own count for a 7.5B GPT in bf16 agrees up to the padding of Ψ to 64 | P.
    shape = ModelShape(32, 4096, 32, 2048, 50257)
    psi = parameter_count(shape)
    for z in range(3):
        exact = sum(state_bytes(shape, Layout(dp=64, zero=z, precision="bf16")))
        assert 0 <= exact - model_state_bytes(psi, 64, z) < 16 * 64, z


def test_gpt3_175b_needs_16_psi():
    """Brown et al. 2020: 175B parameters; in mixed precision with Adam, 16Ψ bytes of model
    states on one device (the ZeRO paper's 2Ψ + 2Ψ + 12Ψ), 2.8 TB."""
    shape = PUBLISHED["gpt3-175b"]
    psi = parameter_count(shape)
    assert abs(psi / 175e9 - 1) < 0.005
    assert sum(state_bytes(shape, Layout(precision="bf16"))) == 16 * psi


@pytest.mark.parametrize("name", sorted(MEGATRON_TABLE1))
def test_megatron_table_1_flops(name):
    """Narayanan et al. 2021, eq. (3), F = 96·B·s·L·h²(1 + s/(6h) + V/(16Lh)) with full
    recomputation, and Table 1's parameter counts (1.7, 18.4, 145.6, 1008.0 billion).
    mpipar counts causal attention at half, 8·B·s²·L·h fewer FLOPs, and otherwise the same."""
    shape, (_, batch) = PUBLISHED[name], MEGATRON_TABLE1[name]
    s, h, n, v = shape.seq_len, shape.d_model, shape.n_layer, shape.vocab_size
    paper = 96 * batch * s * n * h * h * (1 + s / (6 * h) + v / (16 * n * h))
    assert megatron_flops(shape, batch) == pytest.approx(paper, rel=1e-12)
    ours = flops_per_step(shape, Layout(batch_size=batch, recompute="full"))
    assert ours == megatron_flops(shape, batch) - 8 * batch * s * s * n * h
    table = {"megatron-1.7b": 1.7, "megatron-18.4b": 18.4, "megatron-145.6b": 145.6,
             "megatron-1t": 1008.0}[name]
    assert round(parameter_count(shape) / 1e9, 1) == table


@pytest.mark.parametrize("recompute, sp", [("none", False), ("none", True),
                                           ("selective", True), ("full", False)])
def test_korthikanti_activations_with_megatron_structure(recompute, sp):
    """Korthikanti et al. 2022, Table 2: per layer sbh(10 + 24/t + 5as/(ht)) with tensor
    parallelism, sbh(34 + 5as/h)/t with sequence parallelism, selective recomputation
    without the 5as/h term, full recomputation 2sbh. GPT-3 175B, t = 8, b = 1."""
    shape = PUBLISHED["gpt3-175b"]
    s, h, a, t = shape.seq_len, shape.d_model, shape.n_head, 8
    lay = Layout(tp=t, batch_size=1, recompute=recompute, sequence_parallel=sp)
    core = 0 if recompute == "selective" else 5 * a * s / h
    expected = {("none", False): s * h * (10 + 24 / t + core / t),
                ("none", True): s * h * (34 + core) / t,
                ("selective", True): s * h * 34 / t,
                ("full", False): 2 * s * h}[(recompute, sp)]
    assert block_activation_bytes(shape, lay, "megatron") == pytest.approx(expected)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activations_of_one_process_within_10_percent_of_the_graph(recompute):
    """Without a pipeline, what backward keeps for the whole model (blocks, head, loss) is
    the loss's autograd graph; the estimate is within 10% of it."""
    shape = from_preset("tiny")
    model = build_model(shape.config(), seed=0)
    model.set_recompute(recompute)
    idx = np.random.default_rng(0).integers(0, shape.vocab_size, (8, shape.seq_len))
    loss = model(idx, idx)
    measured = graph_nbytes(loss, exclude=[p.data for p in model.parameters()])
    predicted = activation_bytes(shape, Layout(batch_size=8, recompute=recompute))
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


@pytest.mark.parametrize("schedule, m, v", [("gpipe", 4, 1), ("1f1b", 8, 1),
                                            ("interleaved", 4, 2), ("naive", 2, 1)])
def test_bubble_is_the_simulator_s(schedule, m, v):
    """With forward = backward time and no communication, the simulated pipeline idles the
    fraction the planner charges."""
    timeline = simulate(build_schedule(schedule, 4, m, v), 1.0, 1.0)
    busy = 2 * m  # each rank's work in forward-time units
    lay = Layout(pp=4, microbatches=m, schedule=schedule, virtual_stages=v)
    assert bubble_fraction(lay) == pytest.approx(1 - busy / timeline.makespan)


def test_infeasible_layouts_say_why():
    shape = PUBLISHED["gpt3-175b"]
    small = A100_CLUSTER.with_(devices=8)
    plan = evaluate(shape, Layout(dp=8, batch_size=8, precision="bf16"), small)
    assert not plan.feasible and "GB per device" in plan.problems[0]
    # 16Ψ of model states: 2Ψ + 2Ψ + 12Ψ bytes, Ψ = 174.6B
    assert "parameters 349.2, gradients 349.2, optimizer 2095.3" in plan.problems[0]
    bad = evaluate(shape, Layout(tp=8, batch_size=8, zero=3, precision="bf16"), small)
    assert any("--zero 3" in p for p in bad.problems)
    odd = evaluate(from_preset("tiny"), Layout(dp=8, batch_size=12), small)
    assert any("--batch-size 12" in p for p in odd.problems), odd.problems


def test_cli_json_and_text(run_python):
    argv = ["-m", "mpipar.plan", "--model", "tiny", "--devices", "2", "--memory-gb", "1"]
    doc = json.loads(check_ok(run_python([*argv, "--json"])).stdout)
    best = doc["feasible"][0]
    assert doc["feasible_count"] > 0 and best["feasible"]
    assert set(best["memory"]) >= {"params", "grads", "optimizer", "activations", "peak"}
    assert best["command"].startswith("mpirun -n 2 python train.py --preset tiny")
    assert best["step"]["step_s"] > 0 and "estimate" in doc["energy_note"]
    text = check_ok(run_python(argv)).stdout
    assert "feasible layouts, fastest first" in text and "command: mpirun -n 2" in text
    assert "The fastest is" in text


@pytest.mark.parametrize("argv, message", [
    (["--devices", "0"], "--devices must be positive, got 0"),
    (["--model", "gpt3-175b"], "give --batch-size"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--n-head", "5"], "n_head 5 does not divide d_model 128"),
])
def test_bad_usage_exits_2(run_python, argv, message):
    proc = run_python(["-m", "mpipar.plan", *argv])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_calibrate_writes_a_profile(run_python, tmp_path):
    out = tmp_path / "this.json"
    proc = check_ok(run_python(["-m", "mpipar.plan", "calibrate", "--quick", "--model",
                                "tiny", "--out", out], timeout=120))
    assert f"wrote {out}" in proc.stdout
    cluster = load_cluster(out)
    assert isinstance(cluster, Cluster) and cluster.name == "this"
    assert cluster.gemm_flops > 1e8 and 0 < cluster.intra.alpha < 1e-2
    assert cluster.intra.beta > 1e7 and cluster.overhead_s_per_token >= 0
    env_run = run_python(["-m", "mpipar.plan", "--model", "tiny", "--cluster", "this",
                          "--json"], env={"MPIPAR_PROFILE": str(out)})
    assert json.loads(check_ok(env_run).stdout)["cluster"]["name"] == "this"


def test_chapter_6_numbers_are_the_planner_s():
    """The numbers tutorials/06_choosing_a_layout.md states without a command printing them."""
    page = (Path(__file__).resolve().parent.parent / "tutorials"
            / "06_choosing_a_layout.md").read_text(encoding="utf-8")
    answers = page[page.index("## Check yourself"):]
    seven = parameter_count(PUBLISHED["7b"])
    assert f"Ψ = {seven:,}" in answers
    assert f"16Ψ = {16 * seven:,} bytes" in answers
    zero1 = sum(state_bytes(PUBLISHED["7b"], Layout(dp=64, zero=1, precision="bf16")))
    assert f"{4 * seven + 12 * seven // 64:,} bytes" in answers and zero1 - (
        4 * seven + 12 * seven // 64) < 16 * 64
    one_f, inter = (bubble_fraction(Layout(pp=4, microbatches=16, schedule=s,
                                           virtual_stages=v))
                    for s, v in (("1f1b", 1), ("interleaved", 2)))
    assert f"3/19 = {one_f:.1%}" in answers and f"3/35 = {inter:.1%}" in answers
    shape = PUBLISHED["gpt3-175b"]
    act = shape.seq_len * shape.d_model * 2
    assert f"A = 2048 · 12288 · 2 = {act:,} bytes" in answers
    assert f"4 · 96 · A = {4 * 96 * act:,} bytes" in answers and f"{2 * act:,} bytes" in answers
    table = page[page.index("## 1."):page.index("## 2.")]
    for name in ("gpt3-125m", "7b", "gpt3-175b"):
        psi = parameter_count(PUBLISHED[name])
        assert f"| {psi:,} |" in table, name
    bubbles = page[page.index("## 3."):page.index("## 4.")]
    for m in (4, 8, 16, 32):
        for s, v in (("1f1b", 1), ("interleaved", 2)):
            lay = Layout(pp=4, microbatches=m, schedule=s, virtual_stages=v)
            assert f"{bubble_fraction(lay):.1%}" in bubbles, lay.describe()


def test_cli_cp_searches_the_devices_left_after_context_parallelism(run_python):
    argv = ["-m", "mpipar.plan", "--model", "small", "--devices", "4", "--cp", "2", "--json",
            "--top", "0"]
    doc = json.loads(check_ok(run_python(argv)).stdout)
    layouts = [p["layout"] for p in doc["feasible"]]
    assert layouts and all(lay["cp"] == 2 and lay["dp"] * lay["tp"] * lay["pp"] == 2
                           for lay in layouts)
    assert all(p["command"].startswith("mpirun -n 4 ") and " --cp 2" in p["command"]
               for p in doc["feasible"])
    assert all("cp" in p["comm_bytes"] for p in doc["feasible"])
    bad = run_python(["-m", "mpipar.plan", "--model", "small", "--devices", "4", "--cp", "3"])
    assert bad.returncode == 2 and "--cp 3 must be a positive divisor of --devices 4" in bad.stderr
