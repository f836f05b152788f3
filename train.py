"""Train a tiny GPT on one process or many: ``mpirun -n N python train.py [--dp D --tp T --pp P]``.

Run ``python train.py --help`` for every flag. With no flags it trains the ``small`` preset
on the built-in corpus for about a minute. Exit codes: 0 ok; 2 bad usage or configuration
(every rank exits, having agreed on it, before the run starts); 1 any other failure, a
stalled rank included (the whole job ends).

Read top to bottom: the flags (`mpipar/flags.py`), what each rank finds on its own
(`mpipar/configure.py`: a :class:`Setup`, or a problem), the start-up agreement of all ranks
(`mpipar/agreement.py`), then a :class:`Run` in four parts, :func:`start`, :func:`loop`,
:func:`finish` and :func:`report`, under a watchdog (`mpipar/watchdog.py`; docs/design.md
§2, §3, §7, §8).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# isort: off
import mpipar.threads  # noqa: F401  (before numpy: one BLAS thread per rank under mpirun)
# isort: on

import numpy as np

from mpipar.agreement import Verdict, agree
from mpipar.checkpoint import (
    finish_interrupted_save,
    pack_state,
    save_checkpoint,
    unpack_state,
)
from mpipar.comm import Activity, Comm, install_excepthook, world_size_and_rank
from mpipar.configure import Setup, check_alone, read_flags
from mpipar.grid import (
    ProcessGrid,
)
from mpipar.metrics import (
    MetricsWriter,
    eval_record,
    format_comm_summary,
    format_eval,
    format_progress,
    memory_record,
    merge_totals,
    peak_memory_bytes,
)
from mpipar.model import flops_per_token
from mpipar.parallel.pipeline.measure import (
    format_pipeline_report,
    pipeline_report,
    step_extents,
)
from mpipar.parallel.zero import format_memory_report, memory_report
from mpipar.profile import Profiler, format_profiles, gather_profiles
from mpipar.report import prepare_run_dir, reproduce_command, write_report
from mpipar.resume import (
    CHECKPOINT_FORMAT,
    model_specs,
)
from mpipar.trace import Tracer, load_jsonl, to_chrome_trace, write_jsonl
from mpipar.training import Trainer
from mpipar.watchdog import Watchdog

# ============================================================================================
# The run: start, loop, finish, report
# ============================================================================================


@dataclass
class Run:
    """One training run on this rank: what :func:`start` builds and the later parts use."""

    args: argparse.Namespace
    setup: Setup
    world: Comm
    watchdog: Watchdog
    trainer: Trainer
    metrics: MetricsWriter
    memory: dict[str, int]  # optimizer-state and gradient bytes (ZeRO's saving)
    step_times: list[float] = field(default_factory=list)
    last: dict[str, Any] | None = None  # the metrics of the last step
    elapsed: float = 0.0  # seconds of the training loop

    def show(self, text: str) -> None:
        """Print on global rank 0 (results: the summary, the sample)."""
        if self.world.rank == 0:
            print(text)

    def say(self, text: str) -> None:
        """Print progress on global rank 0, unless --quiet."""
        if not self.args.quiet:
            self.show(text)


def start(args: argparse.Namespace, setup: Setup, world: Comm, watchdog: Watchdog) -> Run:
    """Build this rank's part of the model, load the checkpoint, and say what will run."""
    s = setup
    trainer = Trainer(s.cfg, s.tc, ProcessGrid.build(world, s.dp, s.tp, s.pp, s.cp), s.data,
                      world.tracer)
    run = Run(args, s, world, watchdog, trainer, MetricsWriter(args.metrics, world.rank == 0),
              memory_report(trainer.optimizer, trainer.grad_sync, trainer.params))
    if s.resumed is not None:
        trainer.load_full_state(*unpack_state(s.resumed.arrays))
        trainer.load_checkpoint_meta(s.resumed.checkpoint.meta)
        trainer.step = s.resumed.checkpoint.meta["step"]
        for note in s.resumed.notes:
            run.say(note)
    if world.rank == 0:  # every rank has read the checkpoint: now it may be renamed
        for path in dict.fromkeys(p for p in (args.resume, args.save) if p):
            for note in finish_interrupted_save(path):
                run.say(f"note: {note}")
    n_params = sum(int(np.prod(spec.shape)) for spec in model_specs(s.cfg).values())
    cfg, tc = s.cfg, s.tc
    cp = f" × cp {s.cp}" if s.cp > 1 else ""
    run.say(f"mpipar | world {world.size} = dp {s.dp} × tp {s.tp} × pp {s.pp}{cp} | {s.source}")
    run.say(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
            f"seq_len {cfg.seq_len}, vocab {cfg.vocab_size}, {n_params:,} parameters, "
            f"{cfg.dtype}")
    run.say(f"training: {tc.steps} steps of {tc.batch_size} sequences "
            f"({tc.batch_size * cfg.seq_len} tokens), {tc.microbatches} microbatch(es), "
            f"{tc.optimizer} lr {tc.lr}"
            + (f", resuming at step {trainer.step}" if s.resumed is not None else ""))
    if cfg.n_expert:
        run.say(f"experts: {cfg.n_expert} per block, top-{cfg.moe_top_k}, capacity factor "
                f"{cfg.capacity_factor}, aux loss coef {cfg.aux_loss_coef}, ep {tc.ep}")
    if trainer.precision.half:
        run.say(f"precision: {tc.precision} compute on {cfg.dtype} master weights"
                + (", dynamic loss scaling" if trainer.scaler is not None else ""))
    if tc.zero and s.dp > 1:
        run.say(format_memory_report(run.memory))
    return run


def loop(run: Run) -> None:
    """Train up to --steps (or --stop-at): a metrics and a progress line, evaluations, and
    a checkpoint every --save-every steps."""
    trainer, tc, every = run.trainer, run.setup.tc, run.args.save_every
    stop_at = min(tc.steps, run.args.stop_at or tc.steps)
    t_start = time.perf_counter()
    run.watchdog.beat("training")
    while trainer.step < stop_at:
        m = trainer.train_step()
        run.watchdog.step_done(m["step_time_s"])
        run.last = m
        run.step_times.append(m["step_time_s"])
        run.metrics.write(m)
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"loss became {m['loss']} at step {m['step']}")
        if m["step"] % tc.log_every == 0 or trainer.step == tc.steps:
            run.say(format_progress(m, tc.steps, time.perf_counter() - t_start))
        if (tc.eval_every and trainer.step % tc.eval_every == 0) or trainer.step == stop_at:
            run.watchdog.beat("evaluation")
            record = eval_record(m["step"], trainer.evaluate())
            run.metrics.write(record)
            run.say(format_eval(record))
        if every and trainer.step % every == 0 and trainer.step < stop_at:
            save(run)  # the last step's checkpoint is finish()'s
        run.watchdog.beat("training")
    run.elapsed = time.perf_counter() - t_start


def save(run: Run) -> None:
    """Write the --save checkpoint (every rank helps gather it; rank 0 writes it)."""
    trainer, s = run.trainer, run.setup
    run.watchdog.beat("saving")
    model_state, opt_state = trainer.full_state()
    if run.world.rank == 0:
        save_checkpoint(run.args.save, pack_state(model_state, opt_state), {
            "format": CHECKPOINT_FORMAT, "step": trainer.step, "model": s.cfg.to_dict(),
            "train": s.tc.to_dict(), "tokenizer": s.data.tokenizer.to_json(),
            "layout": {"dp": s.dp, "tp": s.tp, "pp": s.pp},
            "data": {"source": s.source, "sha256": s.text_sha256}, **trainer.checkpoint_meta()})
        run.say(f"saved checkpoint to {run.args.save} (step {trainer.step})")
    run.watchdog.beat()


def finish(run: Run) -> None:
    """What the run leaves behind: a checkpoint (--save) and a sample (--sample)."""
    trainer, s, args = run.trainer, run.setup, run.args
    if args.save:
        save(run)
    if args.sample:
        run.watchdog.beat("sampling")
        tokenizer = s.data.tokenizer
        prompt = tokenizer.encode("\n").tolist() if "\n" in tokenizer.chars else [0]
        out = trainer.generate(prompt, args.sample, temperature=args.temperature,
                               top_k=args.top_k, seed=s.tc.seed)
        run.show("--- sample ---")
        run.show(tokenizer.decode(out[len(prompt):]))
        run.show("--------------")
    run.watchdog.beat("summary")


def report(run: Run) -> None:
    """The summary: communication, pipeline and throughput figures; the trace files."""
    world = run.world
    # Every rank's totals, gathered as small control messages.
    all_totals = world.allgather_object(
        {f"{op}|{group}": v for (op, group), v in world.tracer.totals().items()})
    peaks = world.allgather_object(peak_memory_bytes())
    memory = world.allgather_object(memory_record(run.memory))
    pipeline = gather_pipeline_report(run)
    if run.args.trace:
        write_trace(run)
    profiles = gather_profiles(world, run.args.profile)
    if world.rank == 0:
        table = format_comm_summary(all_totals, sum(run.step_times))
        if table is not None:
            run.show(table)
        if profiles is not None:
            run.show(format_profiles(profiles))
        summary = summary_record(run, all_totals, peaks)
        summary["memory_per_rank"] = memory
        if profiles is not None:
            summary["profile"] = profiles
        if pipeline is not None:
            summary["pipeline"] = pipeline
            run.show(format_pipeline_report(pipeline))
        run.metrics.write(summary)
        run.show(f"done: {summary['steps']} steps in {run.elapsed:.1f}s, median step "
                 f"{summary['median_step_time_s'] * 1e3:.1f} ms, "
                 f"{summary['tokens_per_s']:.0f} tokens/s")
    run.metrics.close()


def gather_pipeline_report(run: Run) -> dict[str, Any] | None:
    """The measured bubble and stashed activations of every rank (collective); None without
    a pipeline."""
    pipeline, tc = run.trainer.pipeline, run.setup.tc
    if pipeline is None:
        return None
    measured = run.world.allgather_object(
        (step_extents(run.world.tracer.records), pipeline.memory_summary()))
    return pipeline_report(measured, tc.schedule, run.setup.pp, tc.microbatches,
                           tc.virtual_stages)


def summary_record(run: Run, all_totals: list[dict], peaks: list[int]) -> dict[str, Any]:
    """The last metrics line: totals of the run (the first step, which warms up, is left out
    of the median step time when there are others)."""
    s, times = run.setup, run.step_times
    median = float(np.median(times[1:] if len(times) > 1 else times or [0]))
    tokens_per_step = s.tc.batch_size * s.cfg.seq_len
    return {
        "event": "summary", "steps": len(times), "tokens": len(times) * tokens_per_step,
        "time_s": run.elapsed, "median_step_time_s": median,
        "tokens_per_s": tokens_per_step / median if median else 0.0,
        "flops_per_token": flops_per_token(s.cfg),
        "final_loss": run.last["loss"] if run.last else None,
        "layout": {"world": run.world.size, "dp": s.dp, "tp": s.tp, "pp": s.pp,
                   **({"cp": s.cp} if s.cp > 1 else {})},
        "comm": merge_totals(all_totals), "peak_memory_bytes": peaks,
        "memory_rank0": run.memory,
    }


def save_report(run: Run) -> None:
    """--report DIR: the run's description beside its metrics and trace, and its page."""
    if run.world.rank != 0:
        return
    s = run.setup
    path = write_report(run.args.report, {
        "command": reproduce_command(run.world.size, sys.argv[1:]), "data": s.source,
        "layout": {"world": run.world.size, "dp": s.dp, "tp": s.tp, "pp": s.pp},
        "model": s.cfg.to_dict(), "train": s.tc.to_dict(),
        "metrics": run.args.metrics, "trace": run.args.trace})
    run.show(f"report: {path}")


def write_trace(run: Run) -> None:
    """--trace FILE: each rank writes its records, rank 0 joins them into FILE (one JSON
    object per line) and converts them to a Chrome/Perfetto trace, ``<FILE>.chrome.json``."""
    path, world = run.args.trace, run.world
    if world.size == 1:
        write_jsonl(path, world.tracer.records)
    else:
        write_jsonl(f"{path}.rank{world.rank}", world.tracer.records)
        world.barrier()
        if world.rank == 0:
            with open(path, "w", encoding="utf-8") as out:
                for r in range(world.size):
                    with open(f"{path}.rank{r}", encoding="utf-8") as f:
                        out.write(f.read())
                    os.remove(f"{path}.rank{r}")
    if world.rank == 0:
        with open(os.path.splitext(path)[0] + ".chrome.json", "w") as f:
            json.dump(to_chrome_trace(load_jsonl(path)), f)


def main(argv: list[str] | None = None) -> int:
    world_size, rank = world_size_and_rank()
    args, found = read_flags(argv, rank)
    profile = args.profile if args is not None else None
    # With --profile the tracer is a Profiler, which also times every operation.
    tracer = (Tracer(rank, enabled=True) if profile is None
              else Profiler(rank, keep_spans=bool(profile)))
    world = Comm.world(tracer, Activity())
    install_excepthook(world)
    timeout = args.timeout if args is not None else 0
    with Watchdog(timeout, rank, world.tracer, world.activity) as watchdog:
        setup = None
        if args is not None:
            found, setup = check_alone(args, world_size)
        verdict = agree(world, found)  # every rank, whatever it found
        if verdict.exit_code is not None:
            return conclude(verdict, rank)
        if args.report:  # its metrics and trace go into the directory unless given elsewhere
            args.metrics, args.trace = prepare_run_dir(args.report, args.metrics, args.trace)
        run = start(args, setup, world, watchdog)
        loop(run)
        finish(run)
        report(run)
        if args.report:
            save_report(run)
    return 0


def conclude(verdict: Verdict, rank: int) -> int:
    """The exit code of a run that ends at the start-up agreement; rank 0 says why."""
    if rank == 0 and verdict.message:
        print(f"train.py: error: {verdict.message}", file=sys.stderr)
    return verdict.exit_code


if __name__ == "__main__":
    sys.exit(main())
