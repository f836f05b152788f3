"""Checkpoints that cannot lie: every corruption is refused with one line naming the file,
inconsistent metadata is refused, and an interrupted save never loses the checkpoint.

The corruptions start from real checkpoints written by ``train.py``. Most are checked in this
process through :func:`load_checkpoint` (fast, so the byte-flip fuzz can try hundreds of
flips); a few go through ``train.py --resume`` and ``python -m mpipar.sample`` to show what a
user sees: exit 2 and one line on stderr.
"""

from __future__ import annotations

import io
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TINY_ARGS,
    TINY_TEXT,
    check_ok,
    describe_run,
    python_subprocess,
    train_subprocess,
)
from mpi_util import kill_job
from mpi_util import test_env as child_env

from mpipar.checkpoint import (
    CheckpointError,
    finish_interrupted_save,
    load_checkpoint,
    save_checkpoint,
)

# The smallest model that is still a whole GPT: a 60 KB checkpoint, dense in headers.
SMALL_ARGS = ["--preset", "tiny", "--n-layer", "1", "--d-model", "16", "--n-head", "2",
              "--seq-len", "8", "--steps", "1", "--eval-every", "0", "--quiet"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, tiny_data) -> Path:
    path = tmp_path_factory.mktemp("small") / "ck"
    check_ok(train_subprocess([*SMALL_ARGS, "--data", tiny_data, "--save", path]))
    return path


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_line_error(proc, *fragments: str) -> str:
    """Exit 2 with one line on stderr holding every fragment."""
    assert proc.returncode == 2, describe_run(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, describe_run(proc)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from {lines[0]!r}"
    return lines[0]


def resume(ckpt: Path, data: Path, *extra):
    return train_subprocess([*TINY_ARGS, "--steps", "4", "--data", data, "--resume", ckpt,
                             *extra], timeout=60)


def sample(ckpt: Path, *extra):
    return python_subprocess(["-m", "mpipar.sample", "--checkpoint", ckpt, "-n", "5", *extra],
                             timeout=60)


def rewrite(ckpt: Path, edit_arrays=None, edit_meta=None) -> None:
    """Load a checkpoint, edit it, save it again: the files agree with their checksums."""
    arrays, meta = load_checkpoint(ckpt)
    if edit_arrays:
        edit_arrays(arrays)
    if edit_meta:
        edit_meta(meta)
    save_checkpoint(ckpt, arrays, meta)


# --------------------------------------------------------------------------------------------
# Corrupted files
# --------------------------------------------------------------------------------------------


def test_a_header_edited_from_f4_to_f2_is_refused(tiny_checkpoint, tiny_data, tmp_path):
    """The issue's one-byte edit: it used to load and end as 'loss became nan'."""
    ckpt = copy(tiny_checkpoint, tmp_path / "ck")
    raw = (ckpt / "state.npz").read_bytes()
    at = raw.index(b"'descr': '<f4'") + len("'descr': '<f")
    (ckpt / "state.npz").write_bytes(raw[:at] + b"2" + raw[at + 1:])
    one_line_error(resume(ckpt, tiny_data), str(ckpt / "state.npz"), "corrupted",
                   "header claims float16", "but the member holds")


def test_a_checkpoint_of_the_wrong_dtype_is_refused(tiny_checkpoint, tiny_data, tmp_path):
    """Written whole (checksums agree) but in float16: the dtypes are checked against the
    model before any data is read."""
    ckpt = copy(tiny_checkpoint, tmp_path / "ck")
    rewrite(ckpt, lambda a: a.update({k: v.astype(np.float16) for k, v in a.items()
                                      if k.startswith("model.")}))
    one_line_error(resume(ckpt, tiny_data), "model state", "wrong dtypes",
                   "expected float32, found float16")


def test_a_header_claiming_8_tib_is_refused_before_allocating(small_checkpoint, tmp_path):
    ckpt = copy(small_checkpoint, tmp_path / "ck")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
    with zipfile.ZipFile(ckpt / "state.npz") as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    members["model.wte.weight.npy"] = header.getvalue() + bytes(16)
    with zipfile.ZipFile(ckpt / "state.npz", "w") as zf:  # valid CRCs: only the claim lies
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert str(e.value) == (
        f"{ckpt / 'state.npz'}: array 'model.wte.weight' is corrupted: its header claims "
        "float64 (1099511627776,) = 8,796,093,022,208 bytes but the member holds 16")


def structural_offsets(raw: bytes) -> list[int]:
    """Offsets of every zip header, every ``.npy`` header and the zip's central directory."""
    offsets: list[int] = []
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        for info in zf.infolist():
            start = info.header_offset
            name_len, extra_len = struct.unpack("<HH", raw[start + 26:start + 30])
            npy = start + 30 + name_len + extra_len
            (header_len,) = struct.unpack("<H", raw[npy + 8:npy + 10])
            offsets += range(start, npy + 10 + header_len)
        offsets += range(zf.start_dir, len(raw))
    return offsets


def test_byte_flip_fuzz(small_checkpoint, tmp_path):
    """300 seeded single-bit flips, half of them in the zip and .npy headers: each is refused
    with one line naming the damaged file, or changes nothing that loads (a zip timestamp, a
    field zipfile ignores). Nothing else may happen: before, flips raised TokenError,
    NotImplementedError, zip 'encrypted' RuntimeError, ..."""
    rng = np.random.default_rng(2024)
    files = {name: (small_checkpoint / name).read_bytes() for name in ("state.npz", "meta.json")}
    arrays0, meta0 = load_checkpoint(small_checkpoint)
    where = ([("state.npz", int(o)) for o in rng.choice(structural_offsets(files["state.npz"]),
                                                         150, replace=False)]
             + [("state.npz", int(o)) for o in rng.integers(0, len(files["state.npz"]), 75)]
             + [("meta.json", int(o)) for o in rng.integers(0, len(files["meta.json"]), 75)])
    ckpt = copy(small_checkpoint, tmp_path / "ck")
    seen: Counter = Counter()
    for name, offset in where:
        bit = int(rng.integers(8))
        damaged = bytearray(files[name])
        damaged[offset] ^= 1 << bit
        (ckpt / name).write_bytes(damaged)
        flip = f"bit {bit} of byte {offset} of {name}"
        try:
            arrays, meta = load_checkpoint(ckpt)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(ckpt / name) in str(exc), f"{flip}: {exc}"
            seen["refused"] += 1
        except Exception as exc:  # noqa: BLE001  (exactly what must not happen)
            pytest.fail(f"{flip} raised {type(exc).__name__}: {exc}")
        else:
            assert meta == meta0 and arrays.keys() == arrays0.keys(), f"{flip} loaded"
            for k, a in arrays0.items():
                assert arrays[k].dtype == a.dtype and np.array_equal(arrays[k], a), \
                    f"{flip} changed array {k} and was not refused"
            seen["harmless"] += 1
        (ckpt / name).write_bytes(files[name])
    assert seen["refused"] > 0.75 * len(where), f"most flips matter: {seen}"


def flip(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(raw)


@pytest.mark.parametrize("where", ["npy header", "zip flags", "meta.json"])
def test_a_flipped_bit_through_the_commands(where, small_checkpoint, tiny_data, tmp_path):
    """What a user sees: train.py --resume and python -m mpipar.sample exit 2 with one line."""
    ckpt = copy(small_checkpoint, tmp_path / "ck")
    state = (ckpt / "state.npz").read_bytes()
    if where == "npy header":  # '(' of the first shape → ')': the header no longer parses
        flip(ckpt / "state.npz", state.index(b"'shape': (") + 9, 0)
    elif where == "zip flags":  # the 'encrypted' bit of the first central directory entry
        with zipfile.ZipFile(ckpt / "state.npz") as zf:
            flip(ckpt / "state.npz", zf.start_dir + 8, 0)
    else:
        flip(ckpt / "meta.json", (ckpt / "meta.json").read_bytes().index(b'"step": 1') + 8, 1)
    damaged = str(ckpt / ("meta.json" if where == "meta.json" else "state.npz"))
    one_line_error(resume(ckpt, tiny_data, *SMALL_ARGS[2:10]), damaged)
    one_line_error(sample(ckpt), damaged)


# --------------------------------------------------------------------------------------------
# Whole files that say inconsistent things
# --------------------------------------------------------------------------------------------

META_EDITS = {
    "step ahead of the optimizer": (lambda m: m.update(step=3),
                                    ["meta.json says step 3", "optimizer has taken 2 steps"]),
    "step true": (lambda m: m.update(step=True), ["bad step True"]),
    "reordered vocabulary": (lambda m: m["tokenizer"].insert(1, m["tokenizer"].pop(0)),
                             ["vocabulary out of code-point order", "entry"]),
}


@pytest.mark.parametrize("case", sorted(META_EDITS))
def test_inconsistent_metadata_is_refused(case, tiny_checkpoint, tiny_data, tmp_path):
    edit, fragments = META_EDITS[case]
    ckpt = copy(tiny_checkpoint, tmp_path / "ck")
    rewrite(ckpt, edit_meta=edit)
    one_line_error(resume(ckpt, tiny_data), str(ckpt), *fragments)


def test_sample_refuses_a_reordered_vocabulary(tiny_checkpoint, tmp_path):
    ckpt = copy(tiny_checkpoint, tmp_path / "ck")
    rewrite(ckpt, edit_meta=META_EDITS["reordered vocabulary"][0])
    one_line_error(sample(ckpt), "vocabulary out of code-point order")


def test_resuming_on_other_text_is_refused_unless_allowed(tiny_checkpoint, text_file):
    """The same characters in another order: it used to resume silently."""
    other = text_file("other.txt", TINY_TEXT[::-1])
    one_line_error(resume(tiny_checkpoint, other), "other.txt is not the text",
                   "--allow-new-data")
    proc = check_ok(resume(tiny_checkpoint, other, "--allow-new-data"))
    assert "warning: " in proc.stdout and "other.txt is not the text" in proc.stdout


def test_stop_at_before_the_checkpoint_says_so(tiny_checkpoint, tiny_data):
    one_line_error(resume(tiny_checkpoint, tiny_data, "--stop-at", "2"),
                   "--stop-at 2 is not after the step", "nothing to train")


# --------------------------------------------------------------------------------------------
# Interrupted saves
# --------------------------------------------------------------------------------------------


def interrupted_swap(tmp_path: Path, old: Path, new: Path) -> Path:
    """What a save of ``ck`` killed between its two renames leaves: no ``ck``, the previous
    checkpoint as ``.ck.old-*`` and the new one as ``.ck.tmp-*``, both complete."""
    shutil.copytree(old, tmp_path / ".ck.old-0123456789ab")
    shutil.copytree(new, tmp_path / ".ck.tmp-x1y2z3")
    return tmp_path / "ck"


def test_resume_finishes_an_interrupted_swap(tiny_checkpoint, tiny_data, tmp_path):
    newer = tmp_path / "newer"
    rewrite(copy(tiny_checkpoint, newer), edit_meta=lambda m: m.update(note="new"))
    ck = interrupted_swap(tmp_path, tiny_checkpoint, newer)
    proc = check_ok(resume(ck, tiny_data))
    assert f"note: {ck}: finished an interrupted save" in proc.stdout, describe_run(proc)
    assert load_checkpoint(ck)[1]["note"] == "new", "the new copy is the one kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "newer"]


def test_a_partial_new_copy_rolls_back_to_the_previous(tiny_checkpoint, tmp_path):
    partial = copy(tiny_checkpoint, tmp_path / "partial")
    data = (partial / "state.npz").read_bytes()
    (partial / "state.npz").write_bytes(data[: len(data) // 3])
    ck = interrupted_swap(tmp_path, tiny_checkpoint, partial)
    assert finish_interrupted_save(ck) == [
        f"{ck}: finished an interrupted save with the complete copy .ck.old-0123456789ab",
        f"{ck}: removed 1 leftover copies of interrupted saves"]
    assert load_checkpoint(ck)[1] == load_checkpoint(tiny_checkpoint)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "partial"]


def test_the_next_save_removes_stale_copies(tiny_checkpoint, tmp_path):
    ck = copy(tiny_checkpoint, tmp_path / "ck")
    (tmp_path / ".ck.tmp-stale").mkdir()
    (tmp_path / ".ck.tmp-stale" / "state.npz").write_bytes(b"PK\x03\x04 half")
    shutil.copytree(tiny_checkpoint, tmp_path / ".ck.old-stale")
    (tmp_path / ".other.tmp-keep").mkdir()  # another checkpoint's: not ours to remove
    rewrite(ck, edit_meta=lambda m: m.update(note="next"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "ck"]


SLOW_SAVE = """
import sys, time
import mpipar.checkpoint as ckpt
from mpipar.npz import write_npz

def slow(path, arrays):
    sums = write_npz(path, arrays)
    print("writing", flush=True)
    time.sleep(60)
    return sums

arrays, meta = ckpt.load_checkpoint(sys.argv[1])
ckpt.write_npz = slow
ckpt.save_checkpoint(sys.argv[1], arrays, {**meta, "note": "never"})
"""


def test_sigterm_during_a_save_leaves_no_half_written_copy(tiny_checkpoint, tmp_path):
    ck = copy(tiny_checkpoint, tmp_path / "ck")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(ck)], stdout=subprocess.PIPE,
                            text=True, env=child_env(), start_new_session=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        assert [p.name for p in tmp_path.glob(".ck.tmp-*")], "the save is under way"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        kill_job(proc.pid)
        proc.stdout.close()
    assert code == -signal.SIGTERM, "the process still ends by SIGTERM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert "note" not in load_checkpoint(ck)[1], "the previous checkpoint is intact"
