"""Train a tiny GPT on one process or many: ``mpirun -n N python train.py [--dp D --tp T --pp P]``.

Run ``python train.py --help`` for every flag. With no flags it trains the ``small`` preset
on the built-in corpus for about a minute. Exit codes: 0 ok; 2 bad usage or configuration
(every rank exits, having agreed on it, before the run starts); 1 any other failure, a
stalled rank included (the whole job ends).

Read top to bottom: the flags (`mpipar/flags.py`), what each rank finds on its own
(:func:`configure` → :class:`Setup`, or a problem), the start-up agreement of all ranks
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

# One BLAS thread per rank unless the user chose otherwise: several ranks each running
# several BLAS threads on the same cores slow each other down badly.
if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np

from mpipar import backend
from mpipar.agreement import ERROR, HELP, RankReport, Verdict, agree
from mpipar.checkpoint import (
    Checkpoint,
    CheckpointError,
    finish_interrupted_save,
    pack_state,
    read_checkpoint,
    save_checkpoint,
    unpack_state,
)
from mpipar.comm import Activity, Comm, install_excepthook, world_size_and_rank
from mpipar.data import (
    CharTokenizer,
    DataError,
    Dataset,
    default_corpus,
    load_text,
    make_dataset,
    text_digest,
)
from mpipar.distill import check_distillation
from mpipar.flags import HelpRequested, UsageError, parse_args
from mpipar.grid import (
    ConfigError,
    ProcessGrid,
    layout_problems,
    problems_error,
    resolve_sizes,
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
from mpipar.outputs import Output, output_problems
from mpipar.parallel.pipeline.measure import (
    format_pipeline_report,
    pipeline_report,
    step_extents,
)
from mpipar.parallel.zero import format_memory_report, memory_report
from mpipar.precision import resolve_precision
from mpipar.profile import Profiler, format_profiles, gather_profiles
from mpipar.quantize import refuse_quantized
from mpipar.report import METRICS_FILE, TRACE_FILE, prepare_run_dir, reproduce_command, write_report
from mpipar.resume import (
    CHECKPOINT_FORMAT,
    changed_settings,
    check_resume,
    check_step_count,
    check_training_text,
    model_specs,
    saved_vocabulary,
)
from mpipar.trace import Tracer, load_jsonl, to_chrome_trace, write_jsonl
from mpipar.training import EVAL_TOKENS, TrainConfig, Trainer
from mpipar.watchdog import Watchdog

# ============================================================================================
# What each rank finds on its own
# ============================================================================================

# What a rank reports as a usage error (exit 2) to the start-up agreement.
USAGE_ERRORS = (UsageError, ConfigError, DataError, CheckpointError, ValueError, RuntimeError)


@dataclass(frozen=True)
class Resumed:
    """The checkpoint of --resume, checked against this run, with its arrays read."""

    checkpoint: Checkpoint
    arrays: dict[str, np.ndarray]
    notes: list[str]  # warnings for rank 0 to print


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
    text_sha256: str  # of the training text, recorded in checkpoints
    resumed: Resumed | None
    contents: dict[str, str]  # each input file (by a label naming it) → SHA-256 as read


def configure(args: argparse.Namespace, world_size: int) -> Setup:
    """Turn flags into configs and check them, touching no other process.

    Problems that do not depend on each other (bad values, output paths, the layout, the
    data file, the checkpoint file) are all reported together; the checks that need a model
    configuration (the checkpoint against it) follow once those pass.
    """
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or preset["batch_size"]
    shape = {k: getattr(args, k) or v for k, v in preset.items() if k != "batch_size"}
    problems = check_values(args) + check_output_paths(args)
    dp, tp, pp = check_layout(args, world_size, batch_size, shape, problems)
    try:
        resolve_precision(args.precision, args.dtype)
    except ValueError as exc:
        problems.append(str(exc))
    if args.zero == 3 and args.precision != "fp32":
        problems.append(f"--zero 3 keeps the parameters it shards in the model's dtype, with no "
                        f"fp32 masters; it does not apply to --precision {args.precision}")
    if args.teacher and args.precision != "fp32":
        problems.append(f"--teacher computes the distillation loss in fp32; it does not "
                        f"apply to --precision {args.precision}")
    text, source = read_text(args, problems)
    ckpt = read_resume(args, problems)
    if problems:
        raise problems_error(problems)
    tokenizer = saved_vocabulary(ckpt) if ckpt else CharTokenizer.from_text(text)
    data = make_dataset(text, tokenizer, seq_len=shape["seq_len"], source=source)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, dropout=args.dropout, dtype=args.dtype,
                    **shape)
    tc = train_config(args, batch_size)
    if args.teacher:
        check_distillation(tc, cfg, tokenizer, tp, pp)
    digest = text_digest(text)
    contents = {f"--data {args.data}" if args.data else "the built-in corpus": digest}
    resumed = None
    if ckpt is not None:
        resumed = check_checkpoint(args, ckpt, cfg, tc, digest, source)
        contents[f"--resume {args.resume}"] = ckpt.digest
    return Setup(cfg, tc, dp, tp, pp, data, source, digest, resumed, contents)


def check_values(args: argparse.Namespace) -> list[str]:
    """Values argparse lets through that would fail (or silently do nothing) mid-run.

    Written so that NaN fails every test.
    """
    problems = [
        f"{flag} must be {rule}, got {value}" for flag, value, ok, rule in (
            ("--dropout", args.dropout, 0.0 <= args.dropout < 1.0, "in [0, 1)"),
            ("--temperature", args.temperature, 0 <= args.temperature < math.inf,
             "finite and >= 0"),
            ("--lr", args.lr, math.isfinite(args.lr), "finite"),
            ("--min-lr-ratio", args.min_lr_ratio, 0.0 <= args.min_lr_ratio <= 1.0,
             "in [0, 1]"),
            ("--weight-decay", args.weight_decay, 0.0 <= args.weight_decay < math.inf,
             "finite and >= 0"),
            ("--grad-clip", args.grad_clip, 0.0 <= args.grad_clip < math.inf,
             "finite and >= 0 (0 disables clipping)"),
            ("--momentum", args.momentum, 0.0 <= args.momentum < 1.0, "in [0, 1)"),
            ("--beta1", args.beta1, 0.0 <= args.beta1 < 1.0, "in [0, 1)"),
            ("--beta2", args.beta2, 0.0 <= args.beta2 < 1.0, "in [0, 1)"),
            ("--eps", args.eps, math.isfinite(args.eps), "finite"),
        ) if not ok
    ]
    if args.save_every and not args.save:
        problems.append(f"--save-every {args.save_every} needs --save DIR (where to write)")
    if args.zero and args.optimizer != "adamw":
        problems.append(f"--zero {args.zero} shards AdamW's state; it does not apply to "
                        f"--optimizer {args.optimizer}")
    return problems


def check_output_paths(args: argparse.Namespace) -> list[str]:
    """Output paths are checked now, not after training (`mpipar/outputs.py`: one rule)."""
    outputs = []
    if args.metrics:
        outputs.append(Output("--metrics", args.metrics))
    if args.trace:
        outputs.append(Output("--trace", args.trace,
                              companions=(os.path.splitext(args.trace)[0] + ".chrome.json",)))
    if args.profile:  # --profile FILE: the Chrome trace of every operation
        outputs.append(Output("--profile", args.profile))
    if args.save:
        outputs.append(Output("--save", args.save, is_checkpoint=True))
    if args.report:  # the metrics and trace go inside it unless given elsewhere
        inside = [name for name, given in ((METRICS_FILE, args.metrics), (TRACE_FILE, args.trace))
                  if not given]
        outputs.append(Output("--report", args.report, is_directory=True,
                              companions=tuple(os.path.join(args.report, n) for n in inside)))
    return output_problems(outputs, {"--data": args.data} if args.data else {})


def check_layout(args: argparse.Namespace, world_size: int, batch_size: int,
                 shape: dict[str, int], problems: list[str]) -> tuple[int, int, int]:
    """``(dp, tp, pp)``, appending every broken layout rule to ``problems``."""
    try:
        dp, tp, pp = resolve_sizes(world_size, args.dp, args.tp, args.pp)
        world_for_rules = world_size
    except ConfigError as exc:
        problems.append(str(exc))
        # Check the other rules as if the sizes were right (no second world-size line).
        dp, tp, pp = args.dp or 1, args.tp or 1, args.pp or 1
        world_for_rules = dp * tp * pp
    problems += layout_problems(
        world_for_rules, dp, tp, pp, batch_size=batch_size, microbatches=args.microbatches,
        n_layer=shape["n_layer"], n_head=shape["n_head"], d_model=shape["d_model"],
        virtual_stages=args.virtual_stages, schedule=args.schedule, zero=args.zero,
        sequence_parallel=args.sequence_parallel, seq_len=shape["seq_len"],
        allreduce=args.allreduce)
    return dp, tp, pp


def read_text(args: argparse.Namespace, problems: list[str]) -> tuple[str, str]:
    """``(text, where it comes from)``; a problem (and no text) if it cannot be read."""
    try:
        return (load_text(args.data), args.data) if args.data else default_corpus()
    except DataError as exc:
        problems.append(str(exc))
        return "", ""


def read_resume(args: argparse.Namespace, problems: list[str]) -> Checkpoint | None:
    """The --resume checkpoint's files, checked as files; a problem if they cannot be read."""
    if not args.resume:
        return None
    try:
        ckpt = read_checkpoint(args.resume)
        refuse_quantized(ckpt.meta, "--resume", args.resume)
        return ckpt
    except CheckpointError as exc:
        problems.append(str(exc))
        return None


def check_checkpoint(args: argparse.Namespace, ckpt: Checkpoint, cfg: GPTConfig,
                     tc: TrainConfig, digest: str, source: str) -> Resumed:
    """The checkpoint against this run (`mpipar/resume.py`), then its arrays, read."""
    check_resume(ckpt, cfg, tc, stop_at=args.stop_at)
    notes = [note for note in (check_training_text(ckpt, digest, source, args.allow_new_data),)
             if note is not None]
    changed = changed_settings(ckpt.meta.get("train", {}), tc.to_dict())
    if changed:
        notes.append("warning: resuming with training settings that differ from the "
                     f"checkpoint's ({changed}); the run will not continue exactly as it "
                     "would have")
    arrays = ckpt.arrays()
    check_step_count(ckpt, arrays)
    return Resumed(ckpt, arrays, notes)


def train_config(args: argparse.Namespace, batch_size: int) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed, optimizer=args.optimizer,
        momentum=args.momentum, beta1=args.beta1, beta2=args.beta2, eps=args.eps,
        precision=args.precision, eval_every=args.eval_every,
        eval_tokens=args.eval_tokens or EVAL_TOKENS[args.preset],
        log_every=args.log_every, microbatches=args.microbatches, schedule=args.schedule,
        virtual_stages=args.virtual_stages, zero=args.zero, bucket_mb=args.bucket_mb,
        overlap=not args.no_overlap, allreduce=args.allreduce,
        dp_strategy=args.dp_strategy.replace("-", "_"),
        sequence_parallel=args.sequence_parallel, recompute=args.recompute,
        teacher=args.teacher,
        distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature)


def read_flags(argv: list[str] | None,
               rank: int) -> tuple[argparse.Namespace | None, RankReport | None]:
    """``(flags, None)``, or ``(None, the report of a bad flag or of --help)``."""
    try:
        return parse_args(argv, rank), None
    except HelpRequested:
        return None, RankReport(HELP)
    except UsageError as exc:
        return None, RankReport(ERROR, str(exc))


def check_alone(args: argparse.Namespace, world_size: int) -> tuple[RankReport, Setup | None]:
    """This rank's report to the start-up agreement, and its setup if it found no problem."""
    try:
        backend.use_device(args.device)
        setup = configure(args, world_size)
    except USAGE_ERRORS as exc:
        return RankReport(ERROR, str(exc)), None
    config = {"--" + key.replace("_", "-"): value for key, value in vars(args).items()}
    return RankReport(config=config, contents=setup.contents), setup


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
    trainer = Trainer(s.cfg, s.tc, ProcessGrid.build(world, s.dp, s.tp, s.pp), s.data,
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
    run.say(f"mpipar | world {world.size} = dp {s.dp} × tp {s.tp} × pp {s.pp} | {s.source}")
    run.say(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
            f"seq_len {cfg.seq_len}, vocab {cfg.vocab_size}, {n_params:,} parameters, "
            f"{cfg.dtype}")
    run.say(f"training: {tc.steps} steps of {tc.batch_size} sequences "
            f"({tc.batch_size * cfg.seq_len} tokens), {tc.microbatches} microbatch(es), "
            f"{tc.optimizer} lr {tc.lr}"
            + (f", resuming at step {trainer.step}" if s.resumed is not None else ""))
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
