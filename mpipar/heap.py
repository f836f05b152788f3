"""Keep the memory of one training step for the next: glibc's malloc, told not to give it back.

A training step allocates its activations, their gradients and the temporaries of every
operation, and frees nearly all of them before the next step allocates the same sizes
again. numpy takes that memory from ``malloc``. By default glibc serves every request above
its *mmap threshold* (128 KiB to start with) with fresh pages from the kernel and unmaps them
on ``free``, and returns the top of the heap to the kernel once more than the *trim
threshold* is free there. Either way the next step's arrays land on pages the kernel must
map and zero-fill again, one page fault per 4 KiB: for the ``small`` preset about a fifth of
a step's CPU time went to that.

:func:`keep_freed_memory` raises the mmap threshold to its largest value (32 MiB on a 64-bit
machine: larger arrays are still mapped and unmapped each time) and the trim threshold to
1 GiB, so that freed blocks stay in the heap and the next step reuses them. The process
keeps, between steps, about the memory of its largest step, which it needed anyway.

It calls glibc's ``mallopt`` through ctypes; on another C library (macOS, musl) it does
nothing and says so by returning False. The settings are the process's, so they are made
once, by the first :class:`~mpipar.training.Trainer`; the environment variables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set the same before a program
starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
TRIM_THRESHOLD = 1 << 30


class _Done:
    result: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); True if it took
    both settings, False where there is no glibc. Only the first call does anything."""
    if _Done.result is None:
        _Done.result = _set_thresholds()
    return _Done.result


def _set_thresholds() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either one fixes both (no more dynamic adjustment).
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
