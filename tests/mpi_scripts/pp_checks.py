"""Pipeline executor checks beyond serial equivalence: ``mpirun -n P python pp_checks.py``.

The whole world is one pipeline of P ranks; the model has 2·P blocks so that both one chunk
per rank (GPipe, 1F1B) and two (interleaved) fit. float64 throughout.

* memory: GPipe holds all M microbatches' activations, 1F1B at most P − r (what the checker
  predicted), and, every microbatch's stash on a rank being the same size, 1F1B's peak bytes
  are exactly GPipe's × (P − r)/M; everything is freed at the end of a step, and a second
  step allocates no new receive buffer;
* evaluation and generation through the pipeline equal the 1-process model's, and the
  logits are bitwise the same on every rank;
* the trace: one compute span per forward and backward with its chunk and microbatch, and
  every pipeline message a raw buffer of the activation's shape and dtype.

Serial references are computed in-process on every rank with ``ProcessGrid.single()``.
Tolerance 1e-12 relative: a pipelined forward runs the same operations on the same numbers as
the 1-process forward, so any difference can only be rounding in a reordered sum.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from verdict import Checks

from mpipar.autograd import no_grad
from mpipar.comm import Comm
from mpipar.data import CharTokenizer, Dataset, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig
from mpipar.parallel.pipeline import build_schedule, message_parts
from mpipar.trace import COMPUTE, Tracer
from mpipar.training import TrainConfig, Trainer

TEXT = ("Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly. " * 30)
RTOL = 1e-12
M = 8


def close(what: str, got, want, rtol: float = RTOL) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.max(np.abs(want))), 1e-300)
    err = float(np.max(np.abs(got - want))) / scale
    assert err <= rtol, f"{what}: differs by {err:.2e} relative to its largest element"


def main() -> None:
    tracer = Tracer(0, enabled=True)
    world = Comm.world(tracer)
    tracer.rank = world.rank
    checks = Checks(world)
    p = world.size
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2 * p, n_head=2, d_model=16,
                    seq_len=8, dtype="float64")
    data = make_dataset(TEXT, tok, seq_len=cfg.seq_len)
    base = TrainConfig(batch_size=M, microbatches=M, eval_every=0, eval_tokens=2 * M * 8,
                       warmup_steps=1, lr=1e-2)
    run = Run(cfg, base, ProcessGrid.build(world, 1, 1, p), data, tracer)
    check_memory(checks, run)
    check_evaluation_and_generation(checks, run)
    check_trace(checks, run)
    checks.report()


@dataclass
class Run:
    """What every check builds its trainers from: the model, the base training config, the
    pipeline of all ranks, the data and the (enabled) tracer."""

    cfg: GPTConfig
    base: TrainConfig
    grid: ProcessGrid
    data: Dataset
    tracer: Tracer


def check_memory(checks: Checks, run: Run) -> None:
    """GPipe against 1F1B: stashes in flight, their bytes, freeing, buffer reuse."""
    cfg, base, grid, data, tracer = run.cfg, run.base, run.grid, run.data, run.tracer
    p, r = grid.pp, grid.pp_rank
    summaries, allocated = {}, {}
    for schedule in ("gpipe", "1f1b"):
        trainer = Trainer(cfg, replace(base, schedule=schedule), grid, data, tracer)
        trainer.train_step()
        first = trainer.pipeline.pool.allocated
        trainer.train_step()
        summaries[schedule] = trainer.pipeline.memory_summary()
        allocated[schedule] = (first, trainer.pipeline.pool.allocated)
        ex = trainer.pipeline
        with checks.check(f"{schedule}: stash freed after the step"):
            assert not ex.stash and ex.stash.nbytes == 0, (
                f"{len(ex.stash)} stashes, {ex.stash.nbytes} bytes left")
            assert not (ex.inputs or ex.out_grads or ex.outputs or ex.in_grads), "buffers left"
    g, f = summaries["gpipe"], summaries["1f1b"]
    with checks.check("gpipe holds every microbatch"):
        assert g["peak_inflight"] == M == g["predicted_inflight"], g
    with checks.check("1f1b holds at most p - r microbatches"):
        assert f["peak_inflight"] == min(p - r, M) == f["predicted_inflight"], f
    with checks.check("1f1b stashes fewer bytes than gpipe"):
        assert 0 < f["peak_stash_bytes"] <= g["peak_stash_bytes"], (f, g)
        # Every microbatch's stash on this rank has the same size, so the peaks scale with
        # the number of stashes held.
        assert f["peak_stash_bytes"] * M == g["peak_stash_bytes"] * f["peak_inflight"], (f, g)
    with checks.check("receive buffers are reused"):
        for schedule, (first, second) in allocated.items():
            assert first == second, f"{schedule}: {first} buffers after step 1, {second} after 2"
            inflight = summaries[schedule]["peak_inflight"]
            if r > 0:  # at most one buffer per stash, plus one gradient in transit
                assert 1 <= first <= inflight + 1, f"{schedule}: {first} buffers, {inflight}"


def check_evaluation_and_generation(checks: Checks, run: Run) -> None:
    """Both against the 1-process model; the logits bitwise equal on every rank."""
    cfg, base, grid, data, tracer = run.cfg, run.base, run.grid, run.data, run.tracer
    world, r = grid.world, grid.pp_rank
    serial = Trainer(cfg, base, ProcessGrid.single(), data, Tracer(r))
    prompts = [[1], [3, 1, 4, 1, 5], list(range(cfg.seq_len))]
    for schedule, v in (("1f1b", 1), ("interleaved", 2)):
        tc = replace(base, schedule=schedule, virtual_stages=v)
        trainer = Trainer(cfg, tc, grid, data, tracer)
        with checks.check(f"{schedule}: evaluation equals the 1-process model"):
            close("validation loss", trainer.evaluate(), serial.evaluate())
        for prompt in prompts:
            idx = np.asarray([prompt], dtype=np.int64)
            for chunk in trainer.chunks:
                chunk.eval()
            with no_grad():
                got = trainer.pipeline.last_logits(idx)
                want = serial.chunks[0](idx).data[:, -1, :]
            everyone = world.allgather_object(got)
            with checks.check(f"{schedule}: logits of a {len(prompt)}-token prompt"):
                close("logits", got, want)
                for q, other in enumerate(everyone):
                    assert np.array_equal(other, got), f"rank {q}'s logits differ from rank {r}'s"


def check_trace(checks: Checks, run: Run) -> None:
    """One compute span per forward and backward; pipeline messages are raw buffers."""
    cfg, base, grid, data, tracer = run.cfg, run.base, run.grid, run.data, run.tracer
    p, r = grid.pp, grid.pp_rank
    for schedule, v in (("1f1b", 1), ("interleaved", 2)):
        tc = replace(base, schedule=schedule, virtual_stages=v)
        trainer = Trainer(cfg, tc, grid, data, tracer)
        tracer.clear()
        trainer.train_step()
        records = list(tracer.records)
        with checks.check(f"{schedule}: one compute span per forward and backward"):
            spans = Counter((x.name, x.phase, x.microbatch) for x in records if x.op == COMPUTE
                            and x.name.split(" ")[0] in ("forward", "backward"))
            want = Counter((f"{kind} chunk {c}", kind, mb) for kind in ("forward", "backward")
                           for c in range(v) for mb in range(M))
            assert spans == want, f"spans {sorted(spans.items())[:4]} ..."
        with checks.check(f"{schedule}: pipeline messages are raw activation buffers"):
            program = build_schedule(schedule, p, M, v)[r]
            expected = Counter()  # one MPI call per instruction: Send, Recv or Sendrecv
            for instr in program:
                parts = message_parts(instr)
                if len(parts) == 2:
                    expected["sendrecv"] += 1
                elif parts:
                    expected["send" if parts[0].is_send else "recv"] += 1
            msgs = [x for x in records if x.group == "pp"]
            assert Counter(x.op for x in msgs) == expected, (
                f"{Counter(x.op for x in msgs)} vs {expected}")
            mb_shape = (base.batch_size // M, cfg.seq_len, cfg.d_model)  # (mb, T, d)
            for x in msgs:
                assert tuple(x.shape) == mb_shape and x.dtype == "float64", (x.shape, x.dtype)
                assert x.nbytes == 8 * int(np.prod(mb_shape)), x.nbytes


if __name__ == "__main__":
    main()
