"""A6 the grid and the planner, the MPI side: ``mpirun -n N python a6.py <group> '<options>'``.

Groups:

* ``grid`` (A6.1): ``ProcessGrid.build`` for each layout of ``options["layouts"]`` on the
  world; each rank's coordinates and the global ranks of its tp, dp, pp and embed groups,
  in group order, must be those of the definition (computed here, not by the student's
  ``rank_coords``): the ranks equal in the two other coordinates, ordered by the third;
* ``measure`` (A6.2, A6.3): for each layout of ``options["layouts"]``, one traced training
  step of a small GPT on a grid split here (with ``Comm.split`` directly, so the measurement
  needs none of the student's code), and from every rank its coordinates, the calls and
  bytes the trace recorded per group, the optimizer's ``memory_report`` and the activation
  bytes kept for backward. Rank 0 prints them as one ``MEASURED {json}`` line; the tests
  compare the planner's estimates with them in the pytest process.

Activations are measured as the executor measures its stash (``peak_stash_bytes``, the most
bytes the stashed microbatches held at once) on a pipeline, and without one as the bytes the
graph of one microbatch's loss keeps for backward; parameters, ZeRO-3's gather buffers and the
batch itself are left out.
"""

from __future__ import annotations

import json
from collections import defaultdict

from checks import Checks, main

from mpipar.comm import Comm
from mpipar.data import CharTokenizer, get_batch, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig
from mpipar.parallel.pipeline.memory import graph_bytes, memory_ids
from mpipar.parallel.zero import memory_report
from mpipar.trace import COMPUTE, Tracer
from mpipar.training import TrainConfig, Trainer

TEXT = "".join(f"line {i}: the quick brown fox jumps over a lazy dog.\n" for i in range(40))
SHAPE = dict(n_layer=4, n_head=4, d_model=32, seq_len=16)  # the GPT of every measured step
BATCH = 8
TRAIN_OPTIONS = ("microbatches", "schedule", "virtual_stages", "zero", "sequence_parallel",
                 "recompute", "precision", "allreduce")


def defined(rank: int, dp: int, tp: int, pp: int) -> dict[str, object]:
    """Coordinates and groups of ``rank`` by definition (tp fastest, then dp, then pp)."""

    def at(p: int, d: int, t: int) -> int:
        return (p * dp + d) * tp + t

    p, d, t = rank // (tp * dp), (rank // tp) % dp, rank % tp
    pipe = [at(s, d, t) for s in range(pp)]
    return {"coords": (p, d, t), "tp": [at(p, d, k) for k in range(tp)],
            "dp": [at(p, k, t) for k in range(dp)], "pp": pipe,
            "embed": [pipe[0], pipe[-1]] if pp > 1 and p in (0, pp - 1) else None}


def grid(world: Comm, checks: Checks, options: dict) -> None:
    for dp, tp, pp in options["layouts"]:
        name = f"dp{dp} tp{tp} pp{pp}"
        g = ProcessGrid.build(world, dp, tp, pp)
        want = defined(world.rank, dp, tp, pp)
        with checks.check("groups"):
            got = (g.pp_rank, g.dp_rank, g.tp_rank)
            assert got == want["coords"], \
                f"{name}: rank {world.rank} at (pp, dp, tp) = {got}, expected {want['coords']}"
            for kind in ("tp", "dp", "pp"):
                members = list(getattr(g, f"{kind}_comm").members)
                assert members == want[kind], (f"{name}: rank {world.rank}'s {kind} group is "
                                               f"{members}, expected {want[kind]} (in order)")
        with checks.check("embed"):
            members = None if g.embed_comm is None else list(g.embed_comm.members)
            assert members == want["embed"], (f"{name}: rank {world.rank}'s embed group is "
                                              f"{members}, expected {want['embed']}")


def grid_by_hand(world: Comm, dp: int, tp: int, pp: int) -> ProcessGrid:
    """The grid of ``ProcessGrid.build``, split here from the definition's coordinates."""
    p, d, t = defined(world.rank, dp, tp, pp)["coords"]
    tp_comm = world.split(p * dp + d, t, "tp")
    dp_comm = world.split(p * tp + t, d, "dp")
    pp_comm = world.split(d * tp + t, p, "pp")
    embed = world.split(d * tp + t if p in (0, pp - 1) else None, p, "embed") if pp > 1 \
        else None
    return ProcessGrid(world, dp_comm, tp_comm, pp_comm, embed, dp, tp, pp, d, t, p)


def activation_bytes(trainer: Trainer) -> int:
    """Bytes kept for backward at the peak: the stash's on a pipeline, else one microbatch's."""
    if trainer.pipeline is not None:
        return trainer.pipeline.memory_summary()["peak_stash_bytes"]
    x, y = get_batch(trainer.data.train, BATCH, trainer.cfg.seq_len, 1, 0)
    xs, ys = trainer.microbatches(x, y)
    sync = trainer.grad_sync
    buffers = sync.parameter_buffers() if sync is not None and sync.zero == 3 else []
    skip = memory_ids([*(p.data for p in trainer.params), *buffers, xs[0], ys[0]])
    loss = trainer.chunks[0](xs[0], ys[0], trainer.dropout_keys(0)[0])
    return graph_bytes(loss, [], skip)


def measure(world: Comm, checks: Checks, options: dict) -> None:
    tracer = Tracer(world.rank, enabled=True)
    world = Comm.world(tracer)
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, **SHAPE)
    data = make_dataset(TEXT, tok, seq_len=cfg.seq_len)
    results = {}
    for name, layout in options["layouts"].items():
        g = grid_by_hand(world, layout.get("dp", 1), layout.get("tp", 1), layout.get("pp", 1))
        train = {k: v for k, v in layout.items() if k in TRAIN_OPTIONS}
        tc = TrainConfig(steps=2, batch_size=BATCH, lr=1e-2, warmup_steps=1, eval_every=0,
                         **train)
        trainer = Trainer(cfg, tc, g, data, tracer)
        tracer.clear()
        trainer.train_step()
        traced: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in tracer.records:  # the step's calls; the loss's all-reduce for the log is not
            if r.op != COMPUTE and r.phase != "other":
                traced[r.group][0] += 1
                traced[r.group][1] += r.nbytes
        report = memory_report(trainer.optimizer, trainer.grad_sync, trainer.params)
        mine = {"coords": [g.pp_rank, g.dp_rank, g.tp_rank], "traced": dict(traced),
                "state": [report["param_bytes"], report["grad_bytes"],
                          report["optimizer_state_bytes"]],
                "activations": activation_bytes(trainer)}
        results[name] = world.gather_object(mine)
    if world.rank == 0:
        print("MEASURED " + json.dumps({"vocab_size": tok.vocab_size, "batch_size": BATCH,
                                        **SHAPE, "layouts": results}), flush=True)


if __name__ == "__main__":
    main({"grid": grid, "measure": measure})
