"""A strict stand-in for cupy on the CPU: the GPU code path, checked on every test run.

cupy's arrays live in device memory, and cupy differs from numpy exactly where that shows:

* a device array is its own type, ``cupy.ndarray``; ``a.get()`` is the host (numpy) copy;
* implicit conversion to the host is refused: ``np.asarray(a)``, ``np.array(a)`` and
  ``a.__array__()`` raise ``TypeError``;
* an operation mixing a numpy array with a device array raises ``TypeError`` (a numpy
  *scalar* or a Python number is fine), in either order (``a + h``, ``h + a``,
  ``np.add(h, a)``, ``xp.add(a, h)``);
* a reduction gives a 0-d device array, not a Python or numpy scalar;
* MPI cannot read device memory unless it is CUDA-aware;
* cupy has no bfloat16.

This module has the same behaviour, computing with numpy underneath: an :class:`ndarray`
wraps a numpy array that nothing outside this module touches. It provides the functions,
dtypes and ``cuda`` calls mpipar uses and nothing else: a new ``xp.<name>`` raises
``AttributeError`` here until it is added (after checking cupy has it). Its ufuncs have one
method, ``at`` (cupy 13's); numpy's ufunc methods on a device array (``np.add.at(a, ...)``)
raise. Stricter than cupy in one place: ``a[...] = h`` with a numpy ``h`` is refused (cupy
may copy it over implicitly); write ``xp.asarray(h)`` so the host-to-device copy shows.

MPI buffers. The array offers no buffer to mpi4py, so a device array handed to MPI without
host staging fails, as it would (worse: crash) with an MPI that is not CUDA-aware. With
``MPIPAR_CUDA_AWARE_MPI=1`` it exports DLPack (a CPU one, which mpi4py reads directly), the
stand-in for an MPI that reads device memory.

Select it with ``backend.use_module(fakecupy)`` in a process, or ``--device gpu`` with
``MPIPAR_DEVICE_MODULE=fakecupy`` and ``tests/`` on ``PYTHONPATH`` for a subprocess.
"""

from __future__ import annotations

import os
import types
from typing import Any

import numpy as np

_SCALARS = (bool, int, float, complex, np.generic)
_HOST = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
         "construct a NumPy array explicitly.")

# Methods of numpy arrays that cupy arrays have too, and mpipar may call.
_METHODS = frozenset((
    "all", "any", "argmax", "argmin", "argsort", "clip", "copy", "cumsum", "dot",
    "fill", "flatten", "max", "mean", "min", "nonzero", "prod", "ravel", "repeat", "reshape",
    "round", "sort", "squeeze", "std", "sum", "swapaxes", "take", "transpose", "var", "view",
))


def _check_dtype(dtype: Any) -> None:
    if dtype is not None and np.dtype(dtype).kind == "V":
        raise TypeError(f"Unsupported dtype {dtype}")  # cupy's words; it has no bfloat16


def _dev(x: Any) -> Any:
    """The numpy array inside a device array (recursively in lists/tuples); numpy arrays are
    refused, as cupy refuses them."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    if isinstance(x, (list, tuple)):
        return type(x)(_dev(v) for v in x)
    return x


def _wrap(r: Any) -> Any:
    """Results as device arrays; a numpy scalar becomes a 0-d device array, as in cupy."""
    if isinstance(r, np.ndarray):
        if r.dtype.kind == "O":
            raise TypeError(f"Unsupported dtype {r.dtype}")
        _check_dtype(r.dtype)
        return ndarray(r)
    if isinstance(r, np.generic):
        return ndarray(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _call(func: Any, *args: Any, **kwargs: Any) -> Any:
    """``func`` of the unwrapped arguments; ``out=`` must be device arrays."""
    out = kwargs.get("out")
    if out is not None:
        outs = out if isinstance(out, tuple) else (out,)
        if not all(isinstance(o, ndarray) for o in outs):
            raise TypeError("out must be a device array")
    args = tuple(_dev(a) for a in args)
    kwargs = {k: _dev(v) for k, v in kwargs.items()}
    if "dtype" in kwargs:
        _check_dtype(kwargs["dtype"])
    r = func(*args, **kwargs)
    return out if out is not None else _wrap(r)


class ndarray:  # noqa: N801  (cupy's name)
    """A device array: a numpy array behind a wall (see the module docstring)."""

    __slots__ = ("_a",)
    __array_priority__ = 100.0

    def __init__(self, a: np.ndarray) -> None:
        if not isinstance(a, np.ndarray):
            raise TypeError("fakecupy.ndarray wraps a numpy array; use fakecupy.asarray")
        self._a = a

    # ---- what cupy adds, and what it refuses -------------------------------------------
    def get(self) -> np.ndarray:
        """The host copy (waits for the device)."""
        return self._a.copy()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_HOST)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method != "__call__":
            return NotImplemented  # np.add.at(device, ...) and the like: TypeError
        return _call(ufunc, *inputs, **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        mine = _FUNCTIONS.get(func.__name__)
        if mine is None:
            return NotImplemented  # numpy raises TypeError: cupy has no such function
        return mine(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in _METHODS:
            method = getattr(self._a, name)
            return lambda *args, **kwargs: _call(method, *args, **kwargs)
        if name in ("__dlpack__", "__dlpack_device__") and _cuda_aware():
            return getattr(self._a, name)
        raise AttributeError(f"'fakecupy.ndarray' object has no attribute {name!r}")

    # ---- properties --------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))

    def astype(self, dtype: Any, copy: bool = True, **kwargs: Any) -> ndarray:
        _check_dtype(dtype)
        return ndarray(self._a.astype(dtype, copy=copy, **kwargs))

    def item(self) -> Any:
        return self._a.item()

    def tolist(self) -> Any:
        return self._a.tolist()

    # ---- Python protocols (0-d arrays convert, with a device synchronisation) ----------
    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __float__(self) -> float:
        return float(self._a)

    def __int__(self) -> int:
        return int(self._a)

    def __bool__(self) -> bool:
        return bool(self._a)

    def __format__(self, spec: str) -> str:
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __repr__(self) -> str:
        return repr(self._a).replace("array(", "fakecupy.array(", 1)

    def __str__(self) -> str:
        return str(self._a)

    def __getitem__(self, key: Any) -> ndarray:
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, np.ndarray):
            raise TypeError("assigning a numpy array to a device array: write xp.asarray(...)")
        self._a[_index(key)] = _dev(value)


def _index(key: Any) -> Any:
    """An index with device arrays unwrapped; numpy index arrays are copied over, as cupy
    does."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key._a if isinstance(key, ndarray) else key


def _binary(ufunc: Any, reflected: bool = False, inplace: bool = False):
    def op(self: ndarray, other: Any) -> Any:
        if not isinstance(other, (ndarray, *_SCALARS)):
            if isinstance(other, np.ndarray):
                raise TypeError(f"Unsupported type {type(other)}")
            return NotImplemented  # np.add.at(device, ...) and the like: TypeError
        if inplace:
            return _call(ufunc, self, other, out=self)
        return _call(ufunc, other, self) if reflected else _call(ufunc, self, other)
    return op


for _name, _uf in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                   ("truediv", np.true_divide), ("floordiv", np.floor_divide),
                   ("mod", np.remainder), ("pow", np.power), ("matmul", np.matmul),
                   ("and", np.bitwise_and), ("or", np.bitwise_or), ("xor", np.bitwise_xor)):
    setattr(ndarray, f"__{_name}__", _binary(_uf))
    setattr(ndarray, f"__r{_name}__", _binary(_uf, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_uf, inplace=True))
for _name, _uf in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                   ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)):
    setattr(ndarray, f"__{_name}__", _binary(_uf))
ndarray.__hash__ = None  # type: ignore[assignment]
ndarray.__neg__ = lambda self: _call(np.negative, self)
ndarray.__abs__ = lambda self: _call(np.abs, self)
ndarray.__invert__ = lambda self: _call(np.invert, self)
ndarray.__pos__ = lambda self: self


def _cuda_aware() -> bool:
    return os.environ.get("MPIPAR_CUDA_AWARE_MPI", "0") not in ("", "0")


# ---- module functions ------------------------------------------------------------------

def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    """A device array of ``a``: a host-to-device copy of host data (numpy, lists, scalars)."""
    _check_dtype(dtype)
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    a = np.array(a, dtype=dtype, order=order or "K", copy=True)
    return _wrap(a)


def array(a: Any, dtype: Any = None, copy: bool = True, order: Any = None) -> ndarray:
    """Like :func:`asarray`, copying a device array too (unless ``copy=False``)."""
    if isinstance(a, ndarray):
        return a.astype(a.dtype if dtype is None else dtype, copy=copy)
    return asarray(a, dtype=dtype, order=order)


def ascontiguousarray(a: ndarray, dtype: Any = None) -> ndarray:
    """A C-contiguous device array (cupy refuses a host array here)."""
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got "
                        f"{type(a).__name__})")
    return _call(np.ascontiguousarray, a, dtype=dtype)


class _Ufunc:
    """A cupy ufunc: called on device arrays, and ``at`` (cupy >= 13), no other method."""

    def __init__(self, ufunc: np.ufunc) -> None:
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _call(self._ufunc, *args, **kwargs)

    def at(self, a: ndarray, indices: Any, b: Any = None) -> None:
        if not isinstance(a, ndarray):
            raise TypeError(f"Unsupported type {type(a)}")
        self._ufunc.at(a._a, _index(indices), *(() if b is None else (_dev(b),)))


def _numpy_function(name: str):
    func = getattr(np, name)
    if isinstance(func, np.ufunc):
        return _Ufunc(func)

    def f(*args: Any, **kwargs: Any) -> Any:
        return _call(func, *args, **kwargs)
    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"numpy.{name} on device arrays."
    return f


# The numpy functions mpipar calls through ``xp`` (each exists in cupy), plus a few the
# tests use.
_NAMES = (
    "abs", "add", "allclose", "arange", "argmax", "argsort", "array_equal", "broadcast_to",
    "concatenate", "divide", "dot", "einsum", "empty", "empty_like", "equal", "exp",
    "expand_dims", "flatnonzero", "full", "full_like", "isfinite", "log", "matmul", "maximum",
    "minimum", "multiply", "ndim", "negative", "ones", "ones_like", "split", "sqrt", "square",
    "stack", "subtract", "sum", "tanh", "tril", "triu", "triu_indices", "where", "zeros",
    "zeros_like",
)
_FUNCTIONS: dict[str, Any] = {n: _numpy_function(n) for n in _NAMES}
_FUNCTIONS.update(asarray=asarray, array=array, ascontiguousarray=ascontiguousarray)
globals().update(_FUNCTIONS)

# dtypes and constants (cupy re-exports numpy's)
float16, float32, float64 = np.float16, np.float32, np.float64
int8, int32, int64, uint8, uint16 = np.int8, np.int32, np.int64, np.uint8, np.uint16
bool_, dtype, finfo, iinfo = np.bool_, np.dtype, np.finfo, np.iinfo
inf, pi, newaxis = np.inf, np.pi, np.newaxis


# ---- cuda: streams and devices (no-ops that count synchronisations) --------------------

class _Stream:
    """A CUDA stream: work is already done when a call returns here."""

    synchronizations = 0  # class-wide count, for tests

    def __init__(self, non_blocking: bool = False) -> None:
        self.non_blocking = non_blocking

    def synchronize(self) -> None:
        _Stream.synchronizations += 1

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Device:
    current = 0  # the device of the latest ``use()``, for tests

    def __init__(self, device: int = 0) -> None:
        self.id = device

    def synchronize(self) -> None:
        _Stream.synchronizations += 1

    def use(self) -> None:
        _Device.current = self.id

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL_STREAM = _Stream()

cuda = types.SimpleNamespace(
    Stream=_Stream,
    Device=_Device,
    get_current_stream=lambda: _NULL_STREAM,
    is_available=lambda: True,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
)


def get_array_module(*arrays: Any) -> types.ModuleType:
    """This module for device arrays, numpy otherwise (cupy.get_array_module)."""
    import sys  # noqa: PLC0415

    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in arrays) else np
