"""Train a tiny GPT on one process or many: ``mpirun -n N python train.py [--dp D --tp T --pp P]``.

Run ``python train.py --help`` for every flag. With no flags it trains the ``small`` preset
on the built-in corpus for about a minute. Exit codes: 0 ok; 2 bad usage or configuration
(every rank exits before any communication); 1 any other failure (the whole job ends).

Read top to bottom: the flags (`mpipar/flags.py`), what they resolve to on each rank alone
(:func:`configure` → :class:`Setup`), then a :class:`Run` in four parts, :func:`start`,
:func:`loop`, :func:`finish` and :func:`report` (docs/design.md §2, §3, §7).
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

# One BLAS thread per rank unless the user chose otherwise: several ranks each running
# several BLAS threads on the same cores slow each other down badly.
if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np

from mpipar import backend
from mpipar.checkpoint import (
    META_FILE,
    STATE_FILE,
    CheckpointError,
    changed_settings,
    check_resume,
    load_checkpoint,
    model_shapes,
    pack_state,
    save_checkpoint,
    unpack_state,
)
from mpipar.comm import Comm, install_excepthook, world_size_and_rank
from mpipar.data import CharTokenizer, DataError, Dataset, default_corpus, load_text, make_dataset
from mpipar.distill import check_distillation
from mpipar.flags import parse_args
from mpipar.grid import (
    ConfigError,
    ProcessGrid,
    check_same_config,
    resolve_sizes,
    validate_layout,
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
from mpipar.model import PRESETS, GPTConfig, flops_per_token
from mpipar.parallel.full_state import full_state, load_full_state
from mpipar.parallel.pipeline.measure import (
    format_pipeline_report,
    pipeline_report,
    step_extents,
)
from mpipar.parallel.zero import format_memory_report, memory_report
from mpipar.profile import Profiler, format_profiles, gather_profiles
from mpipar.quantize import refuse_quantized
from mpipar.report import check_run_dir, prepare_run_dir, reproduce_command, write_report
from mpipar.trace import Tracer, load_jsonl, to_chrome_trace, write_jsonl
from mpipar.training import EVAL_TOKENS, TrainConfig, Trainer

# ============================================================================================
# What the flags resolve to, on each rank alone
# ============================================================================================


class UsageError(ValueError):
    """A bad combination of flags (exit code 2)."""


# What a rank reports as a usage error (exit 2) before it talks to any other.
USAGE_ERRORS = (UsageError, ConfigError, DataError, CheckpointError, ValueError, RuntimeError)


@dataclass(frozen=True)
class Setup:
    """The run the flags describe, checked on this rank before any communication."""

    cfg: GPTConfig
    tc: TrainConfig
    dp: int
    tp: int
    pp: int
    data: Dataset
    source: str  # where the text comes from
    resumed: tuple[dict[str, np.ndarray], dict[str, Any]] | None  # (arrays, meta) of --resume


def configure(args: argparse.Namespace, world_size: int) -> Setup:
    """Turn flags into configs and validate them, touching no other process."""
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or preset["batch_size"]
    shape = {k: getattr(args, k) or v for k, v in preset.items() if k != "batch_size"}
    check_values(args)
    check_output_paths(args)
    dp, tp, pp = resolve_sizes(world_size, args.dp, args.tp, args.pp)
    if args.zero and args.optimizer != "adamw":
        raise UsageError(f"--zero {args.zero} shards AdamW's state; it does not apply to "
                         f"--optimizer {args.optimizer}")
    validate_layout(world_size, dp, tp, pp, batch_size=batch_size,
                    microbatches=args.microbatches, n_layer=shape["n_layer"],
                    n_head=shape["n_head"], d_model=shape["d_model"],
                    virtual_stages=args.virtual_stages, schedule=args.schedule, zero=args.zero,
                    sequence_parallel=args.sequence_parallel, seq_len=shape["seq_len"])
    resumed = load_checkpoint(args.resume) if args.resume else None
    if resumed is not None:
        refuse_quantized(resumed[1], "--resume", args.resume)
    text, source = (load_text(args.data), args.data) if args.data else default_corpus()
    tokenizer = (CharTokenizer.from_chars(resumed[1].get("tokenizer", [])) if resumed
                 else CharTokenizer.from_text(text))
    data = make_dataset(text, tokenizer, seq_len=shape["seq_len"], source=source)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, dropout=args.dropout, dtype=args.dtype,
                    **shape)
    tc = train_config(args, batch_size)
    if args.teacher:
        check_distillation(tc, cfg, tokenizer, tp, pp)
    if resumed is not None:
        check_resume(*resumed, cfg, tc)
    return Setup(cfg, tc, dp, tp, pp, data, source, resumed)


def check_values(args: argparse.Namespace) -> None:
    """Values argparse lets through that would fail (or silently do nothing) mid-run.

    Written so that NaN fails every test.
    """
    for flag, value, ok, rule in (
        ("--dropout", args.dropout, 0.0 <= args.dropout < 1.0, "in [0, 1)"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
        ("--lr", args.lr, math.isfinite(args.lr), "finite"),
        ("--min-lr-ratio", args.min_lr_ratio, 0.0 <= args.min_lr_ratio <= 1.0, "in [0, 1]"),
        ("--weight-decay", args.weight_decay, 0.0 <= args.weight_decay < math.inf,
         "finite and >= 0"),
        ("--grad-clip", args.grad_clip, 0.0 <= args.grad_clip < math.inf,
         "finite and >= 0 (0 disables clipping)"),
        ("--momentum", args.momentum, 0.0 <= args.momentum < 1.0, "in [0, 1)"),
    ):
        if not ok:
            raise UsageError(f"{flag} must be {rule}, got {value}")


def check_output_paths(args: argparse.Namespace) -> None:
    """Output paths are checked now, not after training: a run must not end failing to save."""
    for flag, path in (("--metrics", args.metrics), ("--trace", args.trace),
                       ("--profile", args.profile)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(path) or ".")):
            raise UsageError(f"{flag} {path}: not a file in an existing directory")
    problem = check_run_dir(args.report) if args.report else None
    if problem:
        raise UsageError(problem)
    if args.save and os.path.exists(args.save) and not (
            os.path.isdir(args.save) and set(os.listdir(args.save)) <= {STATE_FILE, META_FILE}):
        raise UsageError(f"--save {args.save} exists and is not a checkpoint directory; "
                         "refusing to replace it")


def train_config(args: argparse.Namespace, batch_size: int) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed, optimizer=args.optimizer,
        momentum=args.momentum, eval_every=args.eval_every,
        eval_tokens=args.eval_tokens or EVAL_TOKENS[args.preset],
        log_every=args.log_every, microbatches=args.microbatches, schedule=args.schedule,
        virtual_stages=args.virtual_stages, zero=args.zero, bucket_mb=args.bucket_mb,
        overlap=not args.no_overlap, allreduce=args.allreduce,
        dp_strategy=args.dp_strategy.replace("-", "_"),
        sequence_parallel=args.sequence_parallel, teacher=args.teacher,
        distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature)


def connect(setup: Setup, rank: int, profile: str | None = None) -> Comm:
    """The world communicator, once every rank agrees on the run (else ConfigError). With
    ``profile`` (--profile), its tracer is a Profiler, which also times every operation."""
    tracer = (Tracer(rank, enabled=True) if profile is None
              else Profiler(rank, keep_spans=bool(profile)))
    world = Comm.world(tracer)
    install_excepthook(world)
    check_same_config(world, {"argv": sys.argv[1:], "model": setup.cfg.to_dict(),
                              "train": setup.tc.to_dict(),
                              "sizes": [setup.dp, setup.tp, setup.pp],
                              "vocab": setup.data.tokenizer.to_json()})
    return world


# ============================================================================================
# The run: start, loop, finish, report
# ============================================================================================


@dataclass
class Run:
    """One training run on this rank: what :func:`start` builds and the later parts use."""

    args: argparse.Namespace
    setup: Setup
    world: Comm
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


def start(args: argparse.Namespace, setup: Setup, world: Comm) -> Run:
    """Build this rank's part of the model, load the checkpoint, and say what will run."""
    s = setup
    trainer = Trainer(s.cfg, s.tc, ProcessGrid.build(world, s.dp, s.tp, s.pp), s.data,
                      world.tracer)
    run = Run(args, s, world, trainer, MetricsWriter(args.metrics, world.rank == 0),
              memory_report(trainer.optimizer, trainer.grad_sync, trainer.params))
    if s.resumed is not None:
        arrays, meta = s.resumed
        load_full_state(trainer.params, trainer.optimizer, *unpack_state(arrays))
        trainer.step = meta["step"]
        changed = changed_settings(meta.get("train", {}), s.tc.to_dict())
        if changed:
            run.say("warning: resuming with training settings that differ from the "
                    f"checkpoint's ({changed}); the run will not continue exactly as it "
                    "would have")
    n_params = sum(int(np.prod(shape)) for shape in model_shapes(s.cfg).values())
    cfg, tc = s.cfg, s.tc
    run.say(f"mpipar | world {world.size} = dp {s.dp} × tp {s.tp} × pp {s.pp} | {s.source}")
    run.say(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
            f"seq_len {cfg.seq_len}, vocab {cfg.vocab_size}, {n_params:,} parameters, "
            f"{cfg.dtype}")
    run.say(f"training: {tc.steps} steps of {tc.batch_size} sequences "
            f"({tc.batch_size * cfg.seq_len} tokens), {tc.microbatches} microbatch(es), "
            f"{tc.optimizer} lr {tc.lr}"
            + (f", resuming at step {trainer.step}" if s.resumed is not None else ""))
    if tc.zero and s.dp > 1:
        run.say(format_memory_report(run.memory))
    return run


def loop(run: Run) -> None:
    """Train up to --steps (or --stop-at): a metrics and a progress line, and evaluations."""
    trainer, tc = run.trainer, run.setup.tc
    stop_at = min(tc.steps, run.args.stop_at or tc.steps)
    t_start = time.perf_counter()
    while trainer.step < stop_at:
        m = trainer.train_step()
        run.last = m
        run.step_times.append(m["step_time_s"])
        run.metrics.write(m)
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"loss became {m['loss']} at step {m['step']}")
        if m["step"] % tc.log_every == 0 or trainer.step == tc.steps:
            run.say(format_progress(m, tc.steps, time.perf_counter() - t_start))
        if (tc.eval_every and trainer.step % tc.eval_every == 0) or trainer.step == stop_at:
            record = eval_record(m["step"], trainer.evaluate())
            run.metrics.write(record)
            run.say(format_eval(record))
    run.elapsed = time.perf_counter() - t_start


def finish(run: Run) -> None:
    """What the run leaves behind: a checkpoint (--save) and a sample (--sample)."""
    trainer, s, args = run.trainer, run.setup, run.args
    if args.save:
        model_state, opt_state = full_state(trainer.params, trainer.optimizer, trainer.grid,
                                            trainer.dtype)
        if run.world.rank == 0:
            save_checkpoint(args.save, pack_state(model_state, opt_state), {
                "format": 1, "step": trainer.step, "model": s.cfg.to_dict(),
                "train": s.tc.to_dict(), "tokenizer": s.data.tokenizer.to_json(),
                "layout": {"dp": s.dp, "tp": s.tp, "pp": s.pp}})
            run.say(f"saved checkpoint to {args.save} (step {trainer.step})")
    if args.sample:
        tokenizer = s.data.tokenizer
        prompt = tokenizer.encode("\n").tolist() if "\n" in tokenizer.chars else [0]
        out = trainer.generate(prompt, args.sample, temperature=args.temperature,
                               top_k=args.top_k, seed=s.tc.seed)
        run.show("--- sample ---")
        run.show(tokenizer.decode(out[len(prompt):]))
        run.show("--------------")


def report(run: Run) -> None:
    """The summary: communication, pipeline and throughput figures; the trace files."""
    world = run.world
    # Every rank's totals, gathered as small control messages.
    all_totals = world.allgather_object(
        {f"{op}|{group}": v for (op, group), v in world.tracer.totals().items()})
    peaks = world.allgather_object(peak_memory_bytes())
    memory = world.allgather_object(
        memory_record(run.memory, np.dtype(run.setup.cfg.dtype).itemsize))
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
        "layout": {"world": run.world.size, "dp": s.dp, "tp": s.tp, "pp": s.pp},
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
    args = parse_args(argv)
    world_size, rank = world_size_and_rank()
    try:
        backend.use_device(args.device)
        setup = configure(args, world_size)
    except USAGE_ERRORS as exc:
        return usage_error(exc, rank)
    try:
        world = connect(setup, rank, args.profile)
    except ConfigError as exc:  # raised on every rank alike
        return usage_error(exc, rank)
    if args.report:  # its metrics and trace go into the directory unless given elsewhere
        args.metrics, args.trace = prepare_run_dir(args.report, args.metrics, args.trace)
    run = start(args, setup, world)
    loop(run)
    finish(run)
    report(run)
    if args.report:
        save_report(run)
    return 0


def usage_error(exc: Exception, rank: int) -> int:
    """Exit code 2, with the one-line reason printed once (by rank 0)."""
    if rank == 0:
        print(f"train.py: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
