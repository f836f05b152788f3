"""The benchmarks' bookkeeping: results as JSON lines, comparing two runs, the GEMM ceiling.

No timing is checked: what is checked is that a result written by one benchmark is read
back and compared field by field, that the machine description names the BLAS, and that
the matrix products the GEMM ceiling times are exactly the model's (their FLOPs equal
6 × matmul parameters × tokens for the linear layers, the count MFU uses).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import machine  # noqa: E402
import run_all  # noqa: E402
from bench_single import model_products  # noqa: E402

from mpipar.model import PRESETS, GPTConfig, matmul_params  # noqa: E402


def test_emit_and_compare(tmp_path, monkeypatch):
    info = machine.machine_info()
    assert info["blas"]["library"], info
    assert "BLAS:" in machine.format_machine(info)
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    monkeypatch.setenv(machine.RESULTS_ENV, str(old))
    machine.emit("single", "small", {"mfu": 0.30, "tokens_per_s": 5000, "preset": "small"}, info)
    machine.emit("single", "tiny", {"mfu": 0.20}, info)
    monkeypatch.setenv(machine.RESULTS_ENV, str(new))
    machine.emit("single", "small", {"mfu": 0.36, "tokens_per_s": 6000}, info)
    record = json.loads(new.read_text())
    assert record["machine"]["blas"] == info["blas"] and record["case"] == "small"
    table = run_all.compare(str(old), str(new)).splitlines()
    rows = {line.split()[2]: line.split()[3:] for line in table[1:] if line.startswith("single")}
    assert rows["mfu"] == ["0.3", "0.36", "1.200"]
    assert rows["tokens_per_s"] == ["5000", "6000", "1.200"]
    assert "preset" not in rows  # text fields are not compared
    assert table[-1] == "in one run only: single/tiny"


def test_gemm_ceiling_times_the_models_products():
    for name in ("tiny", "small", "medium"):
        shape = dict(PRESETS[name])
        batch = shape.pop("batch_size")
        cfg = GPTConfig(**shape)
        products = model_products(cfg, batch)
        linear = products[: 3 * (4 * cfg.n_layer + 1)]
        flops = sum(2 * a[-2] * a[-1] * b[-1] for a, b in linear)
        assert flops == 6 * matmul_params(cfg) * batch * cfg.seq_len, name
        assert len(products) == len(linear) + 6 * cfg.n_layer


def test_bench_kernels_times_every_fused_operation(tmp_path, monkeypatch, capsys):
    import bench_kernels

    results = tmp_path / "kernels.jsonl"
    monkeypatch.setenv(machine.RESULTS_ENV, str(results))
    assert bench_kernels.main(["--presets", "tiny", "--repeats", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])["tiny"]
    ops = [row["op"] for row in figures["rows"]]
    assert ops == ["linear qkv", "linear proj", "linear fc", "linear fc2", "layernorm", "gelu",
                   "attention", "cross-entropy", "embedding", "adamw"]
    adamw = figures["rows"][-1]
    shape = dict(PRESETS["tiny"])
    shape.pop("batch_size")
    from mpipar.model import GPT

    total = GPT(GPTConfig(vocab_size=bench_kernels.VOCAB, **shape)).num_parameters()
    assert adamw["shape"] == f"{total:,} parameters"
    cases = [json.loads(line)["case"] for line in results.read_text().splitlines()]
    assert cases == [f"tiny {op}" for op in ops] + ["tiny pass"]
