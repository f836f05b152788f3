"""Generation, evaluation and int8 shards under tp, pp and dp: ``mpirun -n N python
inference_checks.py``.

Every layout with tp × pp = N (and sequence parallelism where tp > 1) generates from the same
weights, with the KV cache, three prompts of lengths 1, 2·N and 5, for more tokens than the
context holds (so contexts restart). Each rank also runs the 1-process model on the same
prompts *without* a cache, on its own (``ProcessGrid.single``); the checks:

* cached logits at every step equal the uncached 1-process ones to 1e-12 relative in float64
  (the same operations on the same numbers, but products of other shapes: rounding only),
  and the tokens are the same;
* the trace of one decode step: tp: 2 all-reduces of (B, 1, d) per layer, plus the
  embedding's all-reduce and the logits' all-gather; pp: one send of (B, 1, d) per stage but
  the last, and one broadcast of the logits (B, V);
* int8: each tp rank quantising its shard gives exactly its slice of the full matrix's int8
  values and scales (column-, row- and vocab-parallel weights);
* evaluation in every dp × tp × pp layout of N ranks: the perplexity of a held-out text equals
  the 1-process one to 1e-12, and the BLEU/ROUGE of greedy continuations are the same.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from verdict import Checks

from mpipar.comm import Comm
from mpipar.decoding import Generator, SamplingConfig
from mpipar.evaluate import continuation_scores, perplexity
from mpipar.grid import ProcessGrid
from mpipar.inference import InferenceModel
from mpipar.model import GPT, GPTConfig
from mpipar.quantize import quantize_rows, quantize_shard
from mpipar.trace import Tracer

RTOL = 1e-12
STEPS = 16  # more than seq_len minus the longest prompt: contexts restart
SAMPLING = SamplingConfig(temperature=0.9, top_k=9, top_p=0.95, seed=5)


def full_state(cfg: GPTConfig) -> dict[str, np.ndarray]:
    model = GPT(cfg)
    model.initialize(11)
    return {name: p.data.copy() for name, p in model.named_parameters()}


def layouts(n: int) -> list[tuple[int, int, bool]]:
    """(tp, pp, sequence parallel) with tp·pp = n."""
    out = []
    for tp in (t for t in (1, 2, 4) if n % t == 0):
        pp = n // tp
        out.append((tp, pp, False))
        if tp > 1:
            out.append((tp, pp, True))
    return out


def generate(model: InferenceModel, prompts, cache: bool) -> Generator:
    gen = Generator(model, SAMPLING, use_cache=cache, keep_logits=True)
    gen.out = gen.run(prompts, STEPS)
    return gen


def decode_step_calls(tracer: Tracer, step: int) -> Counter:
    return Counter((r.op, r.group, tuple(r.shape)) for r in tracer.records
                   if r.step == step and r.op != "compute")


def check_layout(checks: Checks, world: Comm, cfg, state, prompts, reference, layout) -> None:
    tp, pp, sp = layout
    name = f"tp{tp} pp{pp}" + (" sp" if sp else "")
    grid = ProcessGrid.build(world, 1, tp, pp)
    model = InferenceModel(cfg, grid, sequence_parallel=sp)
    model.load(state)
    world.tracer.records.clear()
    gen = generate(model, prompts, cache=True)
    calls = decode_step_calls(world.tracer, 1)  # the first decode step: 3 rows, 1 token each
    with checks.check(f"cached logits and tokens: {name}"):
        assert gen.out == reference.out, f"tokens {gen.out} != 1-process {reference.out}"
        assert len(gen.logits) == len(reference.logits)
        for i, (got, want) in enumerate(zip(gen.logits, reference.logits, strict=True)):
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err <= RTOL, f"step {i}: logits differ by {err:.2e} relative"
    with checks.check(f"decode step communication: {name}"):
        b, d, v = len(prompts), cfg.d_model, cfg.vocab_size
        want = Counter()
        if tp > 1:
            n_local = len(model.model.blocks)
            want[("allreduce", "tp", (b, 1, d))] = 2 * n_local + grid.is_first_stage
            if grid.is_last_stage:
                want[("allgather", "tp", (b, 1, -(-v // tp)))] = 1
        if pp > 1:
            if not grid.is_last_stage:
                want[("send", "pp", (b, 1, d))] = 1
            if not grid.is_first_stage:
                want[("recv", "pp", (b, 1, d))] = 1
            want[("broadcast", "pp", (b, v))] = 1
        assert calls == want, f"rank {world.rank}: {dict(calls)} != {dict(want)}"


def check_int8_shards(checks: Checks, world: Comm, cfg, state) -> None:
    grid = ProcessGrid.build(world, 1, world.size, 1)
    model = InferenceModel(cfg, grid)
    model.load(state)
    with checks.check(f"int8: each tp{world.size} shard quantised as the full matrix"):
        kinds = Counter()
        for p in model.model.parameters():
            if p.ndim != 2:
                continue
            q, scale = quantize_shard(p, grid.tp_comm)
            q_full, s_full = quantize_rows(state[p.name])
            index = p.shard_index if p.shard_index is not None else (slice(None),)
            assert np.array_equal(q, q_full[index]), f"{p.name}: int8 values differ"
            assert np.array_equal(scale, s_full[index[0]]), f"{p.name}: scales differ"
            kinds[len(index)] += 1
        assert kinds[2] and kinds[1], f"expected row- and column-split matrices, got {kinds}"


def evaluation(model: InferenceModel, tokens: np.ndarray) -> tuple[float, dict]:
    ppl = perplexity(model, tokens, batch_size=4)
    chars = "abcdef ghij k"  # one character per id; id 6 and 11 are spaces
    scores = continuation_scores(model, tokens, 3, 6, 10,
                                 lambda ids: "".join(chars[i] for i in ids))
    return ppl.loss, scores


def check_evaluation(checks: Checks, world: Comm, cfg, state, reference) -> None:
    n = world.size
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=7 * cfg.seq_len + 5)
    for dp in (d for d in (1, 2, 4) if n % d == 0):
        rest = n // dp
        for tp, pp in ((t, rest // t) for t in (1, 2, 4) if rest % t == 0):
            grid = ProcessGrid.build(world, dp, tp, pp)
            model = InferenceModel(cfg, grid)
            model.load(state)
            loss, scores = evaluation(model, tokens)
            with checks.check(f"evaluation: dp{dp} tp{tp} pp{pp}"):
                err = abs(loss - reference[0]) / reference[0]
                assert err <= RTOL, f"perplexity loss {loss} vs 1-process {reference[0]}"
                assert scores == reference[1], f"{scores} != 1-process {reference[1]}"


def main() -> None:
    tracer = Tracer(0, enabled=True)
    world = Comm.world(tracer)
    tracer.rank = world.rank
    checks = Checks(world)
    n = world.size
    # vocabulary 13: not a multiple of tp, so the head's padded columns are in play
    cfg = GPTConfig(vocab_size=13, n_layer=4, n_head=4, d_model=16, seq_len=12,
                    dtype="float64")
    state = full_state(cfg)
    prompts = [[3], [(5 * i) % 13 for i in range(2 * n)], [1, 2, 3, 4, 5]]
    serial = InferenceModel(cfg, ProcessGrid.single(Tracer(world.rank)))
    serial.load(state)
    reference = generate(serial, prompts, cache=False)
    for layout in layouts(n):
        check_layout(checks, world, cfg, state, prompts, reference, layout)
    check_int8_shards(checks, world, cfg, state)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=7 * cfg.seq_len + 5)
    check_evaluation(checks, world, cfg, state, evaluation(serial, tokens))
    checks.report()


if __name__ == "__main__":
    main()
