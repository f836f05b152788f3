"""What ``python -m mpipar.generate`` and ``python -m mpipar.evaluate`` share: the layout flags,
the checks made before any process talks to another, starting MPI, and the trace file.

Both commands follow ``train.py``'s contract (docs/design.md §7): every rank reads the same
flags and checkpoint and checks them alone, so a bad flag or file makes every rank exit 2 with
one line (printed once, by rank 0) before any communication; the ranks then confirm they were
started alike (`check_same_config`), and an exception after that ends the whole job (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mpipar import backend
from mpipar.comm import Comm, install_excepthook, world_size_and_rank
from mpipar.flags import positive_int
from mpipar.grid import ConfigError, ProcessGrid, check_same_config, resolve_sizes, validate_layout
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


def parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse flags; under mpirun only rank 0 prints an error (every rank exits 2)."""
    ap.print_usage = lambda file=None: None  # one-line errors, like every other usage error
    if world_size_and_rank()[1] != 0:
        ap.error = lambda message: sys.exit(2)
        ap.print_help = lambda file=None: None
    return ap.parse_args(argv)


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


def start(args: argparse.Namespace, sizes: tuple[int, int, int], loaded: LoadedCheckpoint,
          config: dict[str, Any]) -> InferenceModel:
    """Start MPI, agree on the run, and build this rank's part of the loaded model."""
    backend.use_device(args.device)
    rank = world_size_and_rank()[1]
    world = Comm.world(Tracer(rank, enabled=bool(args.trace)))
    install_excepthook(world)
    check_same_config(world, {"argv": sys.argv[1:], **config})
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


def usage_error(prog: str, exc: BaseException) -> int:
    """Exit code 2, the reason printed once (by rank 0)."""
    if world_size_and_rank()[1] == 0:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


__all__ = ["UsageError", "add_layout_flags", "check_layout", "parse", "start", "usage_error",
           "write_trace"]
