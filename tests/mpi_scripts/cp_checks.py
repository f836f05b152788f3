"""Context parallelism on the whole world as one cp group: ``mpirun -n C python cp_checks.py``.

* ring attention (`mpipar.parallel.context_parallel.RingAttention`) against the 1-process
  causal attention of the whole sequence: output and gradient of this rank's rows (float64);
* the trace of one training step: per rank and layer 2(C−1) forward messages (K and V) and
  2(C−1) + 2C backward (K, V again, and dK, dV home), each isend with its irecv, of
  b·(T/C)·d·8 bytes;
* activation memory per rank (`mpipar.activations.layer_activation_bytes`) against the
  1-process model's, with and without selective recomputation.

Prints ``FIGURES {json}`` (the measured numbers) and the ``VERDICT`` line from rank 0.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from verdict import Checks

from mpipar import fused
from mpipar.activations import layer_activation_bytes
from mpipar.autograd import Tensor
from mpipar.comm import Comm
from mpipar.data import CharTokenizer, get_batch, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig, build_model
from mpipar.parallel.context_parallel import ContextParallel, ring_messages
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n" * 30


def rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def check_ring_attention(checks: Checks, world: Comm, figures: dict) -> None:
    """Output and d(qkv) of this rank's tokens equal the whole sequence's, sliced."""
    grid = ProcessGrid.build(world, 1, 1, 1, cp=world.size)
    context = ContextParallel(grid.cp_comm)
    rng = np.random.default_rng(7)
    b, t, h, d = 2, 8 * world.size, 2, 4
    qkv = rng.standard_normal((b, t, 3 * h * d))
    dy = rng.standard_normal((b, t, h * d))
    full = Tensor(qkv, requires_grad=True)
    y = fused.CausalAttention.apply(full, n_head=h)
    (y * Tensor(dy)).sum().backward()
    mine = context.positions(t // world.size)
    local = Tensor(np.ascontiguousarray(qkv[:, mine]), requires_grad=True)
    y_local = context.attention(local, h)
    (y_local * Tensor(dy[:, mine])).sum().backward()
    figures["ring output rel diff"] = rel(y_local.data, y.data[:, mine])
    figures["ring d(qkv) rel diff"] = rel(local.grad, full.grad[:, mine])
    with checks.check("ring attention: output"):
        assert figures["ring output rel diff"] < 1e-12, figures
    with checks.check("ring attention: gradient"):
        assert figures["ring d(qkv) rel diff"] < 1e-12, figures


def tiny(world: Comm) -> tuple[GPTConfig, object]:
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=16,
                    seq_len=4 * world.size, dtype="float64")
    return cfg, make_dataset(TEXT, tok, seq_len=cfg.seq_len)


def check_trace(checks: Checks, figures: dict) -> None:
    """One training step's cp messages, per (phase, op, bytes), on every rank."""
    world = Comm.world(Tracer(0, enabled=True))
    c = world.size
    cfg, data = tiny(world)
    tc = TrainConfig(steps=1, batch_size=4, eval_every=0)
    trainer = Trainer(cfg, tc, ProcessGrid.build(world, 1, 1, 1, cp=c), data, world.tracer)
    world.tracer.records.clear()
    trainer.train_step()
    have = Counter((r.phase, r.op, r.nbytes) for r in world.tracer.records if r.group == "cp")
    block = tc.batch_size * (cfg.seq_len // c) * cfg.d_model * 8  # one K (or V) block
    want = Counter({(phase, op, block): cfg.n_layer * n
                    for phase, n in ring_messages(c).items() for op in ("isend", "irecv")})
    figures["cp messages per layer"] = {
        phase: have[(phase, "isend", block)] // cfg.n_layer for phase in ("forward", "backward")}
    with checks.check("trace: cp messages per layer"):
        assert have == want, f"{sorted(have.items())} != {sorted(want.items())}"


def check_memory(checks: Checks, world: Comm, figures: dict) -> None:
    """Activation bytes per rank / the 1-process model's, on the same batch."""
    c = world.size
    cfg, data = tiny(world)
    x, _ = get_batch(data.train, 4, cfg.seq_len, 1, 0)
    grid = ProcessGrid.build(world, 1, 1, 1, cp=c)
    trainer = Trainer(cfg, TrainConfig(batch_size=4), grid, data, world.tracer)
    model, serial = trainer.chunks[0], build_model(cfg, 1)
    local = trainer.layers.context.shard(x)
    for mode in ("none", "selective"):
        model.set_recompute(mode)
        serial.set_recompute(mode)
        ratio = sum(layer_activation_bytes(model, local)) / sum(
            layer_activation_bytes(serial, x))
        figures[f"activation ratio ({mode})"] = ratio
    with checks.check("memory: activations per rank ≈ 1/C"):
        assert abs(figures["activation ratio (selective)"] * c - 1) < 0.1, figures
        assert figures["activation ratio (none)"] <= 1 / c, figures


def main() -> None:
    world = Comm.world(Tracer(0))
    checks = Checks(world)
    figures: dict = {"cp": world.size}
    check_ring_attention(checks, world, figures)
    check_trace(checks, figures)
    check_memory(checks, world, figures)
    if world.rank == 0:
        print("FIGURES " + json.dumps(figures), flush=True)
    checks.report()


if __name__ == "__main__":
    main()
