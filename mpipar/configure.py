"""What each rank finds on its own, before any communication: flags → checked configs.

`train.py` parses the flags on every rank; :func:`check_alone` then turns them into a
:class:`Setup` (model and training configs, the layout, the data, a checked checkpoint to
resume from) or into the usage error this rank reports to the start-up agreement
(`mpipar/agreement.py`). Independent problems are collected and reported together, each
quoting the numbers (docs/design.md §2, §7).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import numpy as np

from mpipar import backend
from mpipar.agreement import ERROR, HELP, RankReport
from mpipar.checkpoint import Checkpoint, CheckpointError, read_checkpoint
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
from mpipar.grid import ConfigError, layout_problems, problems_error, resolve_sizes
from mpipar.model import PRESETS, GPTConfig
from mpipar.outputs import Output, output_problems
from mpipar.precision import resolve_precision
from mpipar.quantize import refuse_quantized
from mpipar.report import METRICS_FILE, TRACE_FILE
from mpipar.resume import (
    changed_settings,
    check_resume,
    check_step_count,
    check_training_text,
    saved_vocabulary,
)
from mpipar.training import EVAL_TOKENS, TrainConfig

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
    cp: int = 1  # context parallelism: ranks sharing each sequence


def configure(args: argparse.Namespace, world_size: int) -> Setup:
    """Turn flags into configs and check them, touching no other process.

    Problems that do not depend on each other (bad values, output paths, the layout, the
    data file, the checkpoint file) are all reported together; the checks that need a model
    configuration (the checkpoint against it) follow once those pass.
    """
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or preset["batch_size"]
    shape = {k: getattr(args, k) or v for k, v in preset.items() if k != "batch_size"}
    problems = check_values(args) + check_output_paths(args) + check_context_parallel(args)
    dp, tp, pp = check_layout(args, world_size, batch_size, shape, problems)
    try:
        resolve_precision(args.precision, args.dtype)
    except ValueError as exc:
        problems.append(str(exc))
    if args.zero == 3 and args.precision != "fp32":
        problems.append(f"--zero 3 keeps the parameters it shards in the model's dtype, with no "
                        f"fp32 masters; it does not apply to --precision {args.precision}")
    problems += zero_bubble_problems(args, pp)
    if args.teacher and args.precision != "fp32":
        problems.append(f"--teacher computes the distillation loss in fp32; it does not "
                        f"apply to --precision {args.precision}")
    problems += expert_problems(args, dp, tp, pp)
    text, source = read_text(args, problems)
    ckpt = read_resume(args, problems)
    if problems:
        raise problems_error(problems)
    tokenizer = saved_vocabulary(ckpt) if ckpt else CharTokenizer.from_text(text)
    data = make_dataset(text, tokenizer, seq_len=shape["seq_len"], source=source)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, dropout=args.dropout, dtype=args.dtype,
                    n_expert=args.experts, moe_top_k=args.moe_top_k,
                    capacity_factor=args.capacity_factor, aux_loss_coef=args.aux_loss_coef,
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
    return Setup(cfg, tc, dp, tp, pp, data, source, digest, resumed, contents, args.cp)


def check_context_parallel(args: argparse.Namespace) -> list[str]:
    """What ``--cp`` > 1 does not combine with: its ring attention has no dropout, computes
    in --dtype (fp32 precision only), and the model it trains generates no samples (a KV
    cache of a split sequence); distillation's teacher sees whole sequences."""
    if args.cp == 1:
        return []
    refused = [(args.dropout > 0, f"--dropout {args.dropout}"),
               (args.precision != "fp32", f"--precision {args.precision}"),
               (args.sample > 0, f"--sample {args.sample}"),
               (bool(args.teacher), "--teacher")]
    problems = [f"--cp {args.cp} does not combine with {flag} (ring attention has no dropout, "
                f"16-bit arithmetic, KV cache or teacher)" for bad, flag in refused if bad]
    if args.experts > 0:
        problems.append(f"--cp {args.cp} does not combine with --experts {args.experts} (an "
                        f"expert's capacity is counted per whole sequence, split over cp ranks)")
    return problems


def zero_bubble_problems(args: argparse.Namespace, pp: int) -> list[str]:
    """What --schedule zb-h1 does not take (see `schedules.zero_bubble_h1`), one line each."""
    if args.schedule != "zb-h1" or pp == 1:  # one stage runs no schedule
        return []
    problems = []
    if args.microbatches < pp:
        problems.append(f"--schedule zb-h1 needs --microbatches >= --pp: got --microbatches "
                        f"{args.microbatches} < --pp {pp} (with fewer the pipe never fills)")
    if args.zero == 3:
        problems.append("--schedule zb-h1 does not take --zero 3: a W runs after its block's "
                        "gathered parameters have been overwritten by other blocks' gathers")
    return problems


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


def expert_problems(args: argparse.Namespace, dp: int, tp: int, pp: int) -> list[str]:
    """The rules of a mixture of experts and of expert parallelism (docs/design.md §13)."""
    e, k, ep = args.experts, args.moe_top_k, args.ep
    if not e:
        return [f"--ep {ep} splits experts between ranks; it needs --experts E"] if ep > 1 else []
    rules = [
        (k <= e, f"--moe-top-k {k} exceeds --experts {e}"),
        (e % ep == 0, f"--ep {ep} does not divide --experts {e} (each rank holds E/P experts)"),
        (dp % ep == 0, f"--ep {ep} does not divide the data-parallel size {dp} (the ep group "
                       "is a part of the dp group)"),
        (tp == 1, f"--experts does not combine with --tp {tp} (the experts are not split "
                  "between tensor-parallel ranks)"),
        (not args.sequence_parallel, "--experts does not combine with --sequence-parallel"),
        (ep == 1 or args.zero == 0, f"--ep {ep} does not combine with --zero {args.zero}"),
        (ep == 1 or pp == 1, f"--ep {ep} does not combine with --pp {pp}"),
        (args.recompute != "full", "--experts does not combine with --recompute full (the "
                                   "routing would run, and be counted, twice)"),
        (args.precision == "fp32", f"--experts computes in --dtype; it does not apply to "
                                   f"--precision {args.precision}"),
    ]
    return [message for ok, message in rules if not ok]


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
        dp, tp, pp = resolve_sizes(world_size, args.dp, args.tp, args.pp, args.cp)
        world_for_rules = world_size
    except ConfigError as exc:
        problems.append(str(exc))
        # Check the other rules as if the sizes were right (no second world-size line).
        dp, tp, pp = args.dp or 1, args.tp or 1, args.pp or 1
        world_for_rules = dp * tp * pp * args.cp
    problems += layout_problems(
        world_for_rules, dp, tp, pp, batch_size=batch_size, microbatches=args.microbatches,
        n_layer=shape["n_layer"], n_head=shape["n_head"], d_model=shape["d_model"],
        virtual_stages=args.virtual_stages, schedule=args.schedule, zero=args.zero,
        sequence_parallel=args.sequence_parallel, seq_len=shape["seq_len"],
        allreduce=args.allreduce, cp=args.cp)
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
        log_every=args.log_every, microbatches=args.microbatches, ep=args.ep,
        schedule=args.schedule,
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
