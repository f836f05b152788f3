"""The command line from outside: ``train.py`` and ``python -m mpipar.sample`` as processes.

The contract (docs/design.md §2 and §7): exit code 0 when all is well; 2 for bad usage or
configuration, with ONE line on stderr that names the flag or file and the numbers involved,
and nothing written — no metrics file, no checkpoint, no trace — because nothing was started.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ARGS, TINY_TEXT, check_ok, describe_run

from mpipar.checkpoint import load_checkpoint, save_checkpoint


def assert_usage_error(proc, out_dir: Path, *fragments: str, keep: tuple = ()) -> None:
    """Exit 2, one stderr line naming the problem (every fragment), nothing written in
    ``out_dir`` (besides the names in ``keep``, there before)."""
    assert proc.returncode == 2, describe_run(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}\n{describe_run(proc)}"
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from the message: {lines[0]!r}"
    assert proc.stdout == "", f"nothing should be printed on stdout\n{describe_run(proc)}"
    written = sorted(p.name for p in out_dir.iterdir() if p.name not in keep)
    assert written == [], f"a failed configuration wrote {written}"


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An empty directory that every output flag points into (it must stay empty)."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def outputs(out_dir: Path) -> list[str]:
    return ["--metrics", str(out_dir / "m.jsonl"), "--save", str(out_dir / "ckpt"),
            "--trace", str(out_dir / "trace.jsonl")]


# --------------------------------------------------------------------------------------------
# --help and a plain run
# --------------------------------------------------------------------------------------------


def flag_helps(help_text: str) -> dict[str, str]:
    """Each option of an argparse ``--help`` (by its long name) and its help text."""
    helps: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        if line.startswith("  -"):  # "  -n N, --num-chars N   text": two spaces end the flag
            invocation, _, text = line.strip().partition("  ")
            flag = invocation.split(", ")[-1].split(" ")[0]
            helps[flag] = text.strip()
        elif flag is not None and line.startswith("   "):  # the help text continues
            helps[flag] = f"{helps[flag]} {line.strip()}".strip()
        else:
            flag = None
    return helps


def assert_every_flag_explained(proc) -> dict[str, str]:
    helps = flag_helps(proc.stdout)
    silent = sorted(f for f, text in helps.items() if not text)
    assert not silent, f"flags without a help line: {silent}\n{proc.stdout}"
    assert "(default: None)" not in proc.stdout, proc.stdout
    doubled = sorted(f for f, text in helps.items() if text.count("(default") > 1)
    assert not doubled, f"flags that state their default twice: {doubled}"
    return helps


def test_help_lists_groups_and_explains_every_flag_once(run_train):
    """Under ``mpirun -n 2`` the help is printed once (by rank 0) and both ranks exit 0."""
    proc = check_ok(run_train(["--help"], n=2, timeout=60))
    assert proc.stdout.count("usage: train.py") == 1, proc.stdout
    groups = [line.split(":")[0].split(" (")[0] for line in proc.stdout.splitlines()
              if line and not line.startswith(" ") and line.endswith(":")]
    for group in ("layout", "model", "training", "parallelism", "output"):
        assert group in groups, f"--help has no {group!r} group (groups: {groups})"
    helps = assert_every_flag_explained(proc)
    for flag in ("--dp", "--tp", "--pp", "--preset", "--steps", "--batch-size", "--lr",
                 "--dtype", "--data", "--microbatches", "--schedule", "--zero",
                 "--metrics", "--trace", "--save", "--resume", "--sample", "--device"):
        assert f"  {flag} " in proc.stdout and flag in helps, f"--help does not list {flag}"
    assert proc.stderr == ""


def test_sample_module_help_explains_every_flag(run_python):
    proc = check_ok(run_python(["-m", "mpipar.sample", "--help"], timeout=60))
    helps = assert_every_flag_explained(proc)
    for flag in ("--checkpoint", "--num-chars", "--prompt", "--temperature", "--top-k",
                 "--seed"):
        assert flag in helps, f"--help does not list {flag}\n{proc.stdout}"


def test_sample_flag_prints_a_sample(run_train, tiny_data, out_dir):
    proc = check_ok(run_train([*TINY_ARGS, "--data", tiny_data, "--sample", "50"]))
    head, sep, rest = proc.stdout.partition("--- sample ---\n")
    assert sep, f"no sample section\n{describe_run(proc)}"
    sample, sep, _ = rest.partition("\n--------------\n")  # TINY_TEXT has no "-"
    assert sep, f"the sample section is not closed\n{describe_run(proc)}"
    assert len(sample) == 50, repr(sample)
    assert set(sample) <= set(TINY_TEXT), f"sampled characters outside the vocabulary: {sample!r}"


# --------------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------------

# TINY_ARGS use seq_len 32, so each split needs 33 tokens; a 90 % / 10 % split of 300
# characters leaves a 30-token validation split, of 30 characters a 27-token training split.
BAD_DATA = {
    "missing": (None, ["data file not found", "nope.txt"]),
    "empty": (b"", ["data file is empty", "empty.txt"]),
    "not_utf8": (b"caf\xe9 au lait " * 20, ["not UTF-8", "0xe9", "offset 3"]),
    "short_train": ("abcdefghij" * 3, ["train split has 27 tokens", "seq_len 32", "33"]),
    "short_val": ("abcdefghij" * 30, ["validation split has 30 tokens", "seq_len 32", "33"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file(case, run_train, text_file, tmp_path, out_dir):
    content, fragments = BAD_DATA[case]
    if content is None:
        path = tmp_path / "nope.txt"
    else:
        path = text_file(f"{case}.txt", content)
    proc = run_train([*TINY_ARGS, "--data", path, *outputs(out_dir)], timeout=60)
    assert_usage_error(proc, out_dir, *fragments)


def test_data_path_is_a_directory(run_train, tmp_path, out_dir):
    d = tmp_path / "corpus_dir"
    d.mkdir()
    proc = run_train([*TINY_ARGS, "--data", d, *outputs(out_dir)], timeout=60)
    assert_usage_error(proc, out_dir, "directory", "corpus_dir")


# --------------------------------------------------------------------------------------------
# Bad flags (the built-in corpus: nothing is trained, so its size does not matter)
# --------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--steps", "0"], ["--steps", "positive", "0"]),
    (["--n-layer", "0"], ["--n-layer", "positive", "0"]),
    (["--batch-size", "-1"], ["--batch-size", "positive", "-1"]),
    (["--d-model", "0"], ["--d-model", "positive", "0"]),
    (["--steps", "ten"], ["--steps", "'ten'"]),
    (["--n-head", "3"], ["--n-head 3", "--d-model 64"]),
    (["--preset", "huge"], ["--preset", "'huge'"]),
    (["--schedule", "zigzag"], ["--schedule", "'zigzag'"]),
    (["--dtype", "float16"], ["--dtype", "'float16'"]),
    (["--stepz", "3"], ["unrecognized", "--stepz"]),
    (["--dp", "2"], ["world size 1", "--dp 2"]),
    (["--microbatches", "3"], ["--batch-size 8", "--microbatches 3"]),
    (["--dropout", "1"], ["--dropout", "1.0"]),
    (["--lr", "inf"], ["--lr", "inf"]),
    (["--min-lr-ratio", "2"], ["--min-lr-ratio", "2.0"]),
    (["--weight-decay", "nan"], ["--weight-decay", "nan"]),
    (["--grad-clip", "-1"], ["--grad-clip", "-1.0"]),
    (["--momentum", "1.5"], ["--momentum", "1.5"]),
]


@pytest.mark.parametrize("flags,fragments", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag(flags, fragments, run_train, out_dir):
    proc = run_train([*TINY_ARGS, *flags, *outputs(out_dir)], timeout=60)
    assert_usage_error(proc, out_dir, *fragments)


def test_bad_output_paths(run_train, tiny_data, out_dir):
    """Unwritable outputs are refused before training, not discovered after it."""
    busy = out_dir / "busy"  # a directory of someone else's files
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    cases = [
        (["--save", busy], ["--save", "busy", "not a checkpoint directory"]),
        (["--metrics", out_dir / "no_dir" / "m.jsonl"], ["--metrics", "no_dir"]),
        (["--trace", busy], ["--trace", "busy"]),
    ]
    for flags, fragments in cases:
        proc = run_train([*TINY_ARGS, "--data", tiny_data, *flags], timeout=60)
        assert_usage_error(proc, out_dir, *fragments, keep=("busy",))
        assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"], flags
    assert (busy / "notes.txt").read_text() == "keep me"


def test_layout_error_under_mpirun(run_train, out_dir):
    """With 2 processes, every rank refuses the layout and exits; rank 0 alone says why, and
    the wrong world size does not hide the other broken rule."""
    proc = run_train([*TINY_ARGS, "--dp", "3", *outputs(out_dir)], n=2, timeout=120)
    assert proc.returncode == 2, describe_run(proc)
    assert proc.stderr.splitlines() == [
        "train.py: error: invalid configuration:",
        "  - world size 2 != --dp 3 × --tp 1 × --pp 1 = 3",
        "  - --batch-size 8 is not divisible by --dp 3 × --microbatches 1 = 3 (every "
        "microbatch must have the same size)"], describe_run(proc)
    assert proc.stdout == "" and list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Bad checkpoints (each crafted from a real one)
# --------------------------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_state(ckpt: Path, edit) -> None:
    """Load the arrays, let ``edit(arrays)`` change the dict, and save the checkpoint again:
    a checkpoint whose files agree with their checksums but not with the model."""
    arrays, meta = load_checkpoint(ckpt)
    edit(arrays)
    save_checkpoint(ckpt, arrays, meta)


def edit_state_unsigned(ckpt: Path, edit) -> None:
    """Let ``edit(arrays)`` change the arrays and write ``state.npz`` back with plain numpy,
    leaving ``meta.json`` (and its checksums) as they were."""
    with np.load(ckpt / "state.npz") as f:
        arrays = {k.removesuffix(".npy"): f[k] for k in f.files}
    edit(arrays)
    np.savez(ckpt / "state.npz", **arrays)


def garbage_state(d: Path) -> None:
    (d / "state.npz").write_bytes(b"this is not a zip archive\n" * 50)


def truncated_state(d: Path) -> None:
    data = (d / "state.npz").read_bytes()
    (d / "state.npz").write_bytes(data[: len(data) // 2])


def bad_json(d: Path) -> None:
    (d / "meta.json").write_text('{"step": 2, "model": ', encoding="utf-8")


def missing_key(d: Path) -> None:
    edit_state(d, lambda a: a.pop("model.ln_f.bias"))


def wrong_shape(d: Path) -> None:
    edit_state(d, lambda a: a.update({"model.wpe.weight": np.zeros((16, 64), np.float32)}))


def missing_optimizer_key(d: Path) -> None:
    edit_state(d, lambda a: a.pop("optim.adamw.v.wpe.weight"))


def object_array(d: Path) -> None:
    # np.savez pickles an object array into the member: loading it could run code.
    edit_state_unsigned(d, lambda a: a.update({"model.wpe.weight": np.array([{"x": 1}, None])}))


def unsigned_edit(d: Path) -> None:
    edit_state_unsigned(d, lambda a: a.pop("model.ln_f.bias"))


BAD_CHECKPOINTS = {
    "garbage_state": (garbage_state, ["state.npz", "corrupted"]),
    "truncated_state": (truncated_state, ["state.npz", "corrupted"]),
    "bad_json": (bad_json, ["meta.json", "not valid JSON", "line 1"]),
    "missing_key": (missing_key, ["model state", "1 missing", "ln_f.bias"]),
    "wrong_shape": (wrong_shape, ["wpe.weight", "expected (32, 64)", "found (16, 64)"]),
    "missing_optimizer_key": (missing_optimizer_key,
                              ["optimizer state", "1 missing", "adamw.v.wpe.weight"]),
    "pickled_objects": (object_array, ["pickled", "model.wpe.weight"]),
    "unsigned_edit": (unsigned_edit, ["state.npz does not hold the arrays meta.json lists",
                                      "1 missing: model.ln_f.bias"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint(case, run_train, tiny_checkpoint, tiny_data, tmp_path, out_dir):
    damage, fragments = BAD_CHECKPOINTS[case]
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / case)
    damage(ckpt)
    proc = run_train([*TINY_ARGS, "--steps", "4", "--data", tiny_data, "--resume", ckpt,
                      *outputs(out_dir)], timeout=60)
    assert_usage_error(proc, out_dir, *fragments)


def test_missing_checkpoint(run_train, tiny_data, tmp_path, out_dir):
    proc = run_train([*TINY_ARGS, "--data", tiny_data, "--resume", tmp_path / "nowhere",
                      *outputs(out_dir)], timeout=60)
    assert_usage_error(proc, out_dir, "not found", "nowhere")


def test_checkpoint_of_another_model(run_train, tiny_data, tmp_path, out_dir):
    ckpt = tmp_path / "d32"
    check_ok(run_train([*TINY_ARGS, "--d-model", "32", "--data", tiny_data, "--save", ckpt,
                        "--quiet"]))
    proc = run_train([*TINY_ARGS, "--steps", "4", "--data", tiny_data, "--resume", ckpt,
                      *outputs(out_dir)], timeout=60)
    assert_usage_error(proc, out_dir, "d_model=32", "d_model=64")


def test_checkpoint_of_another_optimizer(run_train, tiny_checkpoint, tiny_data, out_dir):
    proc = run_train([*TINY_ARGS, "--steps", "4", "--optimizer", "sgd", "--data", tiny_data,
                      "--resume", tiny_checkpoint, *outputs(out_dir)], timeout=60)
    assert_usage_error(proc, out_dir, "optimizer state", "sgd.momentum", "adamw.m")


def test_resume_past_the_last_step(run_train, tiny_checkpoint, tiny_data, out_dir):
    meta = json.loads((tiny_checkpoint / "meta.json").read_text())
    assert meta["step"] == 2
    proc = run_train([*TINY_ARGS, "--steps", "1", "--data", tiny_data,
                      "--resume", tiny_checkpoint, *outputs(out_dir)], timeout=60)
    assert_usage_error(proc, out_dir, "step 2", "--steps 1")


# --------------------------------------------------------------------------------------------
# python -m mpipar.sample
# --------------------------------------------------------------------------------------------


def sample(run_python, ckpt, *extra):
    return run_python(["-m", "mpipar.sample", "--checkpoint", ckpt, *extra], timeout=60)


def test_sample_module_is_deterministic_for_a_seed(run_python, tiny_checkpoint):
    first = check_ok(sample(run_python, tiny_checkpoint, "-n", "50", "--seed", "3")).stdout
    again = check_ok(sample(run_python, tiny_checkpoint, "-n", "50", "--seed", "3")).stdout
    other = check_ok(sample(run_python, tiny_checkpoint, "-n", "50", "--seed", "4")).stdout
    # The prompt "\n", 50 characters, then print's newline.
    assert len(first) == 52 and first.startswith("\n"), repr(first)
    assert set(first) <= set(TINY_TEXT)
    assert first == again, "the same seed gave different samples"
    # A 2-step model is still close to uniform over 36 characters: two 50-character samples
    # from different seeds agree everywhere with probability about 36**-50.
    assert first != other, "different seeds gave the same sample"


@pytest.mark.parametrize("case", ["garbage_state", "bad_json", "wrong_shape", "pickled_objects"])
def test_sample_module_refuses_a_bad_checkpoint(case, run_python, tiny_checkpoint, tmp_path):
    damage, fragments = BAD_CHECKPOINTS[case]
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / case)
    damage(ckpt)
    proc = sample(run_python, ckpt, "-n", "5")
    assert proc.returncode == 2, describe_run(proc)
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert all(f in proc.stderr for f in fragments), proc.stderr


def test_sample_module_without_newline_in_vocabulary(run_python, run_train, text_file,
                                                     tmp_path):
    data = text_file("letters.txt", "abcdefgh" * 100)
    ckpt = tmp_path / "letters"
    check_ok(run_train([*TINY_ARGS, "--data", data, "--save", ckpt, "--quiet"]))
    out = check_ok(sample(run_python, ckpt, "-n", "20")).stdout
    assert len(out.strip()) >= 20
