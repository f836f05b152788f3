"""What a benchmark ran on, and where its results go: shared by every ``bench_*.py``.

The float32 GEMM rate that every ratio here is measured against depends on more than the
CPU: on the BLAS library, on the kernel it picked for this CPU (OpenBLAS chooses one at load
time; ``OPENBLAS_CORETYPE=Haswell`` on an AVX-512 machine pins an older one and can halve
the rate), and on the thread count. :func:`machine_info` records all of it, from
threadpoolctl when it is installed (the ``bench`` extra) and otherwise from numpy's build
configuration (library and version, without the kernel chosen at run time).

:func:`emit` appends one JSON line per result to the file named by the environment variable
``MPIPAR_BENCH_RESULTS`` (``bench/run_all.py`` sets it), so that two runs can be compared
with ``python bench/run_all.py --compare OLD NEW``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

RESULTS_ENV = "MPIPAR_BENCH_RESULTS"
# Environment variables that change what the BLAS does (kernel, threads) or how MPI waits.
ENV_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                 "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
                 "NPY_DISABLE_CPU_FEATURES")


def blas_info() -> dict[str, Any]:
    """The BLAS numpy calls: library, version, kernel (``architecture``) and threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return _numpy_blas_info()
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return {"library": pool.get("internal_api"), "version": pool.get("version"),
                    "kernel": pool.get("architecture"), "threads": pool.get("num_threads"),
                    "source": "threadpoolctl"}
    return _numpy_blas_info()


def _numpy_blas_info() -> dict[str, Any]:
    """Library and version from numpy's build configuration (no run-time kernel)."""
    import numpy as np

    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (TypeError, KeyError):  # an older numpy
        return {"library": "unknown", "kernel": None, "source": "numpy"}
    return {"library": blas.get("name"), "version": blas.get("version"), "kernel": None,
            "threads": None, "source": "numpy build configuration (install threadpoolctl, "
            "the bench extra, for the kernel)"}


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, cores, load average, BLAS and its kernel, environment overrides, versions."""
    import numpy as np

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in load],
            "blas": blas_info(), "numpy": np.__version__, "python": platform.python_version(),
            "env": {k: os.environ[k] for k in ENV_OVERRIDES if k in os.environ}}


def format_machine(info: dict[str, Any]) -> str:
    """Two lines for the top of a benchmark's output."""
    blas, env = info["blas"], info["env"]
    kernel = blas.get("kernel") or "kernel not known"
    overrides = ", ".join(f"{k}={v}" for k, v in env.items()) or "none"
    return (f"machine: {info['cpu']}, {info['cores']} cores, load average "
            f"{info['load_avg'][0]:.2f}; numpy {info['numpy']}\n"
            f"BLAS: {blas.get('library')} {blas.get('version') or ''} ({kernel}, "
            f"{blas.get('threads')} thread(s)); environment: {overrides}")


def emit(benchmark: str, case: str, metrics: dict[str, Any],
         info: dict[str, Any] | None = None) -> None:
    """Append ``{"benchmark", "case", "metrics", "machine", "time"}`` as one JSON line to
    ``$MPIPAR_BENCH_RESULTS`` (nothing when it is not set)."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    record = {"benchmark": benchmark, "case": case, "metrics": metrics,
              "machine": info if info is not None else machine_info(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
