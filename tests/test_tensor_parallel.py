"""Tensor parallelism: layers against the full layer, serial equivalence, trace, CLI.

* ``mpi_scripts/tp_checks.py`` (one launch each for tp = 2 and tp = 4): every mapping, layer,
  the vocab-parallel loss, the tied head, a whole block with dropout, parameter metadata,
  the communication of a training step counted from the trace, and generation;
* ``mpi_scripts/equivalence.py``: whole training runs in float64 against the 1-process run
  (losses, gradient norms, final parameters and optimizer state to 1e-10), for tp = 2 and 4
  with and without sequence parallelism, dropout on and off, tp × dp (with ZeRO-1) and
  tp × pp. The test corpus has 35 distinct characters, a vocabulary neither 2 nor 4
  divides, so the padded embedding rows and masked logits are always exercised;
* the command line: ``--sample`` under tp prints the 1-process text, and bad layouts exit 2
  on every rank before any communication.
"""

from __future__ import annotations

import time

import pytest
from conftest import TINY_ARGS, check_ok, describe_run
from mpi_util import (
    assert_check_passed,
    equivalence_checks,
    parse_verdict,
    run_equivalence,
    run_mpi_ok,
    script,
)

# ---- layers, mappings, loss, trace counts, generation (tp_checks.py) -----------------------

MAPPINGS = ["copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region",
            "scatter_to_tensor_parallel_region", "gather_from_tensor_parallel_region",
            "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
            "reduce_scatter_to_sequence_parallel_region"]
SP = " (sequence parallel)"
LAYER_CHECKS = [
    *(f"mapping {m}" for m in MAPPINGS),
    "ColumnParallelLinear qkv=False gather_output=False",
    "ColumnParallelLinear qkv=True gather_output=False",
    "ColumnParallelLinear qkv=False gather_output=True",
    "RowParallelLinear input_is_parallel=True",
    "RowParallelLinear input_is_parallel=False",
    "ColumnParallelLinear qkv=False gather_output=False" + SP,
    "ColumnParallelLinear qkv=True gather_output=False" + SP,
    "RowParallelLinear input_is_parallel=True" + SP,
    "VocabParallelEmbedding V=t+1: initialised shard and padding",
    "VocabParallelEmbedding V=t+1: output and gradient",
    "VocabParallelEmbedding V=4t+1: initialised shard and padding",
    "VocabParallelEmbedding V=4t+1: output and gradient",
    "vocab_parallel_cross_entropy V=4t",
    "vocab_parallel_cross_entropy V=4t+3",
    "tied head lm_loss", "tied head lm_logits",
    "tied head lm_loss" + SP, "tied head lm_logits" + SP,
    "Block with dropout", "Block with dropout" + SP,
    "parameters: full shapes, initial slices, each element on one rank",
    "tp communication per step", "tp communication per step" + SP,
    "generation", "generation" + SP,
]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def layer_verdict(request) -> dict:
    return parse_verdict(run_mpi_ok(request.param, [script("tp_checks.py")], timeout=90))


def test_every_layer_check_ran(layer_verdict):
    assert sorted(layer_verdict) == sorted(LAYER_CHECKS)


@pytest.mark.parametrize("name", LAYER_CHECKS)
def test_layer_check(layer_verdict, name):
    failures = layer_verdict.get(name)
    assert failures is not None, f"check {name!r} did not run"
    assert failures == [], "\n".join(failures)


# ---- serial equivalence (equivalence.py) --------------------------------------------------

SEQ = {"sequence_parallel": True}
EQUIVALENCE = {
    # launch id: (world size, dropout, layouts)
    "n2": (2, 0.0, [
        {"name": "tp2", "tp": 2},
        {"name": "tp2 sp", "tp": 2, "train": SEQ},
    ]),
    "n2-dropout": (2, 0.1, [
        {"name": "tp2 dropout", "tp": 2},
        {"name": "tp2 sp dropout", "tp": 2, "train": SEQ},
        {"name": "tp2 sp dropout 2 microbatches", "tp": 2,
         "train": {**SEQ, "microbatches": 2}},
        {"name": "tp2 dropout selective recompute", "tp": 2,
         "train": {"recompute": "selective"}, "same_bits_as": "tp2 dropout"},
        {"name": "tp2 sp dropout 2 microbatches full recompute", "tp": 2,
         "train": {**SEQ, "microbatches": 2, "recompute": "full"},
         "same_bits_as": "tp2 sp dropout 2 microbatches"},
    ]),
    "n4": (4, 0.0, [
        {"name": "tp4", "tp": 4},
        {"name": "tp4 sp", "tp": 4, "train": SEQ},
        {"name": "tp2 dp2", "tp": 2, "dp": 2},
        {"name": "tp2 dp2 zero1", "tp": 2, "dp": 2, "train": {"zero": 1}},
        {"name": "tp2 dp2 zero3", "tp": 2, "dp": 2, "train": {"zero": 3}},
    ]),
    "n4-dropout": (4, 0.1, [
        {"name": "tp4 sp dropout", "tp": 4, "train": SEQ},
        {"name": "tp2 dp2 sp dropout", "tp": 2, "dp": 2, "train": SEQ},
        {"name": "tp2 dp2 zero1 sp dropout", "tp": 2, "dp": 2, "train": {**SEQ, "zero": 1}},
        {"name": "tp2 dp2 zero3 sp dropout 2 microbatches", "tp": 2, "dp": 2,
         "train": {**SEQ, "zero": 3, "microbatches": 2}},
        # a pipeline stage that starts with a block, not the embedding, under sequence
        # parallelism: its residual dropouts must still slice the mask by sequence piece
        {"name": "tp2 pp2 sp dropout", "tp": 2, "pp": 2, "train": {**SEQ, "microbatches": 2}},
    ]),
}
EQUIVALENCE_CHECKS = [(launch, check)
                      for launch, (_, _, layouts) in EQUIVALENCE.items() for layout in layouts
                      for check in equivalence_checks(layout)]


@pytest.fixture(scope="module")
def equivalence_verdicts() -> dict[str, dict]:
    """One launch per (world size, dropout); verdicts are computed on first use."""
    cache: dict[str, dict] = {}

    def get(launch: str) -> dict:
        if launch not in cache:
            n, dropout, layouts = EQUIVALENCE[launch]
            spec = {"steps": 3, "model": {"dropout": dropout}, "layouts": layouts}
            cache[launch] = run_equivalence(n, spec)
        return cache[launch]

    return get


@pytest.mark.parametrize("launch,name", EQUIVALENCE_CHECKS,
                         ids=[f"{launch}: {name}" for launch, name in EQUIVALENCE_CHECKS])
def test_serial_equivalence(equivalence_verdicts, launch, name):
    assert_check_passed(equivalence_verdicts(launch), name)


# ---- the command line ---------------------------------------------------------------------


def sample_of(proc) -> str:
    """The text between train.py's ``--- sample ---`` markers."""
    _, sep, rest = proc.stdout.partition("--- sample ---\n")
    assert sep, f"no sample printed\n{describe_run(proc)}"
    return rest.partition("\n--------------\n")[0]


def test_sample_under_tp_matches_one_process(run_train, run_python, tiny_data, tmp_path):
    """A checkpoint trained on 1 process samples the same 50 characters under tp = 2 (with
    and without sequence parallelism, whose prompt lengths 1, 3, 5 ... tp does not divide)
    as on 1 process and as ``python -m mpipar.sample``."""
    ckpt = tmp_path / "ckpt"
    args = [*TINY_ARGS, "--data", tiny_data, "--sample", "50"]
    serial = sample_of(check_ok(run_train([*args, "--save", ckpt])))
    assert len(serial) == 50, repr(serial)
    for extra in ([], ["--sequence-parallel"]):
        proc = check_ok(run_train([*args, "--tp", "2", "--resume", ckpt, *extra], n=2))
        assert sample_of(proc) == serial, (
            f"tp 2 {' '.join(extra)} sampled {sample_of(proc)!r}, 1 process {serial!r}")
    proc = check_ok(run_python(["-m", "mpipar.sample", "--checkpoint", ckpt, "-n", "50",
                                "--seed", "1337"]))
    assert proc.stdout == "\n" + serial + "\n", f"mpipar.sample printed {proc.stdout!r}"


@pytest.mark.parametrize("n,flags,fragments", [
    (4, ["--tp", "4", "--n-head", "2"], ["--n-head 2 is not divisible by --tp 4"]),
    (3, ["--tp", "3"], ["--n-head 4 is not divisible by --tp 3",
                        "--d-model 64 is not divisible by --tp 3",
                        "MLP width 4 × --d-model = 256 is not divisible by --tp 3"]),
    (2, ["--tp", "2", "--sequence-parallel", "--seq-len", "33"],
     ["--sequence-parallel needs --seq-len 33 divisible by --tp 2"]),
], ids=["heads", "widths", "sequence"])
def test_bad_tp_layout_exits_2_on_every_rank(n, flags, fragments, run_train, tmp_path):
    """Every rank validates before communicating: had one gone on, it would wait forever in
    the first collective (the run would time out), and its outputs would exist."""
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    proc = run_train([*TINY_ARGS, *flags, "--metrics", out / "m.jsonl", "--trace",
                      out / "t.jsonl", "--save", out / "ckpt"], n=n, timeout=60)
    assert proc.returncode == 2, describe_run(proc)
    assert time.monotonic() - t0 < 30, "ranks waited before exiting"
    assert proc.stderr.count("train.py: error:") == 1, describe_run(proc)
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} missing\n{describe_run(proc)}"
    assert sorted(p.name for p in out.iterdir()) == [], "a refused run wrote files"
