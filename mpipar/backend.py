"""The array backend: numpy on the CPU, cupy on a GPU, behind one name.

Every array operation in mpipar goes through ``xp``, the array module of the arrays at hand,
so numpy and cupy share a single code path. Pick the device once, at start-up, with
:func:`use_device`; code that needs the module for a given array calls :func:`array_module`.
"""

from __future__ import annotations

import types

import numpy as np

_state = {"xp": np, "device": "cpu"}


def use_device(device: str) -> types.ModuleType:
    """Select ``"cpu"`` (numpy) or ``"gpu"`` (cupy) for arrays created from now on."""
    if device == "cpu":
        _state.update(xp=np, device="cpu")
    elif device == "gpu":
        try:
            import cupy  # noqa: PLC0415  (optional dependency, imported on demand)
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "--device gpu needs cupy: pip install 'mpipar[gpu]' (and a CUDA GPU)"
            ) from exc
        _state.update(xp=cupy, device="gpu")
    else:
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'gpu'")
    return _state["xp"]


def get_xp() -> types.ModuleType:
    """The array module for newly created arrays (numpy unless ``use_device('gpu')``)."""
    return _state["xp"]


def device() -> str:
    """``"cpu"`` or ``"gpu"``."""
    return _state["device"]


def array_module(*arrays) -> types.ModuleType:
    """The module (numpy or cupy) that owns ``arrays``; numpy for plain Python values."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy  # noqa: PLC0415

            return cupy
    return np


def to_numpy(a) -> np.ndarray:
    """A host (numpy) copy of ``a``, or ``a`` itself when it already is a numpy array."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)
