"""The numbers the course states: the written questions' key and the chapters' answers.

Each is computed here from mpipar itself (the model's parameters and FLOPs, the ring's chunks,
the checker's simulated bubble, the memory a forward pass really saves) or from a formula
that is first checked against mpipar at a small size, so none can silently drift from the
code. The chapters' "Check yourself" answers that a command cannot print are checked here
too, by the text of their answers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mpipar.activations import formula_bytes
from mpipar.autograd import graph_nbytes
from mpipar.course.answers import close_enough, read_sheet
from mpipar.course.manifest import load_manifest
from mpipar.grid import split_colors
from mpipar.kv_cache import kv_bytes_per_token
from mpipar.model import PRESETS, GPTConfig, build_model, flops_per_token
from mpipar.parallel.pipeline.checker import check_schedule, theoretical_bubble
from mpipar.parallel.pipeline.schedules import interleaved_one_f_one_b, one_f_one_b
from mpipar.parallel.ring import chunk_bounds
from mpipar.plan.comm import tp_calls
from mpipar.plan.layout import Layout
from mpipar.plan.memory import state_bytes
from mpipar.plan.model_shape import PUBLISHED

MANIFEST = load_manifest()
REPO = MANIFEST.root
GPT2_SMALL = dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, seq_len=1024)
GPT2_XL = dict(vocab_size=50257, n_layer=48, n_head=25, d_model=1600, seq_len=1024)
TINY = dict(vocab_size=103, **{k: v for k, v in PRESETS["tiny"].items() if k != "batch_size"})


def parameters(cfg: dict) -> int:
    """V·d + T·d + L·(12d² + 13d) + 2d: chapter 1b's count, checked against real models."""
    v, t, d, n_layer = cfg["vocab_size"], cfg["seq_len"], cfg["d_model"], cfg["n_layer"]
    return v * d + t * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def layer_activation_numbers(b: int, t: int, d: int, h: int, tp: int, sp: bool) -> float:
    """What one block keeps for backward per rank (chapter 3 §7), in numbers."""
    s = tp if sp else 1
    return b * t * d * (4 / s + 16 / tp) + 2 * b * t / s + b * h * t * t / tp


def test_the_parameter_formula_counts_real_models():
    for shape in ({"vocab_size": 11, "n_layer": 1, "n_head": 2, "d_model": 8, "seq_len": 5},
                  {"vocab_size": 103, "n_layer": 3, "n_head": 4, "d_model": 16, "seq_len": 7}):
        assert build_model(GPTConfig(**shape), 0).num_parameters() == parameters(shape)


def test_the_activation_formula_is_what_a_block_saves():
    """One block's saved arrays, measured as the difference of a 2- and a 1-block model."""
    b, t, d, h = 3, 6, 8, 2

    def saved(n_layer: int) -> int:
        cfg = GPTConfig(vocab_size=5, n_layer=n_layer, n_head=h, d_model=d, seq_len=t,
                        dtype="float64")
        model = build_model(cfg, 0)
        x = np.random.default_rng(0).integers(0, 5, size=(b, t))
        return graph_nbytes(model(x, x), exclude=[p.data for p in model.parameters()])

    assert saved(2) - saved(1) == 8 * layer_activation_numbers(b, t, d, h, 1, False)


def communicators(dp: int, tp: int, pp: int) -> int:
    """The groups ``ProcessGrid.build`` makes over a whole job: distinct (kind, color)."""
    return len({(kind, color) for r in range(dp * tp * pp)
                for kind, (color, _) in split_colors(r, dp, tp, pp).items()
                if color is not None and (kind != "embed" or pp > 1)})


def key_values() -> dict[str, float]:
    tiny_params = parameters(TINY)
    xl = parameters(GPT2_XL)
    small = parameters(GPT2_SMALL)
    ring3 = chunk_bounds(tiny_params, 3)
    ring3_bytes = 2 * (3 - 1) * 4 * max(hi - lo for lo, hi in ring3)
    tiny = build_model(GPTConfig(**TINY), 0)
    b, t, d, n_layer = PRESETS["tiny"]["batch_size"], TINY["seq_len"], TINY["d_model"], 4
    return {
        "A1.Q1": small,
        "A1.Q2": flops_per_token(GPTConfig(**GPT2_SMALL)),
        "A1.Q3": 16 * xl,
        "A1.Q4": 8 * 12 * 1024**2 * 4,
        "A2.Q1": ring3_bytes,
        "A2.Q2": 2 * 7 * (10e-6 + small * 4 / (8 * 10e9)),
        "A2.Q3": len(tiny.parameters()) * 2 * (4 - 1),
        "A3.Q1": 8 * tiny_params // 4,
        "A3.Q2": 2 * xl + 14 * xl / 64,
        "A3.Q3": math.ceil(16 * xl / 4 / 2**30),
        "A4.Q1": (2 * n_layer + 1) * b * t * d * 4,
        "A4.Q2": 2 * 1 * 2048 * 12288 * 2,
        "A4.Q3": 4 * layer_activation_numbers(8, 1024, 768, 12, 4, True),
        "A5.Q1": check_schedule(interleaved_one_f_one_b(4, 8, 2)).bubble_fraction,
        "A5.Q2": check_schedule(one_f_one_b(8, 32)).peak_inflight[0],
        "A5.Q3": 8 * (4 - 1) * 4 * 1024 * 768 * 4,
        "A6.Q1": sum(state_bytes(PUBLISHED["7b"], Layout(dp=8, tp=2, pp=4, zero=1,
                                                         precision="bf16"), 0)),
        "A6.Q2": communicators(16, 8, 8),
        "A6.Q3": sum(c.nbytes for c in tp_calls(PUBLISHED["gpt3-175b"], Layout(
            tp=8, pp=8, batch_size=8, microbatches=8, precision="bf16"), 0)),
    }


def test_the_answer_key_is_what_mpipar_computes():
    values = key_values()
    assert theoretical_bubble("interleaved", 4, 8, 2) == pytest.approx(values["A5.Q1"])
    assert values["A6.Q2"] == 16 * 8 + 8 * 8 + 2 * 16 * 8  # tp, dp, pp and embed groups
    assert values["A6.Q3"] == 8 * (4 * 96 // 8 + 1) * 2048 * 12288 * 2  # 4L_s + 1 per microbatch
    for a in MANIFEST.assignments:
        for task in (t for t in a.tasks if t.kind == "written"):
            key = read_sheet(REPO / task.answers)
            assert sorted(key) == sorted(q.id for q in task.questions), task.answers
            for q in task.questions:
                assert close_enough(key[q.id], values[q.id], max(q.rtol, 1e-12)), (
                    f"{q.id}: the key says {key[q.id]}, mpipar computes {values[q.id]}")
                assert f"**{q.id}**" in (REPO / a.questions).read_text(encoding="utf-8")


# The chapters' "Check yourself" numbers that no command of the chapter prints, as the
# answer must write them, computed.
CHAPTER_NUMBERS = [
    ("01b_gpt.md", f"{parameters(GPT2_SMALL):,}"),
    ("01b_gpt.md", f"{flops_per_token(GPTConfig(**GPT2_SMALL)):,}"),
    ("02_data_parallel.md", f"{key_values()['A2.Q1']:,}"),
    ("02_data_parallel.md", f"{8 * parameters(TINY) // 4:,}"),
    ("03_tensor_parallel.md", f"{key_values()['A4.Q1']:,}"),
    ("03_tensor_parallel.md", f"{math.ceil(50257 / 8) * 8:,}"),
    ("04_pipeline_parallel.md", f"{theoretical_bubble('interleaved', 4, 8, 2):.4f}"),
    ("04_pipeline_parallel.md", f"{4 * (1 - theoretical_bubble('1f1b', 4, 16)):.4f}"),
    ("04_pipeline_parallel.md",  # the fewest microbatches whose 1F1B bound at p = 2 is ≥ 1.9
     f"**{next(m for m in range(1, 100) if 2 * (1 - theoretical_bubble('1f1b', 2, m)) >= 1.9)}**"),
    ("02b_memory.md", f"{formula_bytes(32, 128, 256, 4, 4):,}"),  # a block of medium
    ("02c_mixed_precision.md", f"{4 * parameters(TINY):,}"),  # tiny's fp32 gradients
    ("02c_mixed_precision.md", f"{2 * parameters(TINY):,}"),  # ... and in bf16
    ("07_inference.md", f"{kv_bytes_per_token(4, 256, 4) * 16 * 128:,}"),  # medium, 16 × 128
]


@pytest.mark.parametrize("chapter, text", CHAPTER_NUMBERS,
                         ids=[f"{c[:-3]}-{t}" for c, t in CHAPTER_NUMBERS])
def test_the_chapters_check_yourself_numbers(chapter, text):
    page = (REPO / "tutorials" / chapter).read_text(encoding="utf-8")
    tail = page[page.index("## Check yourself"):]
    assert text in tail, f"{chapter}: Check yourself does not give the answer {text}"


def test_every_chapter_ends_with_try_it_and_check_yourself():
    for path in sorted(Path(REPO / "tutorials").glob("[0-9]*.md")):
        page = path.read_text(encoding="utf-8")
        assert "## Try it" in page and "## Check yourself" in page, path.name
        tail = page[page.index("## Check yourself"):]
        assert tail.count("<details>") >= 3 and tail.count("<details>") == tail.count(
            "</details>"), f"{path.name}: answers belong in <details>"
