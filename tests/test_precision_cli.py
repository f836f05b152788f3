"""``train.py --precision``, ``--beta1 --beta2 --eps`` and the weight-decay rule, from outside.

* a 16-bit precision with float64 master weights, or with distillation, is refused (exit 2,
  one line);
* ``--help`` states the one weight-decay rule and the precisions;
* an fp16 run logs ``loss_scale`` and ``skipped`` per step, reports 16 bytes per parameter,
  and saves float32 weights, the betas, ε and its loss scaler; resuming it in bf16 with
  another β₁ works and warns about exactly those two settings.
"""

from __future__ import annotations

import pytest
from conftest import TINY_ARGS, check_ok
from test_cli import assert_usage_error
from test_train import read_metrics

from mpipar.checkpoint import load_checkpoint
from mpipar.flags import build_parser


@pytest.mark.parametrize("flags,fragments", [
    (["--precision", "bf16", "--dtype", "float64"],
     ["--precision bf16", "--dtype float64", "exactness"]),
    (["--precision", "fp16", "--teacher", "nowhere"], ["--teacher", "--precision fp16"]),
    (["--precision", "bf16", "--zero", "3"], ["--zero 3", "fp32 masters", "--precision bf16"]),
])
def test_refused_combinations(run_train, tmp_path, flags, fragments):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_train([*TINY_ARGS, *flags, "--metrics", out / "m.jsonl"], timeout=60)
    assert_usage_error(proc, out, *fragments)


def test_help_states_the_weight_decay_rule_and_the_precisions():
    text = " ".join(build_parser().format_help().split())
    assert "the same rule for AdamW and SGD: weight matrices and embeddings decay, biases " \
           "and LayerNorm gains do not" in text, text
    for flag in ("--precision {fp32,fp16,bf16}", "--beta1", "--beta2", "--eps"):
        assert flag in text, f"--help does not list {flag}"


def test_fp16_run_saves_fp32_weights_betas_and_scaler_and_resumes_in_bf16(run_train,
                                                                          tiny_data, tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    common = [*TINY_ARGS[:2], "--steps", "4", "--eval-every", "0", "--data", tiny_data]
    check_ok(run_train([*common, "--stop-at", "2", "--precision", "fp16", "--beta1", "0.8",
                        "--eps", "1e-7", "--save", ckpt, "--metrics", metrics, "--quiet"]))
    steps, _, (summary,) = read_metrics(metrics)
    assert [(s["loss_scale"], s["skipped"]) for s in steps] == [(65536.0, False)] * 2, steps
    memory = summary["memory_per_rank"][0]
    n = summary["memory_rank0"]["params"]
    assert (memory["parameters"], memory["gradients"], memory["optimizer_state"]) == (
        2 * n, 2 * n, 12 * n), memory
    arrays, meta = load_checkpoint(ckpt)
    assert {a.dtype.name for k, a in arrays.items() if k.startswith("model.")} == {"float32"}
    train = meta["train"]
    assert (train["precision"], train["beta1"], train["beta2"], train["eps"]) == (
        "fp16", 0.8, 0.95, 1e-7), train
    assert meta["loss_scaler"] == {"scale": 65536.0, "good_steps": 2}, meta
    proc = check_ok(run_train([*common, "--precision", "bf16", "--beta1", "0.8",
                               "--resume", ckpt, "--metrics", metrics]))
    warning = next(line for line in proc.stdout.splitlines() if line.startswith("warning"))
    assert "eps 1e-07 -> 1e-08" in warning and "precision fp16 -> bf16" in warning, warning
    assert "beta1" not in warning, warning
    steps, _, _ = read_metrics(metrics)
    assert [s["step"] for s in steps] == [2, 3] and "loss_scale" not in steps[0]
