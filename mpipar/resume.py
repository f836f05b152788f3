"""Whether a checkpoint fits the run about to resume from it (``train.py --resume DIR``).

A checkpoint that reads back whole (:func:`mpipar.checkpoint.read_checkpoint`) can still be
the wrong one, or say inconsistent things about itself. Before any process talks to another,
and before any array's data is read, ``train.py`` checks:

* ``meta.json``: the format, a step that is an integer (``true`` is not) within
  ``[0, --steps]`` and before ``--stop-at``, a vocabulary of distinct single characters in
  code-point order (the order a vocabulary is built in, so a reordered one, which would map
  every embedding row to another character, is refused), and the model configuration of
  this run (:func:`check_resume`);
* the arrays, from their headers: exactly the names, full shapes and dtypes of the
  1-process model and of a fresh optimizer of this run's kind (:func:`state_specs`);
* the training text: its SHA-256 must be the one recorded in the checkpoint, unless the run
  says otherwise (:func:`check_training_text`);

and, once the data are read, that the optimizer's own step count is the checkpoint's step
(:func:`check_step_count`). Each failure is a :class:`~mpipar.checkpoint.CheckpointError` of
one line naming the checkpoint and what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mpipar.checkpoint import Checkpoint, CheckpointError, check_state, pack_state, unpack_state
from mpipar.data import CharTokenizer, DataError
from mpipar.model import GPT, GPTConfig
from mpipar.npz import ArraySpec
from mpipar.optim import SGD, AdamW

if TYPE_CHECKING:
    from mpipar.training import TrainConfig

CHECKPOINT_FORMAT = 2  # meta.json of train.py: + data, + checksums (format 1 had neither)

# Settings that change the numbers a resumed run computes (layout-only options do not).
RESUME_SENSITIVE = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                    "grad_clip", "seed", "optimizer", "momentum", "beta1", "beta2", "eps",
                    "precision")


def model_specs(cfg: GPTConfig) -> dict[str, ArraySpec]:
    """Shape and dtype of every parameter of the 1-process model of ``cfg``, by name."""
    return {name: ArraySpec(tuple(p.shape), p.data.dtype)
            for name, p in GPT(cfg).named_parameters()}


def state_specs(cfg: GPTConfig, tc: TrainConfig) -> dict[str, ArraySpec]:
    """Every array of a checkpoint of this run, as :func:`~mpipar.checkpoint.pack_state` names
    them: the model's, and those of a fresh optimizer of ``tc``'s kind (ZeRO's state is saved
    in AdamW's names and shapes)."""
    model = GPT(cfg)
    if tc.optimizer == "sgd":
        fresh = SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum)
    else:
        fresh = AdamW(model.parameters(), lr=tc.lr)
    return pack_state(
        {name: ArraySpec(tuple(p.shape), p.data.dtype) for name, p in model.named_parameters()},
        {key: ArraySpec(v.shape, v.dtype) for key, v in fresh.state_dict().items()})


def saved_vocabulary(ckpt: Checkpoint) -> CharTokenizer:
    """The tokenizer the checkpoint was trained with: distinct single characters, sorted."""
    chars = ckpt.meta.get("tokenizer")
    where = f"{ckpt.path}: meta.json"
    if not isinstance(chars, list):
        raise CheckpointError(f"{where} has no vocabulary (a 'tokenizer' list of characters)")
    try:
        tokenizer = CharTokenizer.from_chars(chars)
    except DataError as exc:
        raise CheckpointError(f"{where} has a bad vocabulary: {exc}") from exc
    wrong = next((i for i in range(1, len(chars)) if chars[i - 1] > chars[i]), None)
    if wrong is not None:
        raise CheckpointError(
            f"{where} has a vocabulary out of code-point order ({chars[wrong - 1]!r} before "
            f"{chars[wrong]!r} at entry {wrong}): it was reordered, and would map the "
            "embedding rows to other characters")
    return tokenizer


def check_resume(ckpt: Checkpoint, cfg: GPTConfig, tc: TrainConfig,
                 stop_at: int | None = None) -> None:
    """The checks of ``meta.json`` and of the arrays' headers (see the module docstring)."""
    meta, where = ckpt.meta, f"{ckpt.path}: meta.json"
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} has format {meta.get('format')!r}; this version of "
                              f"mpipar reads format {CHECKPOINT_FORMAT}")
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} has no 'model' section")
    for key, value in cfg.to_dict().items():
        if saved.get(key) != value:
            raise CheckpointError(f"checkpoint {ckpt.path} was saved with {key}="
                                  f"{saved.get(key)!r} but this run has {key}={value!r}")
    expected_model, expected_optim = unpack_state(state_specs(cfg, tc))
    found_model, found_optim = unpack_state(ckpt.specs)
    try:
        check_state(expected_model, found_model, what="model")
        check_state(expected_optim, found_optim, what="optimizer")
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from exc
    step = meta.get("step")
    if type(step) is not int or step < 0:  # bool is an int subclass: "step": true is refused
        raise CheckpointError(f"{where} has a bad step {step!r} (a non-negative integer)")
    if step > tc.steps:
        raise CheckpointError(f"checkpoint {ckpt.path} is at step {step}, past --steps "
                              f"{tc.steps}")
    if stop_at is not None and stop_at <= step:
        raise CheckpointError(f"--stop-at {stop_at} is not after the step of checkpoint "
                              f"{ckpt.path} ({step}): there is nothing to train")


def check_step_count(ckpt: Checkpoint, arrays: Mapping[str, np.ndarray]) -> None:
    """The optimizer's step count (AdamW's, which bias correction uses) is the meta step."""
    count = arrays.get("optim.adamw.step")
    if count is not None and int(count) != ckpt.meta["step"]:
        raise CheckpointError(
            f"{ckpt.path} is inconsistent: meta.json says step {ckpt.meta['step']} but the "
            f"optimizer has taken {int(count)} steps")


def check_training_text(ckpt: Checkpoint, digest: str, source: str,
                        allow_new: bool) -> str | None:
    """``None`` when the text is the one the checkpoint recorded; else a warning (with
    ``allow_new``) or a CheckpointError naming both."""
    saved = ckpt.meta.get("data")
    if not isinstance(saved, dict) or not isinstance(saved.get("sha256"), str):
        raise CheckpointError(f"{ckpt.path}: meta.json does not record its training text")
    if saved["sha256"] == digest:
        return None
    change = (f"{source} is not the text checkpoint {ckpt.path} was trained on (SHA-256 "
              f"{digest[:12]}…, the checkpoint's {saved['sha256'][:12]}… from "
              f"{saved.get('source')})")
    if not allow_new:
        raise CheckpointError(f"{change}; pass --allow-new-data to resume on it anyway")
    return f"warning: {change}; resuming on it (--allow-new-data)"


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """``"lr 0.003 -> 0.01, ..."`` for every resume-sensitive setting that changed."""
    return ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in RESUME_SENSITIVE
                     if k in saved and saved[k] != now[k])
