"""The ``.npz`` archive of a checkpoint, written with checksums and read without trusting it.

An ``.npz`` file is an uncompressed zip holding one ``.npy`` member per array (what
``np.savez`` writes and ``np.load`` reads). ``np.load`` believes the file: a member's header
may claim any dtype or shape and numpy allocates what it claims (a header edited to say 8 TiB
is a ``MemoryError``, one edited from ``'<f4'`` to ``'<f2'`` loads as other numbers), and a
damaged zip surfaces as whichever exception the damaged byte happens to trigger.

:class:`NpzReader` reads an archive held in memory in two passes:

1. the zip directory and the header of every member, but no array data: each member must be
   a stored (uncompressed, unencrypted) ``<name>.npy`` whose header describes a plain numeric
   array (no Python objects, so nothing is ever unpickled) of exactly as many bytes as the
   member holds, so the size of every later allocation is bounded by the file's own length.
   ``specs`` then lists each array's shape and dtype, for a caller to compare with what it
   expects *before* any data is read;
2. :meth:`NpzReader.read`: the member's bytes, whose zip CRC-32 is checked as they are read,
   and whose SHA-256 (:func:`array_checksum`, over dtype, shape and data) must equal the one
   recorded when the archive was written (:func:`write_npz` returns them).

Every failure is an :class:`NpzError` with a one-line message naming the member.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

NUMERIC_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex
# What a damaged archive or header can raise from zipfile, numpy's header parser (which uses
# ast and tokenize) or struct, besides NpzError itself; warnings are raised as errors too.
_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, TypeError, KeyError,
           IndexError, OSError, EOFError, RuntimeError, NotImplementedError, SyntaxError,
           tokenize.TokenError, struct.error, OverflowError, UnicodeDecodeError, zlib.error,
           Warning)


class NpzError(ValueError):
    """An archive that is damaged or holds something other than plain numeric arrays."""


class ArraySpec(NamedTuple):
    """What an array is, without its data: shape and dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def describe(self) -> str:
        return f"{self.dtype} {self.shape}"


def array_checksum(arr: np.ndarray) -> str:
    """SHA-256 (hex) of ``arr``'s dtype, shape and C-order bytes: equal checksums mean equal
    arrays, and a header that changes dtype or shape changes it too."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Write ``arrays`` as an uncompressed ``.npz`` (member ``<name>.npy`` each); return each
    array's :func:`array_checksum`.

    Written member by member rather than with ``np.savez(path, **arrays)`` so that any string
    is a valid array name (``np.savez`` reserves its own keyword names) and so that
    ``allow_pickle=False`` applies on this side too.
    """
    checksums = {}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
            checksums[name] = array_checksum(arr)
    return checksums


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    offset: int  # where the array data starts in the member (after the .npy header)
    spec: ArraySpec
    fortran_order: bool


class NpzReader:
    """An ``.npz`` held in memory: headers checked on construction, arrays read on demand.

    Raises:
        NpzError: the bytes are not a zip, or a member is not a stored ``.npy`` of a plain
            numeric array whose header matches its length (message names the member).
    """

    def __init__(self, data: bytes) -> None:
        self._size = len(data)
        try:
            self._zip = zipfile.ZipFile(io.BytesIO(data))
        except _DAMAGE as exc:
            raise NpzError(f"the archive is corrupted: not a zip ({_one_line(exc)})") from exc
        self._members: dict[str, _Member] = {}
        for info in self._zip.infolist():
            name = info.filename.removesuffix(".npy")
            if name in self._members:
                raise NpzError(f"the archive is corrupted: member {info.filename!r} appears "
                               "twice")
            if not info.filename.endswith(".npy"):
                raise NpzError(f"member {info.filename!r} is not an .npy array")
            self._members[name] = _guarded(name, self._read_header, info)
        self.specs = {name: m.spec for name, m in self._members.items()}

    def _read_header(self, info: zipfile.ZipInfo) -> _Member:
        if info.flag_bits & 0x1:
            raise NpzError("is corrupted: flagged as encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            raise NpzError(f"is compressed (zip method {info.compress_type}); "
                           "checkpoints are stored uncompressed")
        if info.compress_size != info.file_size or info.file_size > self._size:
            raise NpzError(f"is corrupted: {info.file_size:,} bytes stored as "
                           f"{info.compress_size:,} in an archive of {self._size:,}")
        with self._zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise NpzError(f"is corrupted: .npy format version {version}, not 1.0 or 2.0")
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read(f)
            offset = f.tell()
        spec = ArraySpec(tuple(shape), dtype)
        _check_plain(spec)
        claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
        held = info.file_size - offset
        if claimed != held:
            raise NpzError(f"is corrupted: its header claims {spec.describe()} = {claimed:,} "
                           f"bytes but the member holds {max(held, 0):,}")
        return _Member(info, offset, spec, fortran_order)

    def read(self, name: str, checksum: str) -> np.ndarray:
        """Array ``name``, after its zip CRC-32 and its SHA-256 (``checksum``) are checked."""
        return _guarded(name, self._read_data, self._members[name], checksum)

    def _read_data(self, m: _Member, checksum: str) -> np.ndarray:
        raw = self._zip.read(m.info)  # zipfile raises on a CRC-32 mismatch
        count = int(np.prod(m.spec.shape, dtype=object))
        flat = np.frombuffer(raw, dtype=m.spec.dtype, count=count, offset=m.offset)
        arr = flat.reshape(m.spec.shape, order="F" if m.fortran_order else "C").copy()
        if array_checksum(arr) != checksum:
            raise NpzError("is corrupted: it does not match its checksum")
        return arr


def _check_plain(spec: ArraySpec) -> None:
    """A plain numeric array: no objects (pickles), no records, no negative dimensions."""
    if spec.dtype.hasobject:
        raise NpzError("contains pickled objects; refusing to load")
    if spec.dtype.kind not in NUMERIC_KINDS or spec.dtype.fields or spec.dtype.subdtype:
        raise NpzError(f"has dtype {spec.dtype}, not a plain numeric type")
    if any(d < 0 for d in spec.shape):
        raise NpzError(f"is corrupted: a negative dimension in its shape {spec.shape}")


def _guarded(name: str, fn, *args):
    """``fn(*args)``, any damage turned into an NpzError that names the array ``name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns about some malformed headers
            return fn(*args)
    except NpzError as exc:
        raise NpzError(f"array {name!r} {exc}") from exc
    except _DAMAGE as exc:
        raise NpzError(f"array {name!r} is corrupted: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
