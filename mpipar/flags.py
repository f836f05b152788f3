"""The flags of ``train.py``: every option with its help line, grouped as ``--help`` shows them.

Each flag's type check lives here (a negative ``--steps`` is refused while parsing); rules
that involve several flags (the layout, divisibility, output paths) are checked once the
configuration is assembled (`train.py`'s ``configure``, `mpipar.grid.layout_problems`,
`mpipar.outputs`). No flag ends a process on its own: a bad one raises :class:`UsageError`
for the start-up agreement of all ranks (`mpipar.agreement`).
The schedule names and ZeRO stages come from `mpipar.grid`, their one source.
"""

from __future__ import annotations

import argparse

from mpipar.grid import SCHEDULES, ZERO_STAGES
from mpipar.model import PRESETS, RECOMPUTE_MODES
from mpipar.precision import PRECISIONS
from mpipar.training import EVAL_TOKENS
from mpipar.watchdog import FACTOR, FLOOR_S, STARTUP_LIMIT_S, TIMED_STEPS

DEFAULT_PRESET = "small"
DEFAULT_STEPS = 400


class UsageError(ValueError):
    """A bad flag or combination of flags (exit code 2)."""


class HelpRequested(Exception):
    """``--help`` was given (and printed, on rank 0)."""


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


class Replaced(argparse.Action):
    """A flag that no longer exists: exit 2 naming the one that replaced it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} was replaced by --eval-tokens N, the validation sample "
                     "in tokens (N = batches × --batch-size × --seq-len)")


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
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
    add_distillation_flags(ap.add_argument_group("distillation (mpipar/distill.py)"))
    add_expert_flags(ap.add_argument_group(
        "mixture of experts (mpipar/moe.py, mpipar/parallel/expert_parallel.py)"))
    add_output_flags(ap.add_argument_group(
        "output", "Every output's directory must already exist; each path is checked (a file "
                  "is created there and removed) before the first step."))
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
    g.add_argument("--cp", type=positive_int, default=1,
                   help="context-parallel size: ranks that split every sequence (two of 2·cp "
                        "chunks each) and compute attention as a ring (default: 1)")


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
                   help="decoupled weight decay, the same rule for AdamW and SGD: weight "
                        "matrices and embeddings decay, biases and LayerNorm gains do not")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global norm; 0 disables")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="update rule")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--beta1", type=float, default=0.9,
                   help="AdamW's decay of the first moment (the mean gradient)")
    g.add_argument("--beta2", type=float, default=0.95,
                   help="AdamW's decay of the second moment (the mean squared gradient)")
    g.add_argument("--eps", type=positive_float, default=1e-8,
                   help="AdamW's ε, added to √v̂ in the update's denominator")
    g.add_argument("--seed", type=non_negative_int, default=1337,
                   help="seed of the initial weights, the batches and the dropout masks")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="parameter and activation type; float64 makes layouts comparable "
                        "to ~1e-10")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="compute precision: fp16 or bf16 run the model in 16 bits on "
                        "float32 master weights (fp16 with dynamic loss scaling); needs "
                        "--dtype float32")
    g.add_argument("--eval-every", type=non_negative_int, default=100,
                   help="validate every K steps and at the end; 0: only at the end")
    g.add_argument("--eval-tokens", type=positive_int,
                   help="size of the fixed validation sample, in tokens, rounded up to whole "
                        "batches (default: the preset's: " + ", ".join(
                            f"{k} {v:,}" for k, v in EVAL_TOKENS.items()) + ")")
    g.add_argument("--eval-batches", action=Replaced, help=argparse.SUPPRESS)
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
                   help="ZeRO stage: 1 shards AdamW's state over dp, 2 its gradients too, 3 "
                        "the parameters too (each block gathered around its use)")
    g.add_argument("--dp-strategy", choices=["per-param", "flat", "bucketed"],
                   default="bucketed", help="how data parallelism all-reduces gradients")
    g.add_argument("--bucket-mb", type=positive_float, default=1.0,
                   help="gradient bucket size in MiB (--dp-strategy bucketed)")
    g.add_argument("--no-overlap", action="store_true",
                   help="all-reduce buckets after backward instead of during it (--zero 3: "
                        "gather each block when it runs, not during the one before)")
    g.add_argument("--allreduce", choices=["mpi", "ring"], default="mpi",
                   help="data-parallel all-reduce: MPI's, or the ring written out in mpipar")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split LayerNorm and dropout work along the sequence over tp ranks")
    g.add_argument("--timeout", type=non_negative_float, metavar="SECONDS",
                   help="watchdog: end the job (exit 1) when a rank makes no progress (no "
                        "step finished, no communication call returned) for SECONDS; 0 "
                        f"disables it (default: {STARTUP_LIMIT_S:g} until {TIMED_STEPS} steps "
                        f"have run, then max({FLOOR_S:g}, {FACTOR:g} × the slowest of them))")
    g.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none",
                   help="what a block keeps for backward: everything; all but the attention "
                        "core, recomputed (selective); only its input, the block recomputed "
                        "(full). The numbers are the same")


def add_distillation_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--teacher", metavar="DIR",
                   help="checkpoint of a trained model to distil from (same vocabulary); "
                        "needs --tp 1 --pp 1")
    g.add_argument("--distill-alpha", type=float, default=0.5, metavar="A",
                   help="weight of the teacher's term: (1 − A)·CE + A·T²·KL (with --teacher)")
    g.add_argument("--distill-temperature", type=float, default=2.0, metavar="T",
                   help="softens the teacher's and the student's distributions (with --teacher)")


def add_expert_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--experts", type=non_negative_int, default=0, metavar="E",
                   help="replace each block's MLP by a mixture of E expert MLPs with a "
                        "router; 0 keeps the dense MLP")
    g.add_argument("--moe-top-k", type=positive_int, default=2, metavar="K",
                   help="experts each token is sent to; K > 1 renormalises the K gates to "
                        "sum to 1 (--top-k is the sampling flag)")
    g.add_argument("--capacity-factor", type=positive_float, default=1.25, metavar="CF",
                   help="each expert takes at most ceil(CF · seq_len · K / E) assignments "
                        "per sequence; the rest are dropped (add 0)")
    g.add_argument("--aux-loss-coef", type=non_negative_float, default=0.01, metavar="A",
                   help="weight of the load-balancing loss E · Σ_e f_e · P_e per layer "
                        "(reported as aux_loss, not part of loss)")
    g.add_argument("--ep", type=positive_int, default=1, metavar="P",
                   help="expert-parallel size: the experts are split between P ranks of the "
                        "data-parallel group (P divides dp and E), tokens move by all-to-all")


def add_output_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--metrics", metavar="FILE", help="JSON lines of metrics (rank 0)")
    g.add_argument("--trace", metavar="FILE",
                   help="communication trace, JSON lines (and a Chrome trace beside it)")
    g.add_argument("--profile", nargs="?", const="", metavar="FILE",
                   help="after training, print the time per operation and direction of a step "
                        "on each rank (mpipar/profile.py); with FILE, also write every "
                        "operation into a Chrome/Perfetto trace FILE")
    g.add_argument("--report", metavar="DIR",
                   help="write the metrics, the trace and one self-contained HTML page of "
                        "the run (DIR/report.html) into DIR")
    g.add_argument("--save", metavar="DIR", help="write a checkpoint at the end")
    g.add_argument("--save-every", type=positive_int, metavar="K",
                   help="also write the --save checkpoint every K steps, each replacing the "
                        "previous one atomically (only the latest is kept)")
    g.add_argument("--stop-at", type=positive_int, metavar="STEP",
                   help="stop after STEP steps, as if interrupted (the learning-rate schedule "
                        "still follows --steps); resume later with --resume")
    g.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint (saved in any layout)")
    g.add_argument("--allow-new-data", action="store_true",
                   help="resume although the training text is not the one the checkpoint "
                        "was trained on (refused otherwise)")
    g.add_argument("--sample", type=non_negative_int, default=0, metavar="N",
                   help="print N generated characters at the end")
    g.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature of --sample; 0 takes the likeliest character")
    g.add_argument("--top-k", type=positive_int, metavar="K",
                   help="sample among the K likeliest characters only (default: all)")
    g.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="cpu computes with numpy, gpu with cupy")
    g.add_argument("--quiet", action="store_true", help="print only the final summary")


def parse_args(argv: list[str] | None, rank: int = 0) -> argparse.Namespace:
    """The flags. A bad flag raises :class:`UsageError`, ``--help`` :class:`HelpRequested`
    (after printing the help, on rank 0 only), so that no rank exits on its own: every rank
    reports to the start-up agreement first (`mpipar.agreement`)."""
    parser = build_parser()

    def error(message: str) -> None:
        raise UsageError(message)

    def leave(status: int = 0, message: str | None = None) -> None:
        raise HelpRequested  # argparse exits this way only after printing --help

    parser.error, parser.exit = error, leave
    if rank != 0:
        parser.print_help = lambda file=None: None
    return parser.parse_args(argv)
