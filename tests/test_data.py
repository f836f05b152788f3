"""Corpus loading, the character tokenizer, and batches that depend only on (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.data import (
    CharTokenizer,
    DataError,
    default_corpus,
    eval_batches,
    get_batch,
    load_text,
    make_dataset,
    shard_rows,
    split_microbatches,
)

# Token id i at position i: a window's values then say exactly where it was cut from.
RAMP = np.arange(1000, dtype=np.int32)


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, f"error message spans lines: {msg!r}"
    return msg


# --------------------------------------------------------------------------------------------
# load_text
# --------------------------------------------------------------------------------------------


def test_load_text_reads_utf8_and_drops_bom(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("\ufeffhéllo\nwörld\n".encode())
    assert load_text(f) == "héllo\nwörld\n"


def test_load_text_missing_file(tmp_path):
    f = tmp_path / "nope.txt"
    with pytest.raises(DataError) as e:
        load_text(f)
    msg = _one_line_error(e)
    assert "not found" in msg and str(f) in msg


def test_load_text_directory(tmp_path):
    with pytest.raises(DataError) as e:
        load_text(tmp_path)
    msg = _one_line_error(e)
    assert "directory" in msg and str(tmp_path) in msg


def test_load_text_empty(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_text(f)
    msg = _one_line_error(e)
    assert "empty" in msg and str(f) in msg


def test_load_text_whitespace_only_is_rejected(tmp_path):
    f = tmp_path / "blank.txt"
    f.write_bytes(b" \n\t\n  ")
    with pytest.raises(DataError) as e:
        load_text(f)
    msg = _one_line_error(e)
    assert "whitespace" in msg and str(f) in msg


def test_load_text_not_utf8_gives_byte_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"abc\ndef\xff tail")  # 0xff can never appear in UTF-8
    with pytest.raises(DataError) as e:
        load_text(f)
    msg = _one_line_error(e)
    assert "UTF-8" in msg and "offset 7" in msg and "0xff" in msg and str(f) in msg


# --------------------------------------------------------------------------------------------
# Built-in corpus
# --------------------------------------------------------------------------------------------


def test_default_corpus_is_deterministic_english_text():
    text, desc = default_corpus()
    text2, desc2 = default_corpus()
    assert text == text2 and desc == desc2
    assert len(text) > 100_000, f"built-in corpus is only {len(text)} characters"
    assert f"{len(text):,}" in desc
    # Real prose: the most common English words are all there.
    for word in (" the ", " and ", " of ", " is "):
        assert word in text
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


# --------------------------------------------------------------------------------------------
# CharTokenizer
# --------------------------------------------------------------------------------------------


def test_tokenizer_vocabulary_is_sorted_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == (" ", "d", "e", "h", "l", "o", "r", "w")
    assert tok.vocab_size == 8


def test_tokenizer_round_trip_and_dtype():
    text = "To be, or not to be: ünïcödé ✓\n"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.decode(ids.astype(np.int64)[None, :]) == text  # any integer array, any shape
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_tokenizer_unknown_character_names_it():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError) as e:
        tok.encode("abcaZb")
    msg = _one_line_error(e)
    assert "'Z'" in msg and "position 4" in msg and "3 characters" in msg


@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_tokenizer_decode_rejects_out_of_range_ids(bad):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError) as e:
        tok.decode([0, bad, 1])
    msg = _one_line_error(e)
    assert f"token id {bad} at position 1" in msg


def test_tokenizer_json_round_trip():
    tok = CharTokenizer.from_text("the quick brown fox")
    chars = tok.to_json()
    assert isinstance(chars, list) and all(isinstance(c, str) for c in chars)
    tok2 = CharTokenizer.from_chars(chars)
    assert tok2.chars == tok.chars
    s = "quick fox"
    np.testing.assert_array_equal(tok2.encode(s), tok.encode(s))


@pytest.mark.parametrize("chars", [["a", "a"], ["ab"], [], ["a", 3]])
def test_tokenizer_rejects_bad_vocabularies(chars):
    with pytest.raises(DataError):
        CharTokenizer.from_chars(chars)


# --------------------------------------------------------------------------------------------
# Dataset split
# --------------------------------------------------------------------------------------------


def test_make_dataset_splits_90_10_in_order():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    tok = CharTokenizer.from_text(text)
    ds = make_dataset(text, tok, seq_len=8)
    assert len(ds.train) == 900 and len(ds.val) == 100
    assert ds.train.dtype == np.int32 and ds.val.dtype == np.int32
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), tok.encode(text))
    assert ds.tokenizer is tok


def test_make_dataset_too_short_quotes_lengths():
    text = "abcdefghij" * 5  # 50 tokens: 45 train, 5 validation
    tok = CharTokenizer.from_text(text)
    make_dataset(text, tok, seq_len=4)  # both splits hold >= 5 tokens
    with pytest.raises(DataError) as e:
        make_dataset(text, tok, seq_len=5, source="tiny.txt")
    msg = _one_line_error(e)
    assert "tiny.txt" in msg and "validation split has 5 tokens" in msg
    assert "seq_len 5" in msg and "at least 6" in msg
    with pytest.raises(DataError) as e:
        make_dataset(text, tok, 0.95, seq_len=4)  # train = 2 tokens
    assert "train split has 2 tokens" in _one_line_error(e)


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1])
def test_make_dataset_rejects_bad_val_fraction(frac):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError):
        make_dataset("abc" * 100, tok, frac, seq_len=4)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def test_get_batch_shapes_and_shift():
    x, y = get_batch(RAMP, batch_size=6, seq_len=16, seed=0, step=0)
    assert x.shape == y.shape == (6, 16)
    assert x.dtype == y.dtype == np.int64
    # On the ramp a window is start + [0..T]; y is x shifted by one.
    np.testing.assert_array_equal(x - x[:, :1], np.broadcast_to(np.arange(16), (6, 16)))
    np.testing.assert_array_equal(y, x + 1)


def test_get_batch_depends_only_on_seed_and_step():
    reference = get_batch(RAMP, 8, 16, seed=3, step=5)
    # Other draws before, in between, and with other sizes do not change step 5's batch.
    for s in range(5):
        get_batch(RAMP, 8, 16, seed=3, step=s)
    np.random.seed(123)  # the legacy global generator is not involved either
    np.random.rand(7)
    again = get_batch(RAMP, 8, 16, seed=3, step=5)
    for a, b in zip(reference, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other_step = get_batch(RAMP, 8, 16, seed=3, step=6)[0]
    other_seed = get_batch(RAMP, 8, 16, seed=4, step=5)[0]
    assert not np.array_equal(reference[0], other_step)
    assert not np.array_equal(reference[0], other_seed)


def test_get_batch_uses_every_valid_start_and_never_reads_past_the_end():
    T = 4
    tokens = RAMP[: T + 3]  # starts 0, 1, 2 are the only windows with a target
    starts = set()
    for step in range(200):
        x, y = get_batch(tokens, 4, T, seed=0, step=step)
        assert y.max() <= len(tokens) - 1
        starts.update(x[:, 0].tolist())
    assert starts == {0, 1, 2}


def test_get_batch_too_short_and_bad_seed():
    with pytest.raises(DataError) as e:
        get_batch(RAMP[:8], 2, 8, seed=0, step=0)
    msg = _one_line_error(e)
    assert "length 8" in msg and "seq_len 8" in msg
    with pytest.raises(DataError):
        get_batch(RAMP, 2, 8, seed=-1, step=0)


def test_eval_batches_are_fixed_and_separate_from_training_draws():
    a = eval_batches(RAMP, 4, 8, 16, seed=1)
    b = eval_batches(RAMP, 4, 8, 16, seed=1)
    assert len(a) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(ya, xa + 1)
    train_xs = [get_batch(RAMP, 8, 16, seed=1, step=s)[0] for s in range(50)]
    for x, _ in a:
        assert not any(np.array_equal(x, t) for t in train_xs)
    assert not np.array_equal(a[0][0], a[1][0])


def test_shards_and_microbatches_reassemble_the_global_batch():
    x, _ = get_batch(RAMP, batch_size=12, seq_len=8, seed=0, step=2)
    dp, m = 3, 2
    pieces = []
    for r in range(dp):
        shard = shard_rows(x, r, dp)
        assert shard.shape == (4, 8) and np.shares_memory(shard, x)
        mbs = split_microbatches(shard, m)
        assert [mb.shape for mb in mbs] == [(2, 8), (2, 8)]
        assert all(np.shares_memory(mb, x) for mb in mbs)
        pieces.extend(mbs)
    np.testing.assert_array_equal(np.concatenate(pieces), x)


def test_shard_and_split_errors_quote_numbers():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError) as e:
        shard_rows(x, 0, 4)
    assert "10 rows" in str(e.value) and "4" in str(e.value)
    with pytest.raises(ValueError) as e:
        shard_rows(x, 2, 2)
    assert "rank 2" in str(e.value)
    with pytest.raises(ValueError) as e:
        split_microbatches(x, 3)
    assert "10 rows" in str(e.value) and "3 equal microbatches" in str(e.value)
    with pytest.raises(ValueError):
        split_microbatches(x, 0)
