"""Train a tiny GPT on one process or many: ``mpirun -n N python train.py [--dp D --tp T --pp P]``.

Run ``python train.py --help`` for every flag. With no flags it trains the ``small`` preset
on the built-in corpus for about a minute. Exit codes: 0 ok; 2 bad usage or configuration
(every rank exits before any communication); 1 any other failure (the whole job ends).

Read top to bottom: the flags (:func:`build_parser`), what they resolve to on each rank alone
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
from mpipar.grid import (
    SCHEDULES,
    ZERO_STAGES,
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
from mpipar.trace import Tracer, load_jsonl, to_chrome_trace, write_jsonl
from mpipar.training import TrainConfig, Trainer

DEFAULT_PRESET = "small"
DEFAULT_STEPS = 400

# ============================================================================================
# The flags
# ============================================================================================


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends a flag's help with ``(default: X)``, unless there is no X to tell: no default
    (``None``), an off switch (``False``), or a help text that states its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="train.py",
        description="Train a GPT-2 style character model with data, tensor and pipeline "
                    "parallelism written out with MPI. World size must equal dp × tp × pp.",
        epilog="Examples:  python train.py   |   mpirun -n 4 python train.py --dp 4   |   "
               "mpirun -n 4 python train.py --tp 2 --dp 2 --dtype float64",
        formatter_class=HelpFormatter,
    )
    add_layout_flags(ap.add_argument_group("layout"))
    add_model_flags(ap.add_argument_group("model (a preset, then explicit flags override it)"))
    add_training_flags(ap.add_argument_group("training"))
    add_parallelism_flags(ap.add_argument_group("parallelism"))
    add_output_flags(ap.add_argument_group("output"))
    return ap


def add_layout_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--dp", type=positive_int,
                   help="data-parallel size: replicas that each train on a slice of the batch "
                        "(default: N/(tp·pp))")
    g.add_argument("--tp", type=positive_int,
                   help="tensor-parallel size: ranks that split every layer's matrices "
                        "(default: 1)")
    g.add_argument("--pp", type=positive_int,
                   help="pipeline-parallel size: stages that each hold consecutive layers "
                        "(default: 1)")


def add_model_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="model shape and batch size to start from")
    preset = " (default: the preset's)"
    g.add_argument("--n-layer", type=positive_int, help="transformer blocks" + preset)
    g.add_argument("--n-head", type=positive_int, help="attention heads" + preset)
    g.add_argument("--d-model", type=positive_int, help="width of the residual stream" + preset)
    g.add_argument("--seq-len", type=positive_int, help="context length in characters" + preset)
    g.add_argument("--dropout", type=float, default=0.0,
                   help="dropout probability on attention weights, residual branches and "
                        "embeddings")


def add_training_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                   help="optimizer steps, the length of the learning-rate schedule")
    g.add_argument("--batch-size", type=positive_int,
                   help="global batch in sequences (default: the preset's)")
    g.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final learning rate as a fraction of --lr (cosine decay)")
    g.add_argument("--warmup-steps", type=non_negative_int, default=20,
                   help="steps of linear warmup up to --lr")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="decoupled weight decay (AdamW: of matrices and embeddings only)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global norm; 0 disables")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="update rule")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--seed", type=non_negative_int, default=1337,
                   help="seed of the initial weights, the batches and the dropout masks")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="parameter and activation type; float64 makes layouts comparable "
                        "to ~1e-10")
    g.add_argument("--eval-every", type=non_negative_int, default=100,
                   help="validate every K steps and at the end; 0: only at the end")
    g.add_argument("--eval-batches", type=positive_int, default=4,
                   help="validation batches per evaluation")
    g.add_argument("--log-every", type=positive_int, default=25,
                   help="print a progress line every K steps")
    g.add_argument("--data", metavar="FILE",
                   help="UTF-8 text to train on (default: the built-in corpus)")


def add_parallelism_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--microbatches", type=positive_int, default=1,
                   help="microbatches per step on each data-parallel rank (gradient "
                        "accumulation; what a pipeline keeps in flight)")
    g.add_argument("--schedule", choices=SCHEDULES, default="1f1b",
                   help="pipeline schedule")
    g.add_argument("--virtual-stages", type=positive_int, default=1,
                   help="model chunks per pipeline rank (--schedule interleaved)")
    g.add_argument("--zero", type=int, choices=ZERO_STAGES, default=0,
                   help="ZeRO stage: 1 shards AdamW's state over dp, 2 its gradients too")
    g.add_argument("--dp-strategy", choices=["per-param", "flat", "bucketed"],
                   default="bucketed", help="how data parallelism all-reduces gradients")
    g.add_argument("--bucket-mb", type=positive_float, default=1.0,
                   help="gradient bucket size in MiB (--dp-strategy bucketed)")
    g.add_argument("--no-overlap", action="store_true",
                   help="all-reduce buckets after backward instead of during it")
    g.add_argument("--allreduce", choices=["mpi", "ring"], default="mpi",
                   help="data-parallel all-reduce: MPI's, or the ring written out in mpipar")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split LayerNorm and dropout work along the sequence over tp ranks")


def add_output_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--metrics", metavar="FILE", help="JSON lines of metrics (rank 0)")
    g.add_argument("--trace", metavar="FILE",
                   help="communication trace, JSON lines (and a Chrome trace beside it)")
    g.add_argument("--save", metavar="DIR", help="write a checkpoint at the end")
    g.add_argument("--stop-at", type=positive_int, metavar="STEP",
                   help="stop after STEP steps, as if interrupted (the learning-rate schedule "
                        "still follows --steps); resume later with --resume")
    g.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint (saved in any layout)")
    g.add_argument("--sample", type=non_negative_int, default=0, metavar="N",
                   help="print N generated characters at the end")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature of --sample; 0 takes the likeliest character")
    g.add_argument("--top-k", type=positive_int, metavar="K",
                   help="sample among the K likeliest characters only (default: all)")
    g.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="cpu computes with numpy, gpu with cupy")
    g.add_argument("--quiet", action="store_true", help="print only the final summary")


def launcher_rank() -> int:
    """This process's rank as the MPI launcher announced it (read before MPI starts)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags. Under mpirun only rank 0 prints help or a bad flag; every rank exits."""
    parser = build_parser()
    # A bad flag is reported in one line that names it and its value, like every other usage
    # error, rather than after the whole usage block (--help shows that).
    parser.print_usage = lambda file=None: None
    if launcher_rank() != 0:
        parser.error = lambda message: sys.exit(2)
        parser.print_help = lambda file=None: None  # --help then exits 0, silently
    return parser.parse_args(argv)


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
    if shape["d_model"] % shape["n_head"]:  # the model's own rule, said in terms of its flags
        raise UsageError(f"--n-head {shape['n_head']} does not divide --d-model "
                         f"{shape['d_model']}")
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
    text, source = (load_text(args.data), args.data) if args.data else default_corpus()
    tokenizer = (CharTokenizer.from_chars(resumed[1].get("tokenizer", [])) if resumed
                 else CharTokenizer.from_text(text))
    data = make_dataset(text, tokenizer, seq_len=shape["seq_len"], source=source)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, dropout=args.dropout, dtype=args.dtype,
                    **shape)
    tc = train_config(args, batch_size)
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
    for flag, path in (("--metrics", args.metrics), ("--trace", args.trace)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(path) or ".")):
            raise UsageError(f"{flag} {path}: not a file in an existing directory")
    if args.save and os.path.exists(args.save) and not (
            os.path.isdir(args.save) and set(os.listdir(args.save)) <= {STATE_FILE, META_FILE}):
        raise UsageError(f"--save {args.save} exists and is not a checkpoint directory; "
                         "refusing to replace it")


def train_config(args: argparse.Namespace, batch_size: int) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed, optimizer=args.optimizer,
        momentum=args.momentum, eval_every=args.eval_every, eval_batches=args.eval_batches,
        log_every=args.log_every, microbatches=args.microbatches, schedule=args.schedule,
        virtual_stages=args.virtual_stages, zero=args.zero, bucket_mb=args.bucket_mb,
        overlap=not args.no_overlap, allreduce=args.allreduce,
        dp_strategy=args.dp_strategy.replace("-", "_"),
        sequence_parallel=args.sequence_parallel)


def connect(setup: Setup, rank: int) -> Comm:
    """The world communicator, once every rank agrees on the run (else ConfigError)."""
    world = Comm.world(Tracer(rank, enabled=True))
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
    pipeline = gather_pipeline_report(run)
    if run.args.trace:
        write_trace(run)
    if world.rank == 0:
        table = format_comm_summary(all_totals, sum(run.step_times))
        if table is not None:
            run.show(table)
        summary = summary_record(run, all_totals, peaks)
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
        world = connect(setup, rank)
    except ConfigError as exc:  # raised on every rank alike
        return usage_error(exc, rank)
    run = start(args, setup, world)
    loop(run)
    finish(run)
    report(run)
    return 0


def usage_error(exc: Exception, rank: int) -> int:
    """Exit code 2, with the one-line reason printed once (by rank 0)."""
    if rank == 0:
        print(f"train.py: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
