"""dp, tp and pp on a device module against numpy, in one ``mpirun`` launch.

Usage: ``mpirun -n 2 python tests/mpi_scripts/device_checks.py '<json>'`` with
``{"device": "fakecupy" | "cupy", "exact": bool, "steps": S, "cuda_aware": bool}`` (the
device module must be importable: ``tests/`` on ``PYTHONPATH`` for the stand-in).

For each layout every rank trains on numpy, then on the device: with MPI buffers staged
through host copies, and (``cuda_aware``) with ``MPIPAR_CUDA_AWARE_MPI=1``, device buffers
handed to MPI after a device synchronisation. Losses, gradient norms, parameters and
optimizer state (assembled to full shapes) must equal the numpy run's: bit for bit on the
stand-in (``exact``), to a relative 1e-10 on a GPU. The CUDA-aware run must have synchronised
the device (it passed device buffers); the staged one must not have needed to.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import numpy as np
from verdict import Checks

from mpipar import backend
from mpipar.comm import CUDA_AWARE_ENV, Comm, install_excepthook
from mpipar.data import CharTokenizer, make_dataset
from mpipar.grid import ProcessGrid
from mpipar.model import GPTConfig
from mpipar.parallel.full_state import full_state
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

TEXT = "Sphinx of black quartz, judge my vow; pack my box with five dozen jugs.\n" * 30
LAYOUTS = {"dp": (2, 1, 1), "tp": (1, 2, 1), "pp": (1, 1, 2)}
# More of the parallel code, host-staged only: (layout, TrainConfig overrides).
VARIANTS = {
    "dp zero1": ((2, 1, 1), {"zero": 1}),
    "dp zero2": ((2, 1, 1), {"zero": 2}),
    "dp zero3": ((2, 1, 1), {"zero": 3}),
    "dp ring all-reduce, per-param": ((2, 1, 1), {"allreduce": "ring",
                                                  "dp_strategy": "per_param"}),
    "pp gpipe": ((1, 1, 2), {"schedule": "gpipe"}),
    "tp sequence-parallel": ((1, 2, 1), {"sequence_parallel": True}),
    "pp interleaved, recompute": ((1, 1, 2), {"schedule": "interleaved", "virtual_stages": 2,
                                              "n_layer": 4, "recompute": "full"}),
}


def train(world: Comm, layout: tuple[int, int, int], steps: int,
          options: dict | None = None) -> tuple:
    options = dict(options or {})
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=options.pop("n_layer", 2), n_head=2,
                    d_model=16, seq_len=16, dtype="float64")
    tc = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0,
                     microbatches=2, **options)
    grid = ProcessGrid.build(world, *layout)
    trainer = Trainer(cfg, tc, grid, make_dataset(TEXT, tok, seq_len=16), Tracer(world.rank))
    metrics = [trainer.train_step() for _ in range(steps)]
    model, optim = full_state(trainer.params, trainer.optimizer, grid, trainer.dtype)
    return ([m["loss"] for m in metrics], [m["grad_norm"] for m in metrics], model, optim,
            trainer)


def compare(got: tuple, want: tuple, exact: bool) -> None:
    pairs = [("losses", np.asarray(got[0]), np.asarray(want[0])),
             ("grad norms", np.asarray(got[1]), np.asarray(want[1]))]
    pairs += [(f"parameter {k}", got[2][k], want[2][k]) for k in want[2]]
    pairs += [(f"optimizer {k}", got[3][k], want[3][k]) for k in want[3]]
    for what, a, b in pairs:
        if exact:
            assert np.array_equal(a, b), f"{what} differs from numpy's"
        else:
            scale = max(float(np.max(np.abs(b))), 1e-300)
            rel = float(np.max(np.abs(a - b))) / scale
            assert rel <= 1e-10, f"{what}: relative difference {rel:.3g}"


def main() -> None:
    spec = json.loads(sys.argv[1])
    world = Comm.world(Tracer(0))
    install_excepthook(world)
    checks = Checks(world)
    module = importlib.import_module(spec["device"])
    stream = module.cuda.get_current_stream()
    for name, layout in LAYOUTS.items():
        backend.use_device("cpu")
        want = train(world, layout, spec["steps"])
        modes = (("staged", "0"), ("cuda-aware", "1"))[:2 if spec["cuda_aware"] else 1]
        for mode, aware in modes:
            os.environ[CUDA_AWARE_ENV] = aware
            backend.use_module(module)
            synced = getattr(type(stream), "synchronizations", None)
            got = train(world, layout, spec["steps"])
            after = getattr(type(stream), "synchronizations", None)
            with checks.check(f"{name} {mode}"):
                assert all(type(p.data) is module.ndarray for p in got[4].params)
                compare(got, want, spec["exact"])
                if synced is not None:  # the stand-in counts synchronisations
                    assert (after > synced) == (aware == "1"), (mode, synced, after)
    os.environ[CUDA_AWARE_ENV] = "0"
    for name, (layout, options) in VARIANTS.items():
        backend.use_device("cpu")
        want = train(world, layout, spec["steps"], options)
        backend.use_module(module)
        got = train(world, layout, spec["steps"], options)
        with checks.check(f"{name} staged"):
            compare(got, want, spec["exact"])
    backend.use_device("cpu")
    checks.report()


if __name__ == "__main__":
    main()
