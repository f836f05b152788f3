"""The flags of ``train.py``: every option with its help line, grouped as ``--help`` shows them.

Each flag's type check lives here (a negative ``--steps`` is refused while parsing); rules
that involve several flags (the layout, divisibility, output paths) are checked once the
configuration is assembled (`train.py`'s ``configure`` and `mpipar.grid.validate_layout`).
The schedule names and ZeRO stages come from `mpipar.grid`, their one source.
"""

from __future__ import annotations

import argparse
import os
import sys

from mpipar.grid import SCHEDULES, ZERO_STAGES
from mpipar.model import PRESETS
from mpipar.training import EVAL_TOKENS

DEFAULT_PRESET = "small"
DEFAULT_STEPS = 400

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


def add_distillation_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--teacher", metavar="DIR",
                   help="checkpoint of a trained model to distil from (same vocabulary); "
                        "needs --tp 1 --pp 1")
    g.add_argument("--distill-alpha", type=float, default=0.5, metavar="A",
                   help="weight of the teacher's term: (1 − A)·CE + A·T²·KL (with --teacher)")
    g.add_argument("--distill-temperature", type=float, default=2.0, metavar="T",
                   help="softens the teacher's and the student's distributions (with --teacher)")


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
