"""Dynamic loss scaling from too large a start: watch the scale come down, one skip at a time.

    [mpirun -n N] python tutorials/examples/loss_scaling.py [--scale S] [--steps K]
        [--dp D --tp T --pp P]

Trains the ``tiny`` preset in fp16 on the built-in corpus with the loss scale starting at S
(default 2**20, sixteen times ``train.py``'s start), and prints one line per step: the scale
the loss was multiplied by, the ranks whose own gradients held an inf (each rank checks
only its gradients), whether the step was skipped, and the loss. With pp or tp > 1 the ranks
hold different gradients, so one may overflow alone; the skip is decided by the all-reduce
of `mpipar.precision.overflow_anywhere`, and every rank's line is the same.
"""

from __future__ import annotations

import argparse

from mpipar.comm import Comm
from mpipar.data import CharTokenizer, default_corpus, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import PRESETS, GPTConfig
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer


def build(world: Comm, dp: int, tp: int, pp: int, steps: int) -> Trainer:
    text, _ = default_corpus()
    tok = CharTokenizer.from_text(text)
    shape = dict(PRESETS["tiny"])
    batch = shape.pop("batch_size")
    cfg = GPTConfig(vocab_size=tok.vocab_size, **shape)
    tc = TrainConfig(steps=steps, batch_size=batch, eval_every=0, precision="fp16",
                     microbatches=pp)
    return Trainer(cfg, tc, ProcessGrid.build(world, dp, tp, pp),
                   make_dataset(text, tok, seq_len=cfg.seq_len), world.tracer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=2.0**20)
    ap.add_argument("--steps", type=int, default=8)
    for flag in ("--dp", "--tp", "--pp"):
        ap.add_argument(flag, type=int, default=1)
    args = ap.parse_args()
    world = Comm.world(Tracer(0))
    trainer = build(world, args.dp, args.tp, args.pp, args.steps)
    trainer.scaler.scale = args.scale
    unscale, local = trainer.optimizer.unscale, {}

    def unscale_and_note(scale: float, check: bool = True) -> bool:
        local["finite"] = unscale(scale, check)  # this rank's own verdict, before the vote
        return local["finite"]

    trainer.optimizer.unscale = unscale_and_note
    if world.rank == 0:
        print(f"{'step':>4} {'loss scale':>10}  {'overflow on ranks':<18} {'skipped':<8} loss")
    for _ in range(args.steps):
        m = trainer.train_step()
        lines = world.allgather_object((m["step"], m["loss_scale"], m["skipped"]))
        overflowed = [r for r, finite in enumerate(world.allgather_object(local["finite"]))
                      if not finite]
        if world.rank == 0:
            assert len(set(lines)) == 1, f"ranks disagree: {lines}"  # never: they voted
            print(f"{m['step']:4d} {m['loss_scale']:10.0f}  {str(overflowed or '-'):<18} "
                  f"{'yes' if m['skipped'] else 'no':<8} {m['loss']:.4f}")


if __name__ == "__main__":
    main()
