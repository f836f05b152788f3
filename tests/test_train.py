"""Single-process training: it learns, it resumes exactly, and it reports what it did.

* Learning runs the :class:`Trainer` in this process on a task whose answer is known.
* Save → resume and the metrics file run ``train.py`` as a subprocess, as a user would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import check_ok

from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

STEP_KEYS = ("step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s")


def read_metrics(path: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(step lines, evaluation lines, summary lines) of a ``--metrics`` file."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    summaries = [r for r in records if r.get("event") == "summary"]
    assert len(steps) + len(evals) + len(summaries) == len(records), "unknown metrics lines"
    return steps, evals, summaries


# --------------------------------------------------------------------------------------------
# It learns
# --------------------------------------------------------------------------------------------

PATTERN = "abcdefgh" * 500


@pytest.mark.parametrize("optimizer,lr", [("adamw", 1e-2), ("sgd", 0.1)])
def test_learns_a_periodic_sequence(optimizer, lr):
    """In "abcdefgh" repeated, every character fixes the next: the loss can go to 0.

    A model that knows nothing spreads its probability evenly over the 8 characters: loss
    ln 8 ≈ 2.08, which is where the small initial weights (std 0.02) start it (within 0.05).
    Requiring the training and validation loss below 0.2 — on average ≥ e^-0.2 ≈ 82 %
    probability on the right next character — after 150 steps leaves a wide margin (both
    optimizers reach about 0.05 in 100 steps) yet is out of reach of any model that has not
    learnt the successor of each character.
    """
    tokenizer = CharTokenizer.from_text(PATTERN)
    data = make_dataset(PATTERN, tokenizer, seq_len=16, source="pattern")
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, d_model=32,
                    seq_len=16)
    tc = TrainConfig(steps=150, batch_size=8, lr=lr, optimizer=optimizer, warmup_steps=10,
                     eval_tokens=256)
    trainer = Trainer(cfg, tc, ProcessGrid.single(), data, Tracer(0))
    losses = [trainer.train_step()["loss"] for _ in range(tc.steps)]
    assert abs(losses[0] - math.log(8)) < 0.05, f"initial loss {losses[0]:.4f}, not ln 8"
    final = float(np.mean(losses[-10:]))
    val = trainer.evaluate()
    assert final < 0.2, f"{optimizer}: mean loss of the last 10 steps {final:.4f} ≥ 0.2"
    assert val < 0.2, f"{optimizer}: validation loss {val:.4f} ≥ 0.2"


def test_default_corpus_loss_falls(run_train, tmp_path):
    """30 steps of ``--preset tiny`` on the built-in corpus.

    The first loss is about ln(vocabulary) (≈ 4.6 for ~100 characters); learning the
    character frequencies alone brings it near 3 (English text has a unigram entropy of about
    4.1 bits ≈ 2.9 nats). Runs reach 3.0–3.4 by step 30, so demanding a fall of 1.0 (last 5
    steps' mean against the first step) is met with room to spare.
    """
    metrics = tmp_path / "m.jsonl"
    check_ok(run_train(["--preset", "tiny", "--steps", "30", "--metrics", metrics, "--quiet"]))
    steps, evals, _ = read_metrics(metrics)
    first, last = steps[0]["loss"], float(np.mean([s["loss"] for s in steps[-5:]]))
    assert last < first - 1.0, f"loss went from {first:.3f} to {last:.3f} in 30 steps"
    assert evals[-1]["val_loss"] < first - 1.0, evals[-1]


# --------------------------------------------------------------------------------------------
# Save → resume continues exactly as if never stopped
# --------------------------------------------------------------------------------------------

RESUME_ARGS = ["--preset", "tiny", "--n-layer", "2", "--dtype", "float64", "--steps", "30",
               "--eval-every", "10", "--eval-tokens", "512", "--quiet"]
RESUME_VARIANTS = {
    "adamw": [],
    "dropout": ["--dropout", "0.1"],
    "sgd": ["--optimizer", "sgd", "--lr", "0.05"],
}


@pytest.mark.parametrize("variant", sorted(RESUME_VARIANTS))
def test_stop_and_resume_is_bit_identical(variant, run_train, tiny_data, tmp_path):
    """``--stop-at 12`` then ``--resume``: the same 30 losses and final state, bit for bit.

    Nothing a step does depends on how the run got there except what the checkpoint holds
    (parameters, optimizer moments and step count); batches and dropout masks are functions
    of (seed, step). So in float64 with one BLAS thread the two runs perform the same
    floating-point operations in the same order, and equality is exact, not approximate.
    """
    args = [*RESUME_ARGS, "--data", tiny_data, *RESUME_VARIANTS[variant]]
    full, part, resumed = (tmp_path / n for n in ("full", "part", "resumed"))
    check_ok(run_train([*args, "--metrics", f"{full}.jsonl", "--save", full]))
    check_ok(run_train([*args, "--stop-at", "12", "--metrics", f"{part}.jsonl", "--save", part]))
    check_ok(run_train([*args, "--resume", part, "--metrics", f"{resumed}.jsonl",
                        "--save", resumed]))

    full_steps, full_evals, _ = read_metrics(Path(f"{full}.jsonl"))
    part_steps, part_evals, _ = read_metrics(Path(f"{part}.jsonl"))
    res_steps, res_evals, _ = read_metrics(Path(f"{resumed}.jsonl"))
    assert [s["step"] for s in part_steps] == list(range(12))
    assert [s["step"] for s in res_steps] == list(range(12, 30))
    for a, b in zip(full_steps, part_steps + res_steps, strict=True):
        for key in ("loss", "lr", "grad_norm"):
            assert a[key] == b[key], (f"{variant}: step {a['step']} {key} {a[key]!r} "
                                      f"uninterrupted, {b[key]!r} stopped and resumed")
    full_val = {e["step"]: e["val_loss"] for e in full_evals}
    for e in part_evals[:-1] + res_evals:  # the stopped run's last evaluation is extra
        assert e["val_loss"] == full_val[e["step"]], (variant, e, full_val)

    assert json.loads((resumed / "meta.json").read_text())["step"] == 30
    with np.load(full / "state.npz") as a, np.load(resumed / "state.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            x, y = a[name], b[name]
            diff = np.max(np.abs(x - y)) if x.size else 0
            assert x.dtype == y.dtype and np.array_equal(x, y), (
                f"{variant}: final {name} differs by up to {diff} after stop and resume")


# --------------------------------------------------------------------------------------------
# The metrics file (docs/design.md §3)
# --------------------------------------------------------------------------------------------


def test_metrics_file_lines(run_train, tiny_data, tmp_path):
    metrics = tmp_path / "m.jsonl"
    check_ok(run_train(["--preset", "tiny", "--steps", "3", "--eval-every", "2",
                        "--eval-tokens", "256", "--data", tiny_data, "--metrics", metrics]))
    steps, evals, summaries = read_metrics(metrics)
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        missing = [k for k in STEP_KEYS if k not in s]
        assert not missing, f"step line {s} lacks {missing}"
        assert all(math.isfinite(s[k]) for k in STEP_KEYS), s
        assert s["step_time_s"] > 0 and s["grad_norm"] > 0 and s["lr"] > 0
        # tiny: 8 sequences of 32 tokens per step
        assert s["tokens_per_s"] == pytest.approx(8 * 32 / s["step_time_s"], rel=1e-9)
    # Evaluated after every 2nd step (step index 1) and after the last (index 2).
    assert [e["step"] for e in evals] == [1, 2]
    assert all(math.isfinite(e["val_loss"]) and e["val_loss"] > 0 for e in evals)
    assert len(summaries) == 1
    summary = summaries[0]
    assert metrics.read_text().splitlines()[-1] == json.dumps(summary), "summary is not last"
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 8 * 32
    assert summary["final_loss"] == steps[-1]["loss"]
