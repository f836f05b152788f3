"""Checkpoint directories: named arrays in ``state.npz``, everything else in ``meta.json``.

A checkpoint is a directory holding exactly two files:

* ``state.npz`` -- a zip of ``.npy`` members, one per named array (parameters, optimizer
  moments, ...), the layout ``np.savez`` writes and ``np.load`` reads;
* ``meta.json`` -- plain JSON: step, configuration, vocabulary, anything that is not an array,
  and ``checksums``: the SHA-256 of every array and one of the rest of ``meta.json`` itself.

Writing is atomic (:mod:`mpipar.atomic`): both files go into a fresh hidden sibling
directory, are flushed to disk, and only then is that directory renamed to the requested name
(an existing checkpoint there is renamed aside first and deleted last). A save that dies
between those two renames leaves two complete copies under hidden names; reading the
checkpoint finds the right one, and the next save, or :func:`finish_interrupted_save`, puts it
back in place. SIGTERM during a save removes the half-written copy before the process ends.

Reading trusts nothing (:func:`read_checkpoint`): ``meta.json`` must match its checksum, every
``.npy`` header must describe a plain numeric array of exactly its member's length (so nothing
is ever unpickled and no allocation is sized by a header alone), and every array must match
its zip CRC-32 and its checksum. Whatever is wrong, the error is a :class:`CheckpointError`
with one line naming the file.

What ``train.py`` saves is the state of the 1-process run, whatever the layout that trained
it: ``model.<parameter name>`` and ``optim.<state key>`` (:func:`pack_state`). Whether a
checkpoint fits the run about to resume from it is :mod:`mpipar.resume`; gathering the full
state from the shards of a layout, and cutting it back, is :mod:`mpipar.parallel.full_state`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpipar.atomic import finish_replacement, fsync_path, leftovers, replace_directory
from mpipar.backend import to_numpy
from mpipar.npz import ArraySpec, NpzError, NpzReader, write_npz

STATE_FILE = "state.npz"
META_FILE = "meta.json"
CHECKSUMS = "checksums"  # the key of meta.json that save_checkpoint writes and reading checks
MODEL_PREFIX = "model."  # + parameter name
OPTIM_PREFIX = "optim."  # + optimizer state key

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip
_PICKLE_MAGIC = b"\x80"  # pickle protocols 2 and later start with the PROTO opcode


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read, or used; the message is one line."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def meta_checksum(meta: Mapping[str, Any], array_checksums: Mapping[str, str]) -> str:
    """SHA-256 of ``meta.json``'s content (canonical JSON, without ``checksums``) and of the
    arrays' checksums, so that no value of either can change unnoticed."""
    text = json.dumps([meta, array_checksums], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _is_checkpoint_dir(path: Path) -> bool:
    """True for a directory that holds nothing but checkpoint files (safe to replace)."""
    return path.is_dir() and {e.name for e in path.iterdir()} <= {STATE_FILE, META_FILE}


def _host_arrays(arrays: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Numpy copies of ``arrays`` (numpy or cupy), refusing bad names and object arrays."""
    host: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"checkpoint array names must be non-empty strings: {name!r}")
        arr = np.asarray(to_numpy(a))
        if arr.dtype.hasobject:
            raise CheckpointError(
                f"checkpoint array {name!r} holds Python objects; only numeric arrays are saved"
            )
        host[name] = arr
    return host


def save_checkpoint(
    directory: str | os.PathLike, arrays: Mapping[str, object], meta: Mapping
) -> None:
    """Write ``arrays`` (numpy or cupy; stored as host arrays) and ``meta`` to ``directory``.

    Steps: check ``meta`` and every array first (a bad input writes nothing); finish or roll
    back an earlier interrupted save of the same name; write ``state.npz`` and ``meta.json``
    (with the checksums) into a new hidden sibling ``.<name>.tmp-*`` and fsync them; then
    rename it to ``directory``. An existing checkpoint there is first renamed aside
    (``.<name>.old-*``) and deleted only after the new one is in place. SIGTERM while the copy
    is written removes it and then ends the process; during the renames it waits for them.

    Raises:
        CheckpointError: ``meta`` is not JSON-serialisable or uses the reserved key
            ``checksums``, an array name is not a non-empty string, an array holds Python
            objects, or ``directory`` exists and holds anything besides checkpoint files
            (it is never deleted then).
    """
    target = Path(directory)
    if target.exists() and not _is_checkpoint_dir(target):
        raise CheckpointError(
            f"{target} exists and is not a checkpoint directory; refusing to replace it"
        )
    if CHECKSUMS in meta:
        raise CheckpointError(f"checkpoint meta key {CHECKSUMS!r} is reserved for the checksums")
    try:
        json.dumps(dict(meta), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint meta for {target} is not JSON-serialisable: {_one_line(exc)}"
        ) from exc
    host = _host_arrays(arrays)
    target.parent.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(target)
    replace_directory(target, lambda tmp: _write_files(tmp, host, dict(meta)))


def _write_files(tmp: Path, host: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """``state.npz`` and ``meta.json`` (with both checksums) in ``tmp``, flushed to disk."""
    sums = write_npz(tmp / STATE_FILE, host)
    meta[CHECKSUMS] = {"arrays": sums, "meta": meta_checksum(meta, sums)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                 encoding="utf-8")
    for f in (tmp / STATE_FILE, tmp / META_FILE):
        fsync_path(f)


def _is_complete(path: Path) -> bool:
    """Whether ``path`` reads as a checkpoint, every array checked."""
    try:
        read_checkpoint(path).arrays()
    except CheckpointError:
        return False
    return True


def finish_interrupted_save(directory: str | os.PathLike) -> list[str]:
    """Finish (or roll back) a save of ``directory`` that was interrupted, and remove the
    copies it left (:func:`mpipar.atomic.finish_replacement`); one note per repair."""
    return finish_replacement(Path(directory), _is_complete)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint as read from disk, checked as files (not yet against any model).

    ``meta`` is ``meta.json`` without its checksums; ``specs`` each array's shape and dtype
    from its header; ``digest`` the SHA-256 of both files' bytes as read, so that processes
    can tell whether they read the same checkpoint. :meth:`arrays` reads the data.
    """

    path: Path
    meta: dict[str, Any]
    specs: dict[str, ArraySpec]
    digest: str
    _reader: NpzReader
    _checksums: dict[str, str]
    _arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array, after its CRC-32 and checksum are checked (read once, then kept)."""
        if self._arrays is None:
            try:
                self._arrays = {n: self._reader.read(n, self._checksums[n]) for n in self.specs}
            except NpzError as exc:
                raise CheckpointError(f"{self.path / STATE_FILE}: {exc}") from exc
        return self._arrays


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read and check a checkpoint's files; the arrays' data wait for :meth:`~Checkpoint.arrays`.

    A missing ``directory`` whose interrupted save left a complete copy is read from that
    copy (``Checkpoint.path`` says which); :func:`finish_interrupted_save` renames it.

    Raises:
        CheckpointError: one line naming the file: the directory or a file is missing or
            unreadable, ``meta.json`` is not a JSON object or does not match its checksum,
            ``state.npz`` is not a zip of plain ``.npy`` arrays of the sizes their headers
            claim, or the two files do not list the same arrays.
    """
    d = Path(directory)
    if not d.exists():
        whole = next((p for p in leftovers(d, "tmp") + leftovers(d, "old") if _is_complete(p)),
                     None)
        if whole is None:
            raise CheckpointError(f"checkpoint directory not found: {d}")
        d = whole
    if not d.is_dir():
        raise CheckpointError(f"checkpoint path is not a directory: {d}")
    raw = {name: _read_bytes(d / name) for name in (META_FILE, STATE_FILE)}
    meta, sums = _parse_meta(d / META_FILE, raw[META_FILE])
    reader = _open_state(d / STATE_FILE, raw[STATE_FILE])
    if set(reader.specs) != set(sums):
        missing = sorted(set(sums) - set(reader.specs))
        extra = sorted(set(reader.specs) - set(sums))
        raise CheckpointError(
            f"{d / STATE_FILE} does not hold the arrays {META_FILE} lists "
            f"({len(missing)} missing: {_listing(missing)}; {len(extra)} unlisted: "
            f"{_listing(extra)})")
    digest = hashlib.sha256(raw[META_FILE] + raw[STATE_FILE]).hexdigest()
    return Checkpoint(d, meta, reader.specs, digest, reader, sums)


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, meta)`` of a checkpoint written by :func:`save_checkpoint`, all checked.

    Raises:
        CheckpointError: as :func:`read_checkpoint`, or an array does not match its CRC-32
            or checksum.
    """
    ckpt = read_checkpoint(directory)
    return ckpt.arrays(), ckpt.meta


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _parse_meta(path: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """``(meta without checksums, array checksums)``, the meta checksum verified."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 (invalid byte at offset {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {_one_line(exc)}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(meta).__name__}")
    checksums = meta.pop(CHECKSUMS, None)
    sums = checksums.get("arrays") if isinstance(checksums, dict) else None
    if not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise CheckpointError(f"{path} has no valid {CHECKSUMS!r} entry (it is corrupted, or "
                              "was not written by save_checkpoint)")
    if checksums.get("meta") != meta_checksum(meta, sums):
        raise CheckpointError(f"{path} does not match its checksum: it was edited or is "
                              "corrupted")
    return meta, sums


def _open_state(path: Path, raw: bytes) -> NpzReader:
    head = raw[:4]
    if head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path} contains pickled objects; refusing to load")
    if head not in _ZIP_MAGIC:
        raise CheckpointError(f"{path} is not an .npz (zip) archive; it is corrupted")
    try:
        return NpzReader(raw)
    except NpzError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------


def _listing(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _spec(x: Any) -> ArraySpec:
    """An ArraySpec of an array (shape, dtype), a spec, or a bare shape (any dtype)."""
    if isinstance(x, ArraySpec):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return ArraySpec(tuple(x.shape), np.dtype(x.dtype))
    return ArraySpec(tuple(x), None)


def check_state(expected: Mapping[str, Any], found: Mapping[str, Any],
                what: str = "model") -> None:
    """Check that ``found`` has exactly the names of ``expected``, with the expected shapes
    and, where both sides name one, dtypes.

    Either side maps names to arrays, :class:`~mpipar.npz.ArraySpec` s, or (``expected``)
    bare shapes; comparing specs read from the headers checks a checkpoint before any of its
    data is read.

    Raises:
        CheckpointError: one line counting and naming (the first few) missing keys,
            unexpected keys, wrong shapes and wrong dtypes, e.g.
            ``model state does not match the checkpoint: 1 missing (h.0.bias); 1 wrong shape
            (wte: expected (65, 64), found (64, 64))``.
    """
    exp = {k: _spec(v) for k, v in expected.items()}
    got = {k: _spec(v) for k, v in found.items()}
    both = sorted(k for k in exp if k in got)
    wrong_shape = [f"{k}: expected {exp[k].shape}, found {got[k].shape}" for k in both
                   if exp[k].shape != got[k].shape]
    wrong_dtype = [f"{k}: expected {exp[k].dtype}, found {got[k].dtype}" for k in both
                   if None not in (exp[k].dtype, got[k].dtype) and exp[k].dtype != got[k].dtype]
    problems = [
        f"{len(items)} {label}{'s' if plural and len(items) > 1 else ''} ({_listing(items)})"
        for label, plural, items in (
            ("missing", False, sorted(k for k in exp if k not in got)),
            ("unexpected", False, sorted(k for k in got if k not in exp)),
            ("wrong shape", True, wrong_shape),
            ("wrong dtype", True, wrong_dtype),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"{what} state does not match the checkpoint: " + "; ".join(problems))


def pack_state(model_state: Mapping[str, Any], opt_state: Mapping[str, Any]) -> dict[str, Any]:
    """One flat dict for ``state.npz``: ``model.<parameter name>``, ``optim.<state key>``."""
    arrays = {MODEL_PREFIX + name: a for name, a in model_state.items()}
    arrays.update({OPTIM_PREFIX + key: a for key, a in opt_state.items()})
    return arrays


def unpack_state(arrays: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inverse of :func:`pack_state`: ``(model_state, opt_state)``; other names are left."""
    model = {k.removeprefix(MODEL_PREFIX): a for k, a in arrays.items()
             if k.startswith(MODEL_PREFIX)}
    optim = {k.removeprefix(OPTIM_PREFIX): a for k, a in arrays.items()
             if k.startswith(OPTIM_PREFIX)}
    return model, optim
