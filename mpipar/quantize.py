"""int8 weight-only quantisation: ``python -m mpipar.quantize --checkpoint DIR --out DIR8``.

Every matrix W (d_out, d_in) of the model (the linear layers, the token and position tables)
is stored as int8 with one scale per output channel, symmetric around zero:

    s_o = max_i |W_oi| / 127      q_oi = round(W_oi / s_o) ∈ [−127, 127]      Ŵ_oi = q_oi · s_o

so each weight costs 1 byte instead of 4 (float32), plus 4 bytes per row for its scale, and
the error of a weight is at most s_o / 2, half a step of its own row's grid. A per-row scale
follows each output channel's own range: one large weight spoils the resolution of its row
only, not of the whole matrix. Vectors (LayerNorm gains and biases, linear biases) are few
and stay in floating point. Activations are not quantised ("weight-only"): the model computes
in its own dtype with Ŵ, which generation and evaluation rebuild when they load the
checkpoint, each rank for its own shard (:func:`dequantize`).

Under tensor parallelism a rank can quantise its shard alone and get exactly the int8 values
and scales of the full matrix (:func:`quantize_shard`): a column-parallel or vocab-parallel
shard holds whole rows, so its row maxima are the full ones; a row-parallel shard holds a
slice of every row, so the ranks first agree on each row's maximum with one all-reduce(max)
of d_out numbers.

A quantised checkpoint is a checkpoint directory (docs/design.md §8) whose ``state.npz``
holds ``int8.<name>`` and ``scale.<name>`` for each matrix and ``model.<name>`` for the
vectors, and whose ``meta.json`` has a ``quantization`` entry. It holds no optimizer state
and cannot be trained from (``train.py --resume`` refuses it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from mpipar.backend import to_numpy
from mpipar.checkpoint import (
    CheckpointError,
    check_state,
    load_checkpoint,
    save_checkpoint,
    unpack_state,
)
from mpipar.comm import Comm
from mpipar.model import GPTConfig
from mpipar.nn import Parameter
from mpipar.resume import model_specs

INT8_PREFIX = "int8."
SCALE_PREFIX = "scale."
QMAX = 127
SCHEME = {"bits": 8, "scheme": "weight-only, symmetric, one scale per output channel (row)"}


def quantize_rows(w: Any, row_max: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(q, s)``: int8 ``q`` (d_out, d_in) and float32 scales ``s`` (d_out,) with W ≈ q·s.

    ``row_max`` is max_i |W_oi| per row when the caller knows it better than ``w`` does (a
    shard holding part of each row); an all-zero row gets scale 1 and q = 0.
    """
    w = np.asarray(to_numpy(w), dtype=np.float64)
    amax = np.abs(w).max(axis=1) if row_max is None else np.asarray(row_max, np.float64)
    scale = (amax / QMAX).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.rint(w / scale.astype(np.float64)[:, None])
    return np.clip(q, -QMAX, QMAX).astype(np.int8), scale


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: Any) -> np.ndarray:
    """Ŵ = q · s row by row, in ``dtype``."""
    return q.astype(dtype) * scale.astype(dtype)[:, None]


def splits_rows(p: Parameter) -> bool:
    """Whether this shard holds only part of each row of p (a row-parallel weight's columns)."""
    return p.shard_index is not None and len(p.shard_index) > 1


def quantize_shard(p: Parameter, tp_comm: Comm) -> tuple[np.ndarray, np.ndarray]:
    """This rank's shard of the matrix ``p`` quantised with the full matrix's row scales.

    The result is exactly the slice ``shard_index`` of ``quantize_rows(full W)``. A shard that
    holds part of every row all-reduces (max) its rows' maxima over the tensor-parallel group
    first; every rank of the group must call this for the same parameters in the same order.
    Padding rows of a vocab-parallel shard (``local_index``) are left out.
    """
    w = np.asarray(to_numpy(p.data), dtype=np.float64)[p.local_index]
    row_max = np.abs(w).max(axis=1)
    if splits_rows(p):
        tp_comm.allreduce(row_max, op="max")
    return quantize_rows(w, row_max)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def is_quantized(meta: Mapping[str, Any]) -> bool:
    return "quantization" in meta


def refuse_quantized(meta: Mapping[str, Any], flag: str, path: str) -> None:
    """A quantised checkpoint serves generation and evaluation only (CheckpointError)."""
    if is_quantized(meta):
        raise CheckpointError(f"{flag} {path} is an int8 weight-only checkpoint (made by "
                              "python -m mpipar.quantize); training needs the float checkpoint "
                              "it was made from")


def quantize_state(model_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a quantised checkpoint: matrices as int8 and scales, vectors as they are."""
    arrays: dict[str, np.ndarray] = {}
    for name, w in model_state.items():
        if w.ndim == 2:
            arrays[INT8_PREFIX + name], arrays[SCALE_PREFIX + name] = quantize_rows(w)
        else:
            arrays["model." + name] = np.asarray(w)
    return arrays


def model_state_of(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                   dtype: Any) -> dict[str, np.ndarray]:
    """The float model state of a checkpoint, quantised (dequantised here) or not."""
    model_state, _ = unpack_state(arrays)
    if not is_quantized(meta):
        return dict(model_state)
    state = {name: np.asarray(a, dtype=dtype) for name, a in model_state.items()}
    for key, q in arrays.items():
        if key.startswith(INT8_PREFIX):
            name = key.removeprefix(INT8_PREFIX)
            scale = arrays.get(SCALE_PREFIX + name)
            if scale is None or scale.shape != q.shape[:1]:
                raise CheckpointError(f"quantised checkpoint: {name} has no matching scales")
            state[name] = dequantize(q, scale, dtype)
    return state


def weight_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the model's weights in a checkpoint (optimizer state left out)."""
    return sum(a.nbytes for k, a in arrays.items()
               if k.startswith(("model.", INT8_PREFIX, SCALE_PREFIX)))


def quantize_checkpoint(src: str, dst: str) -> tuple[int, int, float]:
    """Write the int8 checkpoint of ``src`` to ``dst``.

    Returns (float weight bytes, int8 weight bytes, the largest |W − Ŵ| / s, at most ½).
    """
    arrays, meta = load_checkpoint(src)
    if is_quantized(meta):
        raise CheckpointError(f"--checkpoint {src} is already quantised")
    cfg = GPTConfig(**meta["model"])
    model_state, _ = unpack_state(arrays)
    check_state(model_specs(cfg), model_state)
    out = quantize_state(model_state)
    worst = 0.0
    for name, w in model_state.items():
        if w.ndim == 2:
            q, s = out[INT8_PREFIX + name], out[SCALE_PREFIX + name]
            err = np.abs(dequantize(q, s, np.float64) - w).max(axis=1) / s
            worst = max(worst, float(err.max()))
    new_meta = {k: v for k, v in meta.items() if k != "train"}
    new_meta["quantization"] = {**SCHEME, "source": str(src)}
    save_checkpoint(dst, out, new_meta)
    return weight_bytes({f"model.{k}": v for k, v in model_state.items()}), weight_bytes(out), worst


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mpipar.quantize",
        description="Write an int8 weight-only copy of a checkpoint (one scale per output "
                    "channel); python -m mpipar.generate and mpipar.evaluate read it.")
    ap.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="checkpoint written by train.py --save")
    ap.add_argument("--out", required=True, metavar="DIR8", help="where to write the copy")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        before, after, worst = quantize_checkpoint(args.checkpoint, args.out)
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        print(f"quantize: error: {exc}", file=sys.stderr)
        return 2
    print(f"weights: {before:,} bytes → {after:,} bytes int8 ({before / after:.2f}× smaller)")
    print(f"largest rounding error: {worst:.3f} of its row's step s (at most 0.5)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
