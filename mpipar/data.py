"""Text data: a corpus, a character tokenizer, and the batches every parallel layout agrees on.

The golden rule of mpipar (every layout reproduces the 1-process run) starts here. The global
batch of step ``s`` is a pure function of ``(seed, s)``: its start offsets come from
``np.random.default_rng([seed, s])``. No generator state is carried from step to step, so

* every rank, whatever its (dp, tp, pp) coordinates, computes the same global batch and then
  takes its own slice of it (:func:`shard_rows`, then :func:`split_microbatches`);
* a run resumed at step ``s`` sees exactly the batches it would have seen, without saving any
  random-number-generator state in the checkpoint.

Token arrays live on the host (numpy); the training loop moves each rank's slice to the device.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpipar.backend import to_numpy

# Evaluation draws use a three-word seed, training draws a two-word one, so the two streams of
# start offsets are unrelated; the middle word is a step number no run will ever reach.
_EVAL_STREAM = 2**31 - 1


class DataError(ValueError):
    """A corpus or batch request that cannot be used; the message is one line naming the source."""


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, refusing anything a character model could not sensibly learn.

    A leading UTF-8 byte-order mark is dropped (it is an encoding marker, not text). Files that
    are empty or hold only whitespace are rejected: a vocabulary of blanks trains a model that
    can only print blanks, which is far more likely a wrong path than an intent.

    Raises:
        DataError: the path is missing or a directory, the file cannot be read, is empty,
            is whitespace only, or is not valid UTF-8 (the message gives the byte offset).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if p.is_dir():
        raise DataError(f"data path is a directory, not a text file: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {p}: {exc.strerror or exc}") from exc
    if not raw:
        raise DataError(f"data file is empty: {p}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file is not UTF-8 text: {p} (invalid byte 0x{raw[exc.start]:02x} "
            f"at byte offset {exc.start}: {exc.reason})"
        ) from exc
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"data file contains only whitespace ({len(raw)} bytes): {p}")
    return text


def default_corpus() -> tuple[str, str]:
    """The built-in corpus: the Python documentation topics shipped with the standard library.

    ``pydoc_data.topics.topics`` maps a help topic (``"assignment"``, ``"if"``, ...) to a few
    pages of English reference prose. Its values are concatenated in sorted key order, so the
    text is the same on every run of a given Python version, needs no download, and is already
    installed wherever mpipar is. (About half a million characters on CPython 3.11.)

    Returns:
        ``(text, description)``; the description names the source and its size.

    Raises:
        DataError: this Python was built without ``pydoc_data`` (some minimal distributions).
    """
    try:
        from pydoc_data.topics import topics  # noqa: PLC0415  (only needed without --data)
    except ImportError as exc:
        raise DataError(
            "built-in corpus unavailable: this Python has no pydoc_data.topics module; "
            "pass --data FILE with any UTF-8 text"
        ) from exc
    keys = sorted(topics)
    text = "".join(topics[k] for k in keys)
    version = ".".join(str(v) for v in sys.version_info[:3])
    description = (
        f"built-in corpus: Python {version} pydoc topics "
        f"({len(keys)} topics, {len(text):,} characters, {len(set(text))} distinct)"
    )
    return text, description


def text_digest(text: str) -> str:
    """SHA-256 (hex) of ``text`` as UTF-8: what a checkpoint records of the text it was trained
    on, and what ranks compare at start-up to know that they read the same text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character: id ``i`` is ``chars[i]``.

    ``from_text`` takes the sorted set of characters of a corpus, so the vocabulary (and with it
    the embedding table) is determined by the text alone. A checkpoint stores ``to_json()`` so a
    resumed or sampling run decodes with exactly the vocabulary it was trained with.
    """

    def __init__(self, chars: Sequence[str]):
        chars = tuple(chars)
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise DataError(f"vocabulary entry {i} is {c!r}, not a single character")
        if len(set(chars)) != len(chars):
            dups = sorted({c for c in chars if chars.count(c) > 1})
            raise DataError(f"vocabulary repeats characters: {dups[:5]!r}")
        if not chars:
            raise DataError("vocabulary is empty")
        self.chars: tuple[str, ...] = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of ``text``: its distinct characters in code-point order."""
        if not text:
            raise DataError("cannot build a vocabulary from empty text")
        return cls(sorted(set(text)))

    @classmethod
    def from_chars(cls, chars: Sequence[str]) -> CharTokenizer:
        """Rebuild a tokenizer from ``to_json()`` output (keeps the stored order)."""
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens (rows of the embedding table)."""
        return len(self.chars)

    def encode(self, s: str) -> np.ndarray:
        """Map ``s`` to an int32 array of ids, shape ``(len(s),)``.

        Raises:
            DataError: a character of ``s`` is not in the vocabulary (names it and its position).
        """
        try:
            return np.fromiter((self._index[c] for c in s), dtype=np.int32, count=len(s))
        except KeyError:
            pos = next(i for i, c in enumerate(s) if c not in self._index)
            raise DataError(
                f"character {s[pos]!r} at position {pos} is not in the vocabulary "
                f"of {self.vocab_size} characters"
            ) from None

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Map ids back to text; ``decode(encode(s)) == s``.

        Raises:
            DataError: an id is outside ``[0, vocab_size)`` (negative ids are not wrapped).
        """
        if not hasattr(ids, "shape"):  # a list, tuple or generator of ints
            ids = list(ids)
        arr = np.asarray(to_numpy(ids)).reshape(-1)
        if arr.size and arr.dtype.kind not in "iu":
            raise DataError(f"token ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            raise DataError(
                f"token id {int(arr[bad[0]])} at position {int(bad[0])} is outside the "
                f"vocabulary [0, {self.vocab_size})"
            )
        return "".join(self.chars[i] for i in arr.tolist())

    def to_json(self) -> list[str]:
        """The vocabulary as a JSON-friendly list of one-character strings."""
        return list(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------
# Train / validation split
# --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """A tokenized corpus split into a training prefix and a validation suffix."""

    train: np.ndarray  # (N_train,) int32 token ids
    val: np.ndarray  # (N_val,) int32 token ids
    tokenizer: CharTokenizer


def make_dataset(
    text: str,
    tokenizer: CharTokenizer,
    val_fraction: float = 0.1,
    *,
    seq_len: int,
    source: str = "text",
) -> Dataset:
    """Tokenize ``text`` and split it: the first ``floor(N·(1 − val_fraction))`` tokens train,
    the rest validate.

    A contiguous split (not a shuffled one) keeps validation text unseen: windows of the two
    splits never overlap. Each split must hold at least ``seq_len + 1`` tokens, because a
    training example is a window of ``seq_len`` inputs plus the one extra target.

    Args:
        source: how to name the text in error messages (a file path, "built-in corpus").

    Raises:
        DataError: ``val_fraction`` not in (0, 1), or a split is too short (quotes the lengths).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction} for {source}")
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len} for {source}")
    ids = tokenizer.encode(text)
    n_train = int(len(ids) * (1.0 - val_fraction))
    train, val = ids[:n_train], ids[n_train:]
    need = seq_len + 1
    for name, split in (("train", train), ("validation", val)):
        if len(split) < need:
            raise DataError(
                f"{source}: {name} split has {len(split)} tokens (of {len(ids)} total, "
                f"val_fraction {val_fraction}) but seq_len {seq_len} needs at least {need}"
            )
    return Dataset(train=train, val=val, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _windows(
    tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random windows of ``seq_len + 1`` tokens, split into inputs and targets."""
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    n_starts = len(tokens) - seq_len  # a window starting at i reads tokens[i : i + seq_len + 1]
    if n_starts < 1:
        raise DataError(
            f"token array of length {len(tokens)} is too short for seq_len {seq_len} "
            f"(needs at least {seq_len + 1})"
        )
    starts = rng.integers(0, n_starts, size=batch_size)  # (B,)
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    window = np.asarray(tokens)[idx].astype(np.int64)  # (B, T+1)
    x = np.ascontiguousarray(window[:, :-1])  # (B, T)
    y = np.ascontiguousarray(window[:, 1:])  # (B, T): y[b, t] is the token after x[b, t]
    return x, y


def _check_seed(**words: int) -> None:
    for name, value in words.items():
        if int(value) < 0:
            raise DataError(f"{name} must be non-negative for the batch generator, got {value}")


def get_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of training step ``step``: ``(x, y)``, int64 arrays of shape (B, T).

    Row ``b`` is the window ``tokens[s_b : s_b + T + 1]`` split as ``x = window[:-1]``,
    ``y = window[1:]``, with start offsets ``s_b ~ Uniform{0, ..., N − T − 1}`` drawn from
    ``default_rng([seed, step])``. The result depends on nothing but the arguments: not on the
    rank, the parallel layout, or how many batches were drawn before.
    """
    _check_seed(seed=seed, step=step)
    return _windows(tokens, np.random.default_rng([int(seed), int(step)]), batch_size, seq_len)


def eval_batches(
    tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed list of ``n_batches`` evaluation batches, each ``(x, y)`` of shape (B, T).

    Batch ``i`` uses ``default_rng([seed, 2**31 − 1, i])``: the same batches at every
    evaluation (so validation losses are comparable over a run and across layouts), and a
    stream separate from the training draws.
    """
    _check_seed(seed=seed)
    return [
        _windows(tokens, np.random.default_rng([int(seed), _EVAL_STREAM, i]), batch_size, seq_len)
        for i in range(n_batches)
    ]


def shard_rows(x, rank: int, n: int):
    """Rows ``[rank·B/n, (rank+1)·B/n)`` of ``x``: the data-parallel shard of rank ``rank``.

    Contiguous row blocks (rather than strided rows) keep each shard a view, and concatenating
    the shards in rank order gives back the global batch.

    Raises:
        ValueError: ``B`` is not divisible by ``n``, or ``rank`` is not in ``[0, n)``.
    """
    if n < 1 or not 0 <= rank < n:
        raise ValueError(f"rank {rank} is not in [0, {n}) for {n} shards")
    rows = x.shape[0]
    if rows % n:
        raise ValueError(
            f"batch of {rows} rows does not split into {n} equal data-parallel shards "
            f"({rows} % {n} = {rows % n})"
        )
    per = rows // n
    return x[rank * per : (rank + 1) * per]


def split_microbatches(x, m: int) -> list:
    """Split ``x`` along its rows into ``m`` equal microbatches (views), in order.

    Raises:
        ValueError: the number of rows is not divisible by ``m``.
    """
    if m < 1:
        raise ValueError(f"number of microbatches must be at least 1, got {m}")
    rows = x.shape[0]
    if rows % m:
        raise ValueError(
            f"{rows} rows do not split into {m} equal microbatches ({rows} % {m} = {rows % m})"
        )
    per = rows // m
    return [x[i * per : (i + 1) * per] for i in range(m)]
