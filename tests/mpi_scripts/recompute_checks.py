"""Recomputation under tensor, pipeline and data parallelism: ``mpirun -n 4 python
recompute_checks.py``.

* the bytes each block keeps on a rank (`mpipar.activations.layer_activation_bytes`) under
  tp = 2, with and without sequence parallelism and dropout, in every mode, equal the
  formula (`mpipar.activations.formula_bytes`) to the byte;
* float32 with dropout: whole runs under tp + sp + dp, and pp + dp with ZeRO-2 and the
  interleaved schedule, give the same losses, gradient norms, parameters and optimizer
  state, bit for bit, in the modes ``selective`` and ``full`` as in ``none`` (float64 runs of
  every layout do the same in the equivalence launches).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from equivalence import TEXT, check_same_bits, run
from verdict import Checks

from mpipar.activations import formula_bytes, layer_activation_bytes
from mpipar.comm import Comm, install_excepthook
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPT, RECOMPUTE_MODES, GPTConfig
from mpipar.nn import DropoutKey
from mpipar.parallel.tensor_parallel import TensorParallelLayers
from mpipar.trace import Tracer
from mpipar.training import TrainConfig


def block_bytes(layers: TensorParallelLayers, dropout: float) -> tuple[dict, dict]:
    """Measured and formula bytes per block, by mode, for a small model on ``layers``."""
    b, s, h, a = 4, 16, 32, 4
    cfg = GPTConfig(vocab_size=40, n_layer=2, n_head=a, d_model=h, seq_len=s, dropout=dropout)
    idx = np.random.default_rng(0).integers(0, 40, (b, s))
    key = DropoutKey(1, 0, b, slice(0, b)) if dropout else None
    got, want = {}, {}
    for mode in RECOMPUTE_MODES:
        model = GPT(cfg, layers)
        model.initialize(0)
        model.set_recompute(mode)
        got[mode] = layer_activation_bytes(model, idx, key)
        want[mode] = [formula_bytes(b, s, h, a, 4, recompute=mode, dropout=bool(dropout),
                                    tp=layers.tp_size,
                                    sequence_parallel=layers.sequence_parallel)] * cfg.n_layer
    return got, want


def check_block_bytes(checks: Checks, world: Comm) -> None:
    grid = ProcessGrid.build(world, world.size // 2, 2, 1)
    for sp in (False, True):
        for dropout in (0.0, 0.1):
            layers = TensorParallelLayers(grid.tp_comm, np.float32, sequence_parallel=sp)
            got, want = block_bytes(layers, dropout)
            name = f"tp2{' sp' if sp else ''}{' dropout' if dropout else ''}"
            with checks.check(f"block bytes = formula, {name}"):
                assert got == want, f"measured {got}, formula {want}"


LAYOUTS = {  # name: (dp, tp, pp, training options)
    "tp2 dp2 sp mb2": (2, 2, 1, {"sequence_parallel": True, "microbatches": 2}),
    "pp2 dp2 interleaved v2 zero2": (2, 1, 2, {"schedule": "interleaved", "virtual_stages": 2,
                                               "microbatches": 2, "zero": 2}),
}


def check_same_bits_float32(checks: Checks, world: Comm) -> None:
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, d_model=16, seq_len=8,
                    dtype="float32", dropout=0.1)
    data = make_dataset(TEXT, tok, seq_len=cfg.seq_len)
    base = TrainConfig(batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0)
    for name, (dp, tp, pp, options) in LAYOUTS.items():
        results = {}
        for mode in RECOMPUTE_MODES:
            tc = replace(base, recompute=mode, **options)
            results[mode] = run(cfg, tc, ProcessGrid.build(world, dp, tp, pp), data, 2)[:4]
        for mode in ("selective", "full"):
            check_same_bits(checks, f"{name} {mode}", results[mode], "none", results["none"])


def main() -> None:
    world = Comm.world(Tracer(0))
    install_excepthook(world)
    checks = Checks(world)
    check_block_bytes(checks, world)
    check_same_bits_float32(checks, world)
    checks.report()


if __name__ == "__main__":
    main()
