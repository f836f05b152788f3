"""The array backend: numpy on the CPU, cupy on a GPU, behind one name.

Every array operation in mpipar goes through ``xp``, the array module of the arrays at hand,
so numpy and cupy share a single code path. Pick the device once, at start-up, with
:func:`use_device`; code that needs the module for a given array calls :func:`array_module`.

The device module is ``cupy`` unless the environment variable ``MPIPAR_DEVICE_MODULE`` names
another module with cupy's interface (the tests' strict CPU stand-in, ``fakecupy``);
:func:`use_module` selects a module object directly.
"""

from __future__ import annotations

import importlib
import os
import types

import numpy as np

DEVICE_MODULE_ENV = "MPIPAR_DEVICE_MODULE"

_state: dict = {"xp": np, "device": "cpu", "gpu": None}


def use_device(device: str) -> types.ModuleType:
    """Select ``"cpu"`` (numpy) or ``"gpu"`` (cupy) for arrays created from now on."""
    if device == "cpu":
        _state.update(xp=np, device="cpu")
    elif device == "gpu":
        name = os.environ.get(DEVICE_MODULE_ENV) or "cupy"
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                f"--device gpu needs {name}: pip install 'mpipar[gpu]' (and a CUDA GPU)"
            ) from exc
        use_module(module)
    else:
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'gpu'")
    return _state["xp"]


# The rank's index among the ranks on its node, as MPICH's and Open MPI's launchers set it.
LOCAL_RANK_ENVS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")


def use_module(module: types.ModuleType) -> types.ModuleType:
    """Compute with ``module``: numpy (the CPU), or a device module with cupy's interface.

    On a node with several GPUs the ranks take them in turn: local rank r uses device
    r mod (number of devices), so ranks share a GPU only when there are more ranks than GPUs.
    """
    if module is np:
        return use_device("cpu")
    local = next((int(os.environ[v]) for v in LOCAL_RANK_ENVS if os.environ.get(v)), 0)
    module.cuda.Device(local % module.cuda.runtime.getDeviceCount()).use()
    _state.update(xp=module, device="gpu", gpu=module)
    return module


def get_xp() -> types.ModuleType:
    """The array module for newly created arrays (numpy unless ``use_device('gpu')``)."""
    return _state["xp"]


def device() -> str:
    """``"cpu"`` or ``"gpu"``."""
    return _state["device"]


def array_module(*arrays) -> types.ModuleType:
    """The module (numpy or cupy) that owns ``arrays``; numpy for plain Python values."""
    gpu = _state["gpu"]
    for a in arrays:
        if isinstance(a, np.ndarray):
            continue
        if gpu is not None and isinstance(a, gpu.ndarray):
            return gpu
        if type(a).__module__.startswith("cupy"):
            import cupy  # noqa: PLC0415

            return cupy
    return np


def synchronize() -> None:
    """Wait until the device has finished the work queued so far (nothing to wait for on the
    CPU). A GPU runs kernels asynchronously: a host clock read without this measures launches,
    not the work."""
    if _state["device"] == "gpu":
        _state["xp"].cuda.get_current_stream().synchronize()


def to_numpy(a) -> np.ndarray:
    """A host (numpy) copy of ``a``, or ``a`` itself when it already is a numpy array."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)
