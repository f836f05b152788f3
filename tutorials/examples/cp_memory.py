"""Activation memory per rank with context parallelism, measured: ``mpirun -n C python ...``.

    mpirun -n 2 python tutorials/examples/cp_memory.py [--preset tiny]

Every rank builds the preset's model (float64) on a cp group of all C ranks and, for the
same batch, the 1-process model. For each recomputation mode it counts the bytes the blocks
keep for backward (`mpipar.activations.layer_activation_bytes`: the arrays each block's graph
saves) on this rank's T/C tokens, and on all T tokens in one process, and prints both and
their ratio. Rank 0 prints; every rank measures (the ring needs them all).
"""

from __future__ import annotations

import argparse

from mpipar import threads  # noqa: F401  (one BLAS thread per rank, before numpy)
from mpipar.activations import layer_activation_bytes
from mpipar.comm import Comm
from mpipar.data import CharTokenizer, default_corpus, get_batch, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import PRESETS, GPTConfig, build_model
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    args = ap.parse_args()
    world = Comm.world(Tracer(0))
    preset = dict(PRESETS[args.preset])
    batch = preset.pop("batch_size")
    text, _ = default_corpus()
    tok = CharTokenizer.from_text(text)
    cfg = GPTConfig(vocab_size=tok.vocab_size, dtype="float64", **preset)
    data = make_dataset(text, tok, seq_len=cfg.seq_len)
    grid = ProcessGrid.build(world, 1, 1, 1, cp=world.size)
    trainer = Trainer(cfg, TrainConfig(batch_size=batch), grid, data, world.tracer)
    model, serial = trainer.chunks[0], build_model(cfg, 1337)
    x, _ = get_batch(data.train, batch, cfg.seq_len, 1337, 0)
    local = trainer.layers.context.shard(x) if world.size > 1 else x
    if world.rank == 0:
        print(f"{args.preset}: batch {batch} × seq_len {cfg.seq_len}, cp {world.size}: "
              f"{local.shape[1]} tokens per sequence on each rank")
    for mode in ("none", "selective"):
        model.set_recompute(mode)
        serial.set_recompute(mode)
        mine = sum(layer_activation_bytes(model, local))
        one = sum(layer_activation_bytes(serial, x))
        if world.rank == 0:
            print(f"recompute {mode:9s}: {mine:>10,} bytes per rank, {one:>10,} in one "
                  f"process, ratio {mine / one:.3f}")


if __name__ == "__main__":
    main()
