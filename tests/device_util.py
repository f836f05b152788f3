"""The device modules the GPU-path tests run on, and how to compare their results with numpy's.

``fakecupy`` (tests/fakecupy.py), the strict CPU stand-in for cupy, always; real ``cupy`` too
when it imports and sees a CUDA device. On the stand-in every result must equal numpy's bit
for bit (it computes with numpy); on a real GPU the kernels differ (cuBLAS, other summation
orders), so float64 results must agree to a relative 1e-10 instead.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np

from mpipar import backend

TESTS = Path(__file__).resolve().parent
REAL_GPU_RTOL = 1e-10


def real_cupy() -> ModuleType | None:
    """cupy if it imports and a CUDA device is there, else None."""
    try:
        cupy = importlib.import_module("cupy")
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # noqa: BLE001  (no cupy, no driver, no device: all mean "no GPU")
        return None


def device_names() -> list[str]:
    """The device modules to test on: the stand-in, and cupy where a GPU is."""
    return ["fakecupy"] + (["cupy"] if real_cupy() is not None else [])


@contextmanager
def on_device(name: str) -> Iterator[ModuleType]:
    """Compute with device module ``name`` inside the block; numpy again afterwards."""
    module = importlib.import_module(name)
    backend.use_module(module)
    try:
        yield module
    finally:
        backend.use_device("cpu")


def device_env(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess whose ``--device gpu`` means module ``name``."""
    path = os.environ.get("PYTHONPATH")
    env = {"MPIPAR_DEVICE_MODULE": name,
           "PYTHONPATH": str(TESTS.parent) + os.pathsep + str(TESTS)
           + (os.pathsep + path if path else "")}
    env.update(extra or {})
    return env


def assert_same(got, want, what: str, exact: bool = True) -> None:
    """``got`` equals ``want`` bit for bit (``exact``), or to REAL_GPU_RTOL relative."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    if exact:
        assert np.array_equal(got, want), (
            f"{what}: differs in {int(np.sum(got != want))} of {got.size} elements, "
            f"max |diff| {float(np.max(np.abs(got.astype(float) - want))):.3g}")
        return
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-300)
    rel = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    assert rel <= REAL_GPU_RTOL, f"{what}: relative difference {rel:.3g} > {REAL_GPU_RTOL}"
