"""Checkpoint directories: named arrays in ``state.npz``, everything else in ``meta.json``.

A checkpoint is a directory holding exactly two files:

* ``state.npz`` -- a zip of ``.npy`` members, one per named array (parameters, optimizer
  moments, ...), the layout ``np.savez`` writes and ``np.load`` reads;
* ``meta.json`` -- plain JSON: step, configuration, vocabulary, anything that is not an array.

Writing is atomic: both files go into a fresh hidden sibling directory, are flushed to disk,
and only then is that directory renamed to the requested name, so a crash mid-save never leaves
a half-written checkpoint under that name. Reading never unpickles: a file that would need
``pickle`` (which can run arbitrary code) is refused.

What ``train.py`` saves is the state of the 1-process run, whatever the layout that trained
it: ``model.<parameter name>`` for every parameter and ``optim.<state key>`` for every
optimizer state array (:func:`pack_state`, :func:`unpack_state`). Gathering that full state
from the shards of a parallel layout, and cutting it back into the shards of another, is
:mod:`mpipar.parallel.full_state`; checking that a checkpoint fits the run about to resume
from it is :func:`check_resume`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpipar.backend import to_numpy
from mpipar.model import GPT, GPTConfig
from mpipar.optim import SGD, AdamW

if TYPE_CHECKING:
    from mpipar.training import TrainConfig

STATE_FILE = "state.npz"
META_FILE = "meta.json"
MODEL_PREFIX = "model."  # + parameter name
OPTIM_PREFIX = "optim."  # + optimizer state key

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip
_PICKLE_MAGIC = b"\x80"  # pickle protocols 2 and later start with the PROTO opcode


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read, or used; the message is one line."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk before we rename on top of it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename still works
        pass
    finally:
        os.close(fd)


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz``: member ``<name>.npy`` per array.

    Written member by member rather than with ``np.savez(path, **arrays)`` so that any string
    is a valid array name (``np.savez`` reserves its own keyword names) and so that
    ``allow_pickle=False`` applies on this side too.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)


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

    Steps: serialise ``meta`` and check every array first (a bad input writes nothing); write
    ``state.npz`` and ``meta.json`` into a new hidden sibling ``.<name>.tmp-*`` and fsync them;
    then rename it to ``directory``. An existing checkpoint there is first renamed aside and
    deleted only after the new one is in place: if the process dies between those two renames,
    both complete copies remain on disk (the old one as ``.<name>.old-*``).

    Raises:
        CheckpointError: ``meta`` is not JSON-serialisable, an array name is not a non-empty
            string, an array holds Python objects, or ``directory`` exists and holds anything
            besides checkpoint files (it is never deleted then).
    """
    target = Path(directory)
    if target.exists() and not _is_checkpoint_dir(target):
        raise CheckpointError(
            f"{target} exists and is not a checkpoint directory; refusing to replace it"
        )
    try:
        meta_text = json.dumps(dict(meta), indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint meta for {target} is not JSON-serialisable: {_one_line(exc)}"
        ) from exc
    host = _host_arrays(arrays)

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        _write_npz(tmp / STATE_FILE, host)
        (tmp / META_FILE).write_text(meta_text + "\n", encoding="utf-8")
        for f in (tmp / STATE_FILE, tmp / META_FILE, tmp):
            _fsync_path(f)
        if target.exists():
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)  # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of ``path``, refusing pickles and reporting corruption as CheckpointError."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path} contains pickled objects; refusing to load")
    if head not in _ZIP_MAGIC:
        raise CheckpointError(f"{path} is not an .npz (zip) archive; it is corrupted")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is corrupted: {_one_line(exc)}") from exc
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as exc:
                if "pickle" in str(exc).lower() or "object array" in str(exc).lower():
                    raise CheckpointError(
                        f"{path} contains pickled objects (array {name!r}); refusing to load"
                    ) from exc
                raise CheckpointError(
                    f"{path} is corrupted (array {name!r}): {_one_line(exc)}"
                ) from exc
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise CheckpointError(
                    f"{path} is corrupted (array {name!r}): {_one_line(exc)}"
                ) from exc
    return arrays


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(arrays, meta)``.

    Arrays come back as numpy arrays with the names they were saved under.

    Raises:
        CheckpointError: the directory or one of its files is missing, ``state.npz`` is
            corrupted or holds pickled objects, or ``meta.json`` is not a JSON object.
    """
    d = Path(directory)
    if not d.exists():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    if not d.is_dir():
        raise CheckpointError(f"checkpoint path is not a directory: {d}")
    state_path, meta_path = d / STATE_FILE, d / META_FILE
    for f in (state_path, meta_path):
        if not f.is_file():
            raise CheckpointError(f"checkpoint file missing: {f}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{meta_path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"{meta_path} is not UTF-8 (invalid byte at offset {exc.start})"
        ) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} must hold a JSON object, found {type(meta).__name__}")
    return _read_npz(state_path), meta


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------


def _listing(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_state(
    expected: Mapping[str, tuple], arrays: Mapping[str, object], what: str = "model"
) -> None:
    """Check that ``arrays`` has exactly the names of ``expected``, with the expected shapes.

    Raises:
        CheckpointError: one line counting and naming (the first few) missing keys,
            unexpected keys and wrong shapes, e.g.
            ``model state does not match the checkpoint: 1 missing (h.0.bias); 1 wrong shape
            (wte: expected (65, 64), found (64, 64))``.
    """
    missing = sorted(k for k in expected if k not in arrays)
    unexpected = sorted(k for k in arrays if k not in expected)
    wrong = [
        f"{k}: expected {tuple(expected[k])}, found {tuple(np.shape(arrays[k]))}"
        for k in sorted(expected)
        if k in arrays and tuple(np.shape(arrays[k])) != tuple(expected[k])
    ]
    problems = [
        f"{len(items)} {label} ({_listing(items)})"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape" if len(wrong) == 1 else "wrong shapes", wrong),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"{what} state does not match the checkpoint: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# The state of a training run
# --------------------------------------------------------------------------------------------


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


def model_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The full shape of every parameter of the 1-process model of ``cfg``, by name."""
    return {name: tuple(p.shape) for name, p in GPT(cfg).named_parameters()}


def check_resume(arrays: Mapping[str, Any], meta: Mapping[str, Any], cfg: GPTConfig,
                 tc: TrainConfig) -> None:
    """A checkpoint must be of this model, with this run's optimizer, at a step before the end.

    Checked before any process talks to another: the model configuration in ``meta.json``
    equals ``cfg``, the arrays have exactly the names and full shapes of the 1-process model
    and of a fresh optimizer of ``tc``'s kind, and the step is in ``[0, tc.steps]``.

    Raises:
        CheckpointError: one line naming the first mismatch.
    """
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError("checkpoint meta.json has no 'model' section")
    for key, value in cfg.to_dict().items():
        if saved.get(key) != value:
            raise CheckpointError(f"checkpoint was saved with {key}={saved.get(key)!r} but this "
                                  f"run has {key}={value!r}")
    model_state, opt_state = unpack_state(arrays)
    model = GPT(cfg)
    check_state({n: tuple(p.shape) for n, p in model.named_parameters()}, model_state,
                what="model")
    # A fresh optimizer of this run's kind holds every state array, zeroed (ZeRO's state is
    # saved in AdamW's keys and shapes).
    if tc.optimizer == "sgd":
        fresh = SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum)
    else:
        fresh = AdamW(model.parameters(), lr=tc.lr)
    check_state({k: v.shape for k, v in fresh.state_dict().items()}, opt_state,
                what="optimizer")
    step = meta.get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint meta.json has a bad step {step!r}")
    if step > tc.steps:
        raise CheckpointError(f"checkpoint is at step {step}, past --steps {tc.steps}")


# Settings that change the numbers a resumed run computes (layout-only options do not).
RESUME_SENSITIVE = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                    "grad_clip", "seed", "optimizer", "momentum", "beta1", "beta2", "eps",
                    "precision")


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """``"lr 0.003 -> 0.01, ..."`` for every resume-sensitive setting that changed."""
    return ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in RESUME_SENSITIVE
                     if k in saved and saved[k] != now[k])
