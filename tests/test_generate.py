"""Generation with a KV cache: against the uncached model, in every layout, and from outside.

* in-process, float64: the cached generator's logits at every step equal the uncached ones
  to 1e-12 (prefill of right-padded prompts of different lengths, decode, contexts that
  restart with shift 1 and 5, a stop sequence), and the tokens are the same; one prompt
  draws what ``mpipar.sample``'s sampler draws (same stream, same context rule); a prompt's
  tokens do not depend on the rest of its batch; the sampling distribution (top-k, top-p);
* ``mpi_scripts/inference_checks.py`` on 2 and 4 ranks: the same against the 1-process
  uncached model under tp 2 and 4, pp 2 and 4, tp × pp, with and without sequence
  parallelism; the communication of one decode step; int8 shards; evaluation in every layout;
* ``python -m mpipar.generate``: streams what ``mpipar.sample`` prints, batches a prompts file,
  and refuses bad input with exit 2 and one line.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from conftest import check_ok, describe_run
from mpi_util import mpirun_path, parse_verdict, run_killable, run_mpi_ok, script

from mpipar import generate
from mpipar.decoding import Generator, SamplingConfig, token_distribution
from mpipar.grid import ProcessGrid
from mpipar.inference import InferenceModel
from mpipar.kv_cache import kv_bytes_per_token
from mpipar.model import GPT, GPTConfig
from mpipar.sample import sample_tokens

RTOL = 1e-12  # same operations on the same numbers; products of other shapes: rounding only
CFG = GPTConfig(vocab_size=11, n_layer=2, n_head=2, d_model=8, seq_len=10, dtype="float64")
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [3]]


@pytest.fixture(scope="module")
def model() -> InferenceModel:
    gpt = GPT(CFG)
    gpt.initialize(7)
    inference = InferenceModel(CFG, ProcessGrid.single())
    inference.load({name: p.data.copy() for name, p in gpt.named_parameters()})
    return inference


def run(model, prompts, n, *, cache=True, shift=1, stop=(), **sampling) -> Generator:
    gen = Generator(model, SamplingConfig(**sampling), use_cache=cache, shift=shift, stop=stop,
                    keep_logits=True)
    gen.out = gen.run(prompts, n)
    return gen


@pytest.mark.parametrize("shift", [1, 5])
def test_cached_logits_and_tokens_equal_uncached(model, shift):
    """25 tokens after prompts of 3, 7 and 1: every context passes seq_len 10 and restarts."""
    cached = run(model, PROMPTS, 25, shift=shift, temperature=0.9, top_p=0.9, seed=3)
    plain = run(model, PROMPTS, 25, cache=False, shift=shift, temperature=0.9, top_p=0.9,
                seed=3)
    assert cached.out == plain.out
    assert len(cached.logits) == 25 and cached.stats.restarts > 0
    for step, (got, want) in enumerate(zip(cached.logits, plain.logits, strict=True)):
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= RTOL, f"step {step}: cached logits differ by {err:.2e} relative"


def test_stop_sequence_ends_a_row_and_drops_it_from_the_batch(model):
    free = run(model, PROMPTS, 20, greedy=True)
    stop = free.out[1][3:5]  # two tokens row 1 produces at steps 3-4 anyway
    cached = run(model, PROMPTS, 20, stop=stop, greedy=True)
    plain = run(model, PROMPTS, 20, cache=False, stop=stop, greedy=True)
    assert cached.out == plain.out
    for got, want in zip(cached.out, free.out, strict=True):
        assert got == want[:len(got)], "a stopped row changed the others"
    ends = [i for i in range(len(free.out[1])) if free.out[1][max(0, i - 1):i + 1] == stop]
    assert len(cached.out[1]) == ends[0] + 1, "row 1 did not stop after its stop sequence"


def test_one_prompt_draws_what_the_plain_sampler_draws(model):
    """Row 0's stream is default_rng(seed) and its context the last seq_len tokens: the
    uncached sampler of ``mpipar.sample`` (with the model's logits) gives the same tokens."""
    gen = run(model, [[1, 2]], 30, temperature=0.8, top_k=5, seed=9)

    def logits_fn(idx):
        return model.next_logits(idx, [idx.shape[1]])

    want = sample_tokens(logits_fn, [1, 2], 30, CFG.seq_len, temperature=0.8, top_k=5, seed=9)
    assert [1, 2, *gen.out[0]] == want


def test_a_prompt_does_not_depend_on_its_batch(model):
    batch = run(model, PROMPTS, 12, temperature=1.0, seed=4).out
    for b, prompt in enumerate(PROMPTS):
        alone = run(model, [prompt], 12, temperature=1.0, seed=4 + b).out[0]
        assert alone == batch[b], f"prompt {b} drew other tokens in a batch"


def test_token_distribution_top_k_and_top_p():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    p = token_distribution(logits, SamplingConfig(temperature=1.0))
    np.testing.assert_allclose(p, [0.05, 0.4, 0.1, 0.3, 0.15], rtol=1e-12)
    p = token_distribution(logits, SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], rtol=1e-12)
    # nucleus 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the next token (0.15) is kept as well
    p = token_distribution(logits, SamplingConfig(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(p, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], rtol=1e-12)
    p = token_distribution(logits, SamplingConfig(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(p, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], rtol=1e-12)
    sharp = token_distribution(logits, SamplingConfig(temperature=0.25))
    assert sharp[1] > 0.7 and np.argmax(sharp) == 1


def test_cache_bytes(model):
    cache = model.new_cache(3)
    per_token = kv_bytes_per_token(CFG.n_layer, CFG.d_model, 8)
    assert per_token == 2 * 2 * 8 * 8
    assert cache.nbytes == 3 * CFG.seq_len * per_token


# ---- every layout (inference_checks.py) ---------------------------------------------------


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"n{n}")
def verdict(request) -> dict:
    return parse_verdict(run_mpi_ok(request.param, [script("inference_checks.py")],
                                    timeout=120))


def test_every_layout_check_passed(verdict):
    names = sorted(verdict)
    assert any(n.startswith("cached logits and tokens: tp2") for n in names), names
    assert any(n.startswith("cached logits and tokens: tp1 pp") for n in names), names
    assert any(n.endswith(" sp") for n in names), names
    assert any(n.startswith("int8") for n in names) and any("evaluation" in n for n in names)
    failed = {name: msgs for name, msgs in verdict.items() if msgs}
    assert not failed, "\n".join(f"{name}: {msgs}" for name, msgs in failed.items())


# ---- the command --------------------------------------------------------------------------


def test_command_streams_the_plain_samplers_text(run_python, tiny_checkpoint):
    """prompt + 60 characters with the cache, as ``mpipar.sample`` prints them without it
    (60 + 5 passes the tiny model's context of 32: the window slides)."""
    args = ["--checkpoint", tiny_checkpoint, "--prompt", "line ", "-n", "60", "--seed", "2"]
    got = check_ok(run_python(["-m", "mpipar.generate", *args], timeout=60))
    want = check_ok(run_python(["-m", "mpipar.sample", *args], timeout=60))
    assert got.stdout == want.stdout, describe_run(got)
    assert "first token" in got.stderr and "tokens/s" in got.stderr, got.stderr


def test_command_generates_a_batch_under_tp(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("line 1\nthe quick\nl\n", encoding="utf-8")
    args = ["-m", "mpipar.generate", "--checkpoint", tiny_checkpoint, "--prompts", prompts,
            "-n", "20", "--greedy"]
    tp = run_mpi_ok(2, [*args, "--tp", "2"], timeout=60)
    blocks = tp.stdout.split("=== prompt ")[1:]
    assert [b.split(" ===\n")[0] for b in blocks] == ["1", "2", "3"], tp.stdout
    assert blocks[1].split(" ===\n")[1].startswith("the quick")
    assert len(blocks[2].split(" ===\n")[1].rstrip("\n")) == 21


BAD_INPUT = {
    # case: (extra arguments, fragments of the one-line message)
    "character outside the vocabulary": (["--prompt", "line Z"],
                                         ["--prompt", "'Z'", "not in the vocabulary"]),
    "empty prompt": (["--prompt", ""], ["--prompt is empty"]),
    "no tokens": (["-n", "0"], ["-n must be at least 1, got 0"]),
    "zero temperature": (["--temperature", "0"], ["--temperature", "got 0.0", "--greedy"]),
    "negative temperature": (["--temperature", "-1"], ["--temperature", "got -1.0"]),
    "NaN temperature": (["--temperature", "nan"], ["--temperature", "got nan"]),
    "top-p zero": (["--top-p", "0"], ["--top-p must be in (0, 1], got 0.0"]),
    "top-p above one": (["--top-p", "1.5"], ["--top-p must be in (0, 1], got 1.5"]),
    "NaN top-p": (["--top-p", "nan"], ["--top-p must be in (0, 1], got nan"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, tiny_checkpoint, capsys):
    extra, fragments = BAD_INPUT[case]
    code = generate.main(["--checkpoint", str(tiny_checkpoint), *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m mpipar.generate: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from {lines[0]!r}"


def test_bad_prompt_exits_2_from_outside(run_python, tiny_checkpoint):
    proc = run_python(["-m", "mpipar.generate", "--checkpoint", tiny_checkpoint,
                       "--prompt", "~"], timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", describe_run(proc)
    assert len(proc.stderr.splitlines()) == 1 and "not in the vocabulary" in proc.stderr


@pytest.mark.parametrize("command, bad", [
    ("mpipar.generate", ["-n", "0"]),
    ("mpipar.evaluate", ["--data", "/nonexistent"]),
], ids=["generate", "evaluate"])
def test_a_usage_error_on_one_rank_ends_every_rank(command, bad, tiny_checkpoint, tiny_data):
    """Rank 1 alone finds a problem: both ranks meet in the start-up agreement and exit 2,
    rank 0 printing the one line that names rank 1 (no rank is left waiting)."""
    common = [sys.executable, "-m", command, "--checkpoint", str(tiny_checkpoint), "--tp", "2"]
    if command == "mpipar.evaluate":
        common += ["--data", str(tiny_data)]
    cmd = [mpirun_path(), "-n", "1", *common, ":", "-n", "1", *common, *bad]
    t0 = time.monotonic()
    proc = run_killable(cmd, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2 and proc.stdout == "", describe_run(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m {command}: error: rank 1: "), \
        describe_run(proc)
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end"
