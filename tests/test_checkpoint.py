"""Checkpoint files: round trip, atomic replacement, refusing pickles, clear errors; the
names of a run's state in them, and which rank writes which part of the full state."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

import mpipar.checkpoint as ckpt
from mpipar.checkpoint import (
    CheckpointError,
    check_state,
    load_checkpoint,
    pack_state,
    save_checkpoint,
    unpack_state,
)
from mpipar.nn import Init, Parameter
from mpipar.npz import ArraySpec
from mpipar.parallel.full_state import owns, writes_full_state


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.wte": rng.standard_normal((7, 4)).astype(np.float32),
        "model.h.0.bias": rng.standard_normal(4),
        "adamw.step": np.array(12, dtype=np.int64),
        "tokens": np.arange(5, dtype=np.int32),
        "file": np.ones(2),  # a name np.savez would reserve for itself
    }


def _meta() -> dict:
    return {"step": 12, "config": {"n_layer": 2, "d_model": 4}, "vocab": ["a", "b", "é"]}


def _msg(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, f"error message spans lines: {msg!r}"
    return msg


def test_round_trip_keeps_values_dtypes_and_meta(tmp_path):
    arrays = _arrays()
    save_checkpoint(tmp_path / "ck", arrays, _meta())
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta == _meta()
    assert sorted(loaded) == sorted(arrays)
    for k, a in arrays.items():
        assert loaded[k].dtype == a.dtype and loaded[k].shape == a.shape, k
        np.testing.assert_array_equal(loaded[k], a, err_msg=k)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["meta.json", "state.npz"]
    # Readable by plain numpy too: the archive is an ordinary .npz.
    with np.load(tmp_path / "ck" / "state.npz") as z:
        np.testing.assert_array_equal(z["tokens"], arrays["tokens"])


def test_replace_existing_checkpoint_leaves_no_temporaries(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, _arrays(0), {"step": 1})
    save_checkpoint(target, _arrays(1), {"step": 2})
    loaded, meta = load_checkpoint(target)
    assert meta == {"step": 2}
    np.testing.assert_array_equal(loaded["model.wte"], _arrays(1)["model.wte"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    save_checkpoint(target, _arrays(0), {"step": 1})

    def crash(path, arrays):  # dies after writing part of the archive
        path.write_bytes(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_npz", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, _arrays(1), {"step": 2})
    loaded, meta = load_checkpoint(target)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(loaded["model.wte"], _arrays(0)["model.wte"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_bad_inputs_write_nothing(tmp_path):
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path / "ck", _arrays(), {"step": object()})
    assert "not JSON-serialisable" in _msg(e)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path / "ck", {"bad": np.array([1, "x", None], dtype=object)}, {})
    assert "'bad'" in _msg(e) and "Python objects" in _msg(e)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_something_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(precious, _arrays(), {})
    assert "refusing to replace" in _msg(e) and str(precious) in _msg(e)
    assert (precious / "thesis.tex").read_text() == "do not delete"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(CheckpointError):
        save_checkpoint(a_file, _arrays(), {})


def _write_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_refuses_object_arrays(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, _arrays(), _meta())
    _write_zip(
        target / "state.npz",
        {
            "ok.npy": _npy_bytes(np.zeros(3)),
            "evil.npy": _npy_bytes(np.array([{"run": "code"}], dtype=object)),
        },
    )
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    msg = _msg(e)
    assert "contains pickled objects" in msg and "refusing to load" in msg
    assert "state.npz" in msg and "'evil'" in msg


def test_refuses_a_raw_pickle(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, _arrays(), _meta())
    (target / "state.npz").write_bytes(pickle.dumps({"w": np.zeros(2)}, protocol=4))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    assert "contains pickled objects; refusing to load" in _msg(e)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupted_archive_names_the_file(tmp_path, damage):
    target = tmp_path / "ck"
    save_checkpoint(target, {"w": np.arange(4096, dtype=np.float64)}, {})
    path = target / "state.npz"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "garbage":
        path.write_bytes(b"this is not a zip archive at all")
    else:  # flip a byte inside the array data: the zip CRC check catches it
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    msg = _msg(e)
    assert str(path) in msg and "corrupted" in msg


def test_missing_directory_or_files(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "nowhere")
    assert "not found" in _msg(e) and "nowhere" in _msg(e)
    target = tmp_path / "ck"
    save_checkpoint(target, _arrays(), _meta())
    (target / "meta.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    assert "missing" in _msg(e) and "meta.json" in _msg(e)


def test_bad_meta_json(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, _arrays(), _meta())
    (target / "meta.json").write_text('{"step": 3,\n "lr": }')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    msg = _msg(e)
    assert "meta.json" in msg and "not valid JSON" in msg and "line 2" in msg
    (target / "meta.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    assert "JSON object" in _msg(e)


def test_meta_json_must_match_its_checksum(tmp_path):
    """A hand edit that keeps valid JSON (a step, a learning rate) is refused too."""
    target = tmp_path / "ck"
    save_checkpoint(target, _arrays(), _meta())
    text = (target / "meta.json").read_text()
    (target / "meta.json").write_text(text.replace('"step": 12', '"step": 13'))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    assert "meta.json does not match its checksum" in _msg(e)
    (target / "meta.json").write_text(json.dumps(_meta()))  # no checksums at all
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    assert "no valid 'checksums' entry" in _msg(e)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path / "other", _arrays(), {"checksums": {}})
    assert "reserved" in _msg(e)


def test_check_state_compares_dtypes_where_both_sides_give_one():
    expected = {"a": ArraySpec((2, 3), np.dtype(np.float32)), "b": (4,)}
    check_state(expected, {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.int8)})
    with pytest.raises(CheckpointError) as e:
        check_state(expected, {"a": ArraySpec((2, 3), np.dtype(np.float16)), "b": np.zeros(4)})
    assert _msg(e).endswith("1 wrong dtype (a: expected float32, found float16)")


def test_check_state_accepts_a_match():
    arrays = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
    check_state({"a": (2, 3), "b": (4,)}, arrays)


def test_check_state_names_missing_unexpected_and_wrong_shapes():
    expected = {f"h.{i}.w": (4, 4) for i in range(6)} | {"wte": (65, 8)}
    arrays = {"h.0.w": np.zeros((4, 4)), "wte": np.zeros((64, 8)), "extra": np.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        check_state(expected, arrays, what="optimizer")
    msg = _msg(e)
    assert msg.startswith("optimizer state does not match the checkpoint")
    assert "5 missing (h.1.w, h.2.w, h.3.w and 2 more)" in msg
    assert "1 unexpected (extra)" in msg
    assert "1 wrong shape (wte: expected (65, 8), found (64, 8))" in msg


# --------------------------------------------------------------------------------------------
# The state of a run
# --------------------------------------------------------------------------------------------


def test_pack_and_unpack_state_are_inverse():
    model = {"wte.weight": np.ones((3, 2)), "h.0.ln_1.bias": np.zeros(2)}
    optim = {"adamw.m.wte.weight": np.ones((3, 2)), "adamw.step": np.array(4)}
    arrays = pack_state(model, optim)
    assert sorted(arrays) == ["model.h.0.ln_1.bias", "model.wte.weight", "optim.adamw.m.wte.weight",
                              "optim.adamw.step"]
    model_back, optim_back = unpack_state({**arrays, "other": np.zeros(1)})
    for back, state in ((model_back, model), (optim_back, optim)):
        assert sorted(back) == sorted(state)
        assert all(back[k] is state[k] for k in state)


def _grid(tp_rank: int, dp_rank: int, pp_rank: int, pp: int) -> SimpleNamespace:
    return SimpleNamespace(tp_rank=tp_rank, dp_rank=dp_rank, pp=pp,
                           is_first_stage=pp_rank == 0)


def test_each_element_has_one_owner_and_one_writer():
    """Over a 2 × 2 × 2 grid: a tp shard is owned by its holder, a replicated parameter by tp
    rank 0, the tied embedding (first and last stage) by the first stage; of the owners, dp
    rank 0 writes; scalar optimizer state is written by one rank of all eight."""
    replicated = Parameter((4,), Init("zeros"))
    shard = Parameter((2,), Init("zeros"), full_shape=(4,), shard_index=(slice(0, 2),))
    tied = Parameter((4,), Init("zeros"), full_shape=(8,), shard_index=(slice(0, 4),))
    tied.tied_embedding = True
    ranks = [_grid(t, d, s, 2) for t, d, s in itertools.product((0, 1), repeat=3)]
    for p, owners in ((replicated, 4), (shard, 8), (tied, 4)):
        assert sum(owns(p, g) for g in ranks) == owners
        assert sum(writes_full_state(p, g) for g in ranks) == owners // 2
    assert not owns(replicated, _grid(1, 0, 0, 2)) and owns(shard, _grid(1, 0, 0, 2))
    assert not owns(tied, _grid(0, 0, 1, 2)) and owns(tied, _grid(0, 0, 0, 2))
    assert [writes_full_state(None, g) for g in ranks].count(True) == 1
