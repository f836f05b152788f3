"""Pipeline parallelism: stages, the executor, serial equivalence, memory, trace, CLI.

Without MPI: how layers are cut into stages (every parameter on exactly one chunk, with its
1-process initial value; the tied embedding on the first and the last); the forward-only
program the executor uses for evaluation and generation (simulated: it cannot deadlock);
what the stash measurement counts. Measurement from trace records and the ``mpipar.viz``
commands without a run are in test_pipeline_pictures.py.

With MPI (``mpi_scripts/equivalence.py``, ``mpi_scripts/pp_checks.py``, ``train.py``):

* serial equivalence in float64 (per-step losses, gradient norms, final parameters and
  optimizer state to 1e-10 relative, see equivalence.py) for pp = 2 and 4, every schedule,
  microbatch counts below, equal to and not a multiple of p, interleaving with v = 2, dropout
  on and off, and pp × dp, pp × tp (with and without sequence parallelism, ZeRO-1) and
  pp × tp × dp on 8 ranks;
* memory (1F1B ≤ GPipe, 1F1B holds ≤ p − r microbatches), evaluation and generation equal
  to the 1-process model, the trace of a step (pp_checks.py);
* ``train.py --pp 4 --microbatches 8 --schedule 1f1b`` prints the 1-process losses, its
  generation from a checkpoint is the 1-process text, and bad layouts exit 2 on every rank
  before any communication.
"""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import check_ok, describe_run, python_subprocess, train_subprocess
from mpi_util import (
    assert_check_passed,
    equivalence_checks,
    parse_verdict,
    run_equivalence,
    run_mpi_ok,
    script,
)

from mpipar import ops
from mpipar.autograd import Tensor
from mpipar.model import GPTConfig, SerialLayers, build_model
from mpipar.parallel.pipeline import (
    Forward,
    RecvActivation,
    SendActivation,
    build_schedule,
    simulate,
    theoretical_bubble,
)
from mpipar.parallel.pipeline.executor import PipelineExecutor, forward_only_program
from mpipar.parallel.pipeline.measure import trace_timeline
from mpipar.parallel.pipeline.memory import BufferPool, graph_bytes
from mpipar.parallel.pipeline.stages import build_stage_chunks, describe_stages, stage_bounds
from mpipar.trace import Tracer, load_jsonl

# ---- stages -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_layer,stages", [(4, 4), (5, 2), (8, 4), (7, 3), (12, 8), (3, 1)])
def test_stage_bounds_are_balanced_and_cover_every_layer(n_layer, stages):
    bounds = stage_bounds(n_layer, stages)
    assert len(bounds) == stages
    assert bounds[0][0] == 0 and bounds[-1][1] == n_layer
    for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False):
        assert hi == lo, f"gap or overlap between stages: {bounds}"
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1, sizes
    assert sizes == sorted(sizes, reverse=True), f"extra layers belong to early stages: {sizes}"


def test_stage_bounds_refuse_more_stages_than_layers():
    with pytest.raises(ValueError, match="3 layers cannot fill 4 stages"):
        stage_bounds(3, 4)


@pytest.mark.parametrize("p,v,n_layer", [(2, 1, 4), (2, 2, 4), (3, 1, 5), (4, 2, 9)])
def test_chunks_partition_the_model_with_its_initial_values(p, v, n_layer):
    """Every parameter of the 1-process model lives on exactly one chunk of one rank (the tied
    wte on two: the first and the last virtual stage), with the same name and value."""
    cfg = GPTConfig(vocab_size=11, n_layer=n_layer, n_head=2, d_model=8, seq_len=4,
                    dtype="float64")
    full = dict(build_model(cfg, seed=7).named_parameters())
    holders: dict[str, list[tuple[int, int]]] = {}
    for r in range(p):
        grid = SimpleNamespace(pp=p, pp_rank=r)
        chunks = build_stage_chunks(cfg, SerialLayers(np.float64), grid, v, seed=7)
        assert len(chunks) == v
        for c, chunk in enumerate(chunks):
            s = c * p + r
            assert chunk.pre == (s == 0) and chunk.post == (s == p * v - 1), (r, c)
            for name, param in chunk.named_parameters():
                holders.setdefault(name, []).append((r, c))
                assert param.name == name
                np.testing.assert_array_equal(param.data, full[name].data, err_msg=name)
    assert sorted(holders) == sorted(full), "chunks hold other parameters than the model"
    for name, where in holders.items():
        expected = [(0, 0), (p - 1, v - 1)] if name == "wte.weight" else where[:1]
        assert sorted(where) == sorted(expected), f"{name} is held by (rank, chunk) {where}"


def test_describe_stages_names_blocks_and_ends():
    assert describe_stages(8, 2, 2).splitlines() == [
        "rank 0: chunk 0 = stage 0 (embedding, blocks 0–1)   chunk 1 = stage 2 (blocks 4–5)",
        "rank 1: chunk 0 = stage 1 (blocks 2–3)   chunk 1 = stage 3 (blocks 6–7, head, loss)",
    ]


# ---- the executor's pieces ----------------------------------------------------------------


@pytest.mark.parametrize("p,m,v", [(2, 1, 1), (2, 3, 2), (3, 4, 1), (4, 2, 2), (4, 5, 3)])
def test_forward_only_program_runs_every_forward_once_without_deadlock(p, m, v):
    programs = [forward_only_program(r, p, m, v) for r in range(p)]
    for r, program in enumerate(programs):
        forwards = sorted((x.mb, x.chunk) for x in program if isinstance(x, Forward))
        assert forwards == [(mb, c) for mb in range(m) for c in range(v)], f"rank {r}"
        assert all(isinstance(x, Forward | SendActivation | RecvActivation) for x in program)
    timeline = simulate(programs, num_chunks=v)  # raises ScheduleError on a deadlock
    assert sum(len(row) for row in timeline.intervals) == p * m * v


def test_graph_bytes_counts_saved_activations_not_parameters():
    x = Tensor(np.ones((3, 4)), requires_grad=True)  # an input buffer (3·4·8 = 96 bytes)
    w = Tensor(np.ones((5, 4)), requires_grad=True)  # a parameter
    h = ops.linear(x, w)  # saves x and w
    y = ops.tanh(h)  # saves its output, (3, 5): 120 bytes
    exclude = {id(w.data)}
    assert graph_bytes(y, [], exclude) == 96 + 120
    assert graph_bytes(y, [x.data], exclude) == 96 + 120, "x is counted once"
    assert graph_bytes(y, [np.ones(10)], exclude) == 80 + 96 + 120
    assert graph_bytes(y, [], exclude | {id(x.data)}) == 120


def test_buffer_pool_reuses_what_is_given_back():
    pool = BufferPool(np.float32)
    a = pool.take((2, 3))
    b = pool.take((2, 3))
    assert a is not b and pool.allocated == 2 and a.dtype == np.float32
    pool.give(a)
    assert pool.take((2, 3)) is a and pool.allocated == 2
    assert pool.take((4,)).shape == (4,) and pool.allocated == 3


@pytest.mark.parametrize("name,v,m", [("gpipe", 1, 8), ("1f1b", 1, 8), ("interleaved", 2, 8)])
def test_executor_runs_the_checked_schedule_through_its_dispatch_table(name, v, m):
    """The executor builds its rank's list from the named schedule, has the checker prove the
    whole schedule first, keeps the list up to the trainer's ReduceGrads/OptimizerStep, and
    has a handler for every instruction class in it. (No MPI: nothing is run.)"""
    p = 4
    cfg = GPTConfig(vocab_size=11, n_layer=8, n_head=2, d_model=8, seq_len=4)
    tc = SimpleNamespace(schedule=name, microbatches=m, virtual_stages=v)
    for r in range(p):
        grid = SimpleNamespace(pp=p, pp_rank=r, pp_comm=None, embed_comm=None)
        chunks = build_stage_chunks(cfg, SerialLayers(np.float32), grid, v, seed=0)
        ex = PipelineExecutor(chunks, grid, tc, Tracer(r))
        full = build_schedule(name, p, m, v)[r]
        assert ex.program == full[:-2] and type(full[-1]).__name__ == "OptimizerStep"
        assert {type(x) for x in ex.program} <= set(ex.dispatch), f"rank {r}: unhandled"
        assert ex.report.theoretical_bubble == theoretical_bubble(name, p, m, v)
    expected = {"gpipe": [8, 8, 8, 8], "1f1b": [4, 3, 2, 1]}.get(name)
    if expected is not None:
        assert ex.report.peak_inflight == expected


# ---- serial equivalence (equivalence.py) ------------------------------------------------

S1F1B = {"schedule": "1f1b"}
EQUIVALENCE = {
    # launch id: (world size, model overrides, layouts)
    "pp2": (2, {"dropout": 0.1}, [
        {"name": "pp2 naive m1", "pp": 2, "train": {"schedule": "naive", "microbatches": 1}},
        {"name": "pp2 naive m3", "pp": 2,
         "train": {"schedule": "naive", "microbatches": 3, "batch_size": 6}},
        {"name": "pp2 gpipe m1", "pp": 2, "train": {"schedule": "gpipe", "microbatches": 1}},
        {"name": "pp2 gpipe m3", "pp": 2,
         "train": {"schedule": "gpipe", "microbatches": 3, "batch_size": 6}},
        {"name": "pp2 gpipe m4", "pp": 2, "train": {"schedule": "gpipe", "microbatches": 4}},
        {"name": "pp2 1f1b m1", "pp": 2, "train": {**S1F1B, "microbatches": 1}},
        {"name": "pp2 1f1b m3", "pp": 2, "train": {**S1F1B, "microbatches": 3, "batch_size": 6}},
        {"name": "pp2 1f1b m8", "pp": 2, "train": {**S1F1B, "microbatches": 8}},
        {"name": "pp2 interleaved v2 m2", "pp": 2,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 2}},
        {"name": "pp2 interleaved v2 m4", "pp": 2,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 4}},
        {"name": "pp2 1f1b m3 full recompute", "pp": 2,
         "train": {**S1F1B, "microbatches": 3, "batch_size": 6, "recompute": "full"},
         "same_bits_as": "pp2 1f1b m3"},
        {"name": "pp2 interleaved v2 m4 selective recompute", "pp": 2,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 4,
                   "recompute": "selective"},
         "same_bits_as": "pp2 interleaved v2 m4"},
    ]),
    "pp4": (4, {"n_layer": 8}, [
        {"name": "pp4 naive m2", "pp": 4, "train": {"schedule": "naive", "microbatches": 2}},
        {"name": "pp4 gpipe m2", "pp": 4, "train": {"schedule": "gpipe", "microbatches": 2}},
        {"name": "pp4 gpipe m6", "pp": 4,
         "train": {"schedule": "gpipe", "microbatches": 6, "batch_size": 12}},
        {"name": "pp4 1f1b m2", "pp": 4, "train": {**S1F1B, "microbatches": 2}},
        {"name": "pp4 1f1b m6", "pp": 4, "train": {**S1F1B, "microbatches": 6, "batch_size": 12}},
        {"name": "pp4 1f1b m8", "pp": 4, "train": {**S1F1B, "microbatches": 8}},
        {"name": "pp4 interleaved v2 m4", "pp": 4,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 4}},
        {"name": "pp4 interleaved v2 m8", "pp": 4,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 8}},
    ]),
    "pp2 x dp/tp": (4, {"dropout": 0.1}, [
        {"name": "pp2 dp2 1f1b m2", "pp": 2, "dp": 2, "train": {**S1F1B, "microbatches": 2}},
        {"name": "pp2 dp2 interleaved v2 m2 zero1", "pp": 2, "dp": 2,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 2,
                   "zero": 1}},
        {"name": "pp2 tp2 gpipe m4", "pp": 2, "tp": 2,
         "train": {"schedule": "gpipe", "microbatches": 4}},
        {"name": "pp2 tp2 sp 1f1b m4", "pp": 2, "tp": 2,
         "train": {**S1F1B, "microbatches": 4, "sequence_parallel": True}},
        {"name": "pp2 dp2 1f1b m2 zero3", "pp": 2, "dp": 2,
         "train": {**S1F1B, "microbatches": 2, "zero": 3}},
        {"name": "pp2 dp2 interleaved v2 m2 zero3 full recompute", "pp": 2, "dp": 2,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 2,
                   "zero": 3, "recompute": "full"}},
    ]),
    "pp2 x tp2 x dp2": (8, {"dropout": 0.1}, [
        {"name": "pp2 tp2 dp2 1f1b m2", "pp": 2, "tp": 2, "dp": 2,
         "train": {**S1F1B, "microbatches": 2}},
        {"name": "pp2 tp2 dp2 sp interleaved v2 m2", "pp": 2, "tp": 2, "dp": 2,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 2,
                   "sequence_parallel": True}},
        {"name": "pp2 tp2 dp2 sp interleaved v2 m2 full recompute", "pp": 2, "tp": 2, "dp": 2,
         "train": {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 2,
                   "sequence_parallel": True, "recompute": "full"},
         "same_bits_as": "pp2 tp2 dp2 sp interleaved v2 m2"},
        {"name": "pp2 tp2 dp2 sp 1f1b m2 zero3", "pp": 2, "tp": 2, "dp": 2,
         "train": {**S1F1B, "microbatches": 2, "sequence_parallel": True, "zero": 3}},
    ]),
}
EQUIVALENCE_CHECKS = [(launch, check)
                      for launch, (_, _, layouts) in EQUIVALENCE.items()
                      for layout in layouts
                      for check in equivalence_checks(layout)]


@pytest.fixture(scope="module")
def equivalence_verdicts():
    """One launch per entry of EQUIVALENCE, run on first use."""
    cache: dict[str, dict] = {}

    def get(launch: str) -> dict:
        if launch not in cache:
            n, model, layouts = EQUIVALENCE[launch]
            spec = {"steps": 2, "model": model, "layouts": layouts}
            cache[launch] = run_equivalence(n, spec)
        return cache[launch]

    return get


@pytest.mark.parametrize("launch,name", EQUIVALENCE_CHECKS,
                         ids=[f"{launch}: {name}" for launch, name in EQUIVALENCE_CHECKS])
def test_serial_equivalence(equivalence_verdicts, launch, name):
    assert_check_passed(equivalence_verdicts(launch), name)


# ---- memory, evaluation, generation, trace (pp_checks.py) --------------------------------

PP_CHECKS = [
    "gpipe: stash freed after the step", "1f1b: stash freed after the step",
    "gpipe holds every microbatch", "1f1b holds at most p - r microbatches",
    "1f1b stashes fewer bytes than gpipe", "receive buffers are reused",
    *(f"{s}: evaluation equals the 1-process model" for s in ("1f1b", "interleaved")),
    *(f"{s}: logits of a {n}-token prompt" for s in ("1f1b", "interleaved") for n in (1, 5, 8)),
    *(f"{s}: one compute span per forward and backward" for s in ("1f1b", "interleaved")),
    *(f"{s}: pipeline messages are raw activation buffers" for s in ("1f1b", "interleaved")),
]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"pp{n}")
def pp_verdict(request) -> dict:
    return parse_verdict(run_mpi_ok(request.param, [script("pp_checks.py")], timeout=90))


def test_every_pp_check_ran(pp_verdict):
    assert sorted(pp_verdict) == sorted(PP_CHECKS)


@pytest.mark.parametrize("name", PP_CHECKS)
def test_pp_check(pp_verdict, name):
    assert pp_verdict[name] == [], "\n".join(pp_verdict[name])


# ---- train.py ---------------------------------------------------------------------------

RUN_ARGS = ["--preset", "tiny", "--steps", "3", "--eval-every", "0", "--log-every", "1"]


def losses_printed(proc) -> list[str]:
    """The 'step N/S | loss X' and 'val loss X' fields of train.py's progress lines."""
    return re.findall(r"^step +\d+(?:/\d+ \| loss [\d.]+| \| val loss [\d.]+)", proc.stdout,
                      re.MULTILINE)


def sample_of(proc) -> str:
    _, sep, rest = proc.stdout.partition("--- sample ---\n")
    assert sep, f"no sample printed\n{describe_run(proc)}"
    return rest.partition("\n--------------\n")[0]


def metrics_of(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> SimpleNamespace:
    """A 1-process run (saving a checkpoint and sampling from it) and the same run with
    ``--pp 4 --microbatches 8 --schedule 1f1b`` (with metrics and a trace)."""
    d = tmp_path_factory.mktemp("pp_runs")
    args = [*RUN_ARGS, "--data", tiny_data]
    serial = check_ok(train_subprocess([*args, "--save", d / "ckpt", "--sample", "60",
                                        "--metrics", d / "serial.jsonl"]))
    pp = check_ok(train_subprocess([*args, "--pp", "4", "--microbatches", "8", "--schedule",
                                    "1f1b", "--metrics", d / "pp.jsonl", "--trace",
                                    d / "trace.jsonl"], n=4))
    return SimpleNamespace(dir=d, serial=serial, pp=pp)


def test_pp4_prints_the_one_process_losses(runs):
    printed = losses_printed(runs.serial)
    assert len(printed) == 4, describe_run(runs.serial)  # 3 steps and the final evaluation
    assert losses_printed(runs.pp) == printed, describe_run(runs.pp)
    # float32: microbatching reorders the sums, so the unrounded losses agree to ~1e-6
    serial = [m["loss"] for m in metrics_of(runs.dir / "serial.jsonl") if "loss" in m]
    pp = [m["loss"] for m in metrics_of(runs.dir / "pp.jsonl") if "loss" in m]
    np.testing.assert_allclose(pp, serial, rtol=1e-5)


def test_pp4_summary_reports_bubble_and_stashed_activations(runs):
    summary = metrics_of(runs.dir / "pp.jsonl")[-1]
    report = summary["pipeline"]
    assert report["schedule"] == "1f1b" and report["pp"] == 4 and report["microbatches"] == 8
    assert report["bubble_theory"] == pytest.approx(3 / 11)
    assert all(0.0 <= b < 1.0 for b in report["bubble_measured"]), report
    assert report["peak_inflight"] == report["predicted_inflight"] == [4, 3, 2, 1]
    assert all(b > 0 for b in report["peak_stash_bytes"]), report
    assert re.search(r"^pipeline 1f1b \(p=4, m=8, v=1\): bubble theory 27\.3%, measured "
                     r"[\d.]+% \(per rank( [\d.]+%){4}\)$", runs.pp.stdout, re.MULTILINE)
    assert "peak stashed activations per rank: " in runs.pp.stdout


@pytest.mark.parametrize("n,flags", [
    (4, ["--pp", "4"]),
    (2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2",
         "--microbatches", "2"]),
], ids=["pp4", "pp2-interleaved"])
def test_generation_under_pp_matches_one_process(runs, tiny_data, n, flags):
    """The checkpoint the 1-process run saved, resumed under pp, samples the same text (the
    run resumes at its last step, so it only generates)."""
    proc = check_ok(train_subprocess([*RUN_ARGS, "--data", tiny_data, "--resume",
                                      runs.dir / "ckpt", "--sample", "60", *flags], n=n))
    assert sample_of(proc) == sample_of(runs.serial), describe_run(proc)


def test_viz_draws_the_measured_timeline(runs, tmp_path):
    trace = runs.dir / "trace.jsonl"
    text = check_ok(python_subprocess(["-m", "mpipar.viz", "timeline", trace, "--text",
                                       "--schedule", "1f1b"]))
    out = text.stdout
    assert re.search(r"step 2, 4 ranks, 8 microbatches, 1 chunk\(s\) per rank", out), out
    rows = re.findall(r"^rank (\d) \|([A-Ha-h.]+)\|$", out, re.MULTILINE)
    assert [r for r, _ in rows] == ["0", "1", "2", "3"], out
    for _, row in rows:  # a span shorter than a column may not show: check a few letters
        assert re.search("[A-H]", row) and re.search("[a-h]", row), row
    timeline, ranks = trace_timeline(load_jsonl(trace), step=2)  # the data behind the drawing
    assert ranks == [0, 1, 2, 3]
    for r, row in enumerate(timeline.intervals):
        assert sorted((iv.kind, iv.mb) for iv in row) == sorted(
            (kind, mb) for kind in "FB" for mb in range(8)), f"rank {r}: {row}"
    assert re.search(r"theory \(1f1b, p=4, m=8, v=1\): 27\.3%", out), out
    pytest.importorskip("matplotlib")
    png = tmp_path / "pipeline.png"
    check_ok(python_subprocess(["-m", "mpipar.viz", "timeline", trace, "-o", png]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize("n,flags,fragments", [
    (2, ["--pp", "2", "--n-layer", "1", "--batch-size", "10", "--microbatches", "4"],
     ["--n-layer 1 gives fewer layers than stages: --pp 2 × --virtual-stages 1 = 2",
      "--batch-size 10 is not divisible by --dp 1 × --microbatches 4 = 4"]),
    (2, ["--pp", "2", "--n-layer", "3", "--schedule", "interleaved", "--virtual-stages", "2",
         "--microbatches", "3", "--batch-size", "6"],
     ["--n-layer 3 gives fewer layers than stages: --pp 2 × --virtual-stages 2 = 4",
      "--schedule interleaved needs --microbatches 3 divisible by --pp 2"]),
], ids=["layers-and-batch", "interleaved"])
def test_bad_pipeline_layout_exits_2_on_every_rank(n, flags, fragments, tmp_path):
    """Every rank validates before communicating: had one gone on, it would wait forever in
    the first collective (the run would time out), and its output files would exist."""
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    proc = train_subprocess([*RUN_ARGS, *flags, "--metrics", out / "m.jsonl", "--trace",
                             out / "t.jsonl"], n=n, timeout=60)
    assert proc.returncode == 2, describe_run(proc)
    assert time.monotonic() - t0 < 30, "ranks waited before exiting"
    assert proc.stderr.count("train.py: error:") == 1, describe_run(proc)
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} missing\n{describe_run(proc)}"
    assert "Traceback" not in proc.stderr and list(out.iterdir()) == [], describe_run(proc)

