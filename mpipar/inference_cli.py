"""What ``python -m mpipar.generate`` and ``python -m mpipar.evaluate`` share: the layout flags,
the checks made before any process talks to another, starting MPI, and the trace file.

Both commands follow ``train.py``'s contract (docs/design.md §7): every rank reads its flags
and the checkpoint and checks them alone, then all ranks meet once in the start-up agreement
(`mpipar/agreement.py`, :func:`meet`): a problem found by any rank, or ranks started with
different flags, makes every rank exit 2, rank 0 printing why, before any other message. An
exception after that ends the whole job (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mpipar.agreement import ERROR, HELP, RankReport, agree
from mpipar.comm import Comm, install_excepthook, world_size_and_rank
from mpipar.flags import positive_int
from mpipar.grid import ConfigError, ProcessGrid, resolve_sizes, validate_layout
from mpipar.inference import InferenceModel, LoadedCheckpoint
from mpipar.trace import Tracer, to_chrome_trace, write_jsonl


class UsageError(ValueError):
    """Bad flags or inputs: exit code 2 with the one-line message."""


def add_layout_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("layout (world size = dp × tp × pp)")
    g.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel size: ranks that split every layer (default: 1)")
    g.add_argument("--pp", type=positive_int, default=1,
                   help="pipeline size: stages that each hold consecutive layers (default: 1)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split LayerNorm work along the sequence over tp ranks where tp "
                        "divides a pass's length (a one-token decode step never splits)")
    g.add_argument("--int8", action="store_true",
                   help="round every weight matrix to int8 (one scale per output channel) "
                        "after loading, each rank its own shard")
    g.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="cpu computes with numpy, gpu with cupy (default: cpu)")
    g.add_argument("--trace", metavar="FILE",
                   help="communication trace, JSON lines (and a Chrome trace beside it)")


def parse(ap: argparse.ArgumentParser,
          argv: list[str] | None) -> tuple[argparse.Namespace | None, RankReport | None]:
    """``(flags, None)``, or ``(None, this rank's report of a bad flag or of --help)``.

    Nothing is printed here: rank 0 prints --help (when every rank was asked for it) or the
    verdict of the start-up agreement.
    """
    errors: list[str] = []
    ap.print_usage = lambda file=None: None
    ap.error = lambda message: (errors.append(message), sys.exit(2))
    printed_help = ap.print_help
    ap.print_help = lambda file=None: None
    try:
        return ap.parse_args(argv), None
    except SystemExit:
        if errors:
            return None, RankReport(ERROR, errors[0])
        if world_size_and_rank()[1] == 0:
            printed_help()
        return None, RankReport(HELP)


def check_layout(args: argparse.Namespace, loaded: LoadedCheckpoint, *, batch_size: int,
                 allow_dp: bool) -> tuple[int, int, int]:
    """(dp, tp, pp) for this world size, or ConfigError naming the flags and numbers."""
    world_size = world_size_and_rank()[0]
    dp, tp, pp = resolve_sizes(world_size, None, args.tp, args.pp)
    if dp > 1 and not allow_dp:
        raise ConfigError(f"generation runs one copy of the model: world size {world_size} "
                          f"must equal --tp {tp} × --pp {pp} = {tp * pp}")
    cfg = loaded.cfg
    validate_layout(world_size, dp, tp, pp, batch_size=batch_size, microbatches=1,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                    sequence_parallel=args.sequence_parallel, seq_len=cfg.seq_len)
    if args.trace and (os.path.isdir(args.trace)
                       or not os.path.isdir(os.path.dirname(args.trace) or ".")):
        raise UsageError(f"--trace {args.trace}: not a file in an existing directory")
    return dp, tp, pp


def meet(prog: str, args: argparse.Namespace | None,
         found: RankReport) -> tuple[Comm, int | None]:
    """Start MPI and hold the start-up agreement: ``(world, None)`` to go on, or ``(world,
    the exit code every rank returns)``, rank 0 having printed why."""
    rank = world_size_and_rank()[1]
    world = Comm.world(Tracer(rank, enabled=bool(args is not None and args.trace)))
    install_excepthook(world)
    verdict = agree(world, found)  # every rank, whatever it found
    if verdict.exit_code is not None and rank == 0 and verdict.message:
        print(f"{prog}: error: {verdict.message}", file=sys.stderr)
    return world, verdict.exit_code


def found_ok(args: argparse.Namespace, config: dict[str, Any]) -> RankReport:
    """The report of a rank whose checks passed: its flags and what it read, to compare."""
    flags = {"--" + key.replace("_", "-"): value for key, value in vars(args).items()}
    return RankReport(config={**flags, **config})


def build(world: Comm, args: argparse.Namespace, sizes: tuple[int, int, int],
          loaded: LoadedCheckpoint) -> InferenceModel:
    """This rank's part of the loaded model: its tp shard of its pipeline stage."""
    grid = ProcessGrid.build(world, *sizes)
    model = InferenceModel(loaded.cfg, grid, sequence_parallel=args.sequence_parallel)
    model.load(loaded.state)
    if args.int8:
        model.quantize_int8()
    return model


def write_trace(world: Comm, path: str) -> None:
    """Every rank's records, in rank order, into ``path`` (and ``.chrome.json`` beside it)."""
    gathered = world.gather_object(world.tracer.records)
    if world.rank == 0:
        records = [r for rank_records in gathered for r in rank_records]
        write_jsonl(path, records)
        with open(os.path.splitext(path)[0] + ".chrome.json", "w", encoding="utf-8") as f:
            json.dump(to_chrome_trace(records), f)


__all__ = ["UsageError", "add_layout_flags", "build", "check_layout", "found_ok", "meet",
           "parse", "write_trace"]
