"""Knowledge distillation (Hinton, Vinyals and Dean 2015): a small student learns from the true
next character and from a trained teacher's whole distribution over it.

``train.py --teacher DIR --distill-alpha A --distill-temperature T`` trains the student on

    L = (1 − A) · CE(z_s, y) + A · T² · KL(p_T ‖ q_T),   p_T = softmax(z_t/T), q_T = softmax(z_s/T)

with z_s and z_t the student's and the teacher's logits at every position, averaged over the
positions like the cross-entropy. The true character says only which token came next; the
teacher's distribution also says which others were plausible ("after 'th', 'e' is likely, 'a'
possible, 'x' not"), a richer target per example. A temperature T > 1 softens both
distributions so the small probabilities carry weight; since the gradient of the KL term
scales as 1/T (below), the T² factor keeps its share of the gradient independent of T.

Gradient. With q = softmax(z_s/T), per position, d/dz_s KL(p ‖ q) = (q − p)/T; the teacher
gets no gradient (it is fixed, run without a graph).

Layouts. The teacher is a 1-process model (its checkpoint may come from any layout, float or
int8) that every rank runs on its own rows of the batch, beside a student that computes its
whole logits. That fits data parallelism (any dp, ZeRO, microbatches) but not a student whose
logits are split over the vocabulary (tp > 1) or whose head sits on another rank than its
input tokens (pp > 1): those layouts are refused with exit 2 (`check_layout`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpipar import ops
from mpipar.autograd import Function, Tensor, no_grad
from mpipar.backend import array_module, get_xp
from mpipar.data import CharTokenizer
from mpipar.grid import ProcessGrid
from mpipar.inference import InferenceModel, load_for_inference
from mpipar.model import GPT, GPTConfig
from mpipar.nn import DropoutKey


class SoftTargetKL(Function):
    """L = (1/N) Σ_n Σ_v p_nv (log p_nv − log q_nv),  q_n = softmax(z_n / T).

    ``logits`` z is (..., V) (N positions), ``probs`` p the teacher's (..., V), fixed.
    dL/dz_n = (q_n − p_n) / (T·N). Terms with p = 0 contribute 0 (p log p → 0).
    """

    @staticmethod
    def forward(ctx, logits, probs, temperature):
        xp = array_module(logits)
        v = logits.shape[-1]
        z = logits.reshape(-1, v) / temperature  # (N, V)
        p = probs.reshape(-1, v)
        z -= z.max(axis=1, keepdims=True)
        log_q = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        log_p = xp.log(xp.where(p > 0, p, 1.0))  # 0 where p = 0, where p·log p is 0 too
        n = z.shape[0]
        loss = (p * (log_p - log_q)).sum() / n
        ctx.save_for_backward(xp.exp(log_q), p)
        ctx.scale = 1.0 / (temperature * n)
        ctx.shape = logits.shape
        return xp.asarray(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, g):
        q, p = ctx.saved
        return (((q - p) * (g * ctx.scale)).reshape(ctx.shape),)


def soft_target_kl(logits: Tensor, probs: Any, temperature: float) -> Tensor:
    """KL(p ‖ softmax(logits / T)), the mean over positions (see :class:`SoftTargetKL`)."""
    return SoftTargetKL.apply(logits, probs, temperature=temperature)


def softmax(z: Any, temperature: float) -> Any:
    """softmax(z / T) over the last axis (an array, no graph)."""
    xp = array_module(z)
    e = z / temperature
    e = xp.exp(e - e.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def check_settings(alpha: float, temperature: float) -> None:
    """ValueError naming the flag for a weight outside [0, 1] or a temperature that is not
    positive and finite (NaN fails both)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--distill-alpha must be in [0, 1], got {alpha}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"--distill-temperature must be positive and finite, got {temperature}")


def check_layout(tp: int, pp: int) -> None:
    """Distillation runs with data parallelism only (module docstring); ValueError otherwise."""
    if tp > 1 or pp > 1:
        raise ValueError(f"--teacher runs the teacher as a 1-process model on each rank's rows "
                         f"beside a student that computes its whole logits, so it needs --tp 1 "
                         f"and --pp 1 (got --tp {tp} --pp {pp}); use --dp to parallelise")


def check_distillation(tc: Any, cfg: GPTConfig, tokenizer: CharTokenizer, tp: int,
                       pp: int) -> None:
    """Every check of a --teacher run, before any process talks to another (ValueError)."""
    check_layout(tp, pp)
    check_settings(tc.distill_alpha, tc.distill_temperature)
    Distillation.from_checkpoint(tc.teacher, cfg, tokenizer, tc.distill_alpha,
                                 tc.distill_temperature)


class Distillation:
    """The teacher and the mixed loss of the student (module docstring)."""

    def __init__(self, teacher: InferenceModel, alpha: float, temperature: float,
                 dtype: Any) -> None:
        check_settings(alpha, temperature)
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.dtype = np.dtype(dtype)

    @classmethod
    def from_checkpoint(cls, path: str, student: GPTConfig, tokenizer: CharTokenizer,
                        alpha: float, temperature: float) -> Distillation:
        """Load the teacher; ValueError (a CheckpointError for a bad directory) unless it
        reads the student's vocabulary and contexts at least as long as the student's."""
        loaded = load_for_inference(path)
        if loaded.tokenizer.chars != tokenizer.chars:
            raise ValueError(f"--teacher {path} has a vocabulary of {loaded.cfg.vocab_size} "
                             f"characters that differs from the student's "
                             f"({tokenizer.vocab_size}); train both on the same text")
        if loaded.cfg.seq_len < student.seq_len:
            raise ValueError(f"--teacher {path} reads contexts of {loaded.cfg.seq_len} tokens, "
                             f"shorter than the student's --seq-len {student.seq_len}")
        teacher = InferenceModel(loaded.cfg, ProcessGrid.single())
        teacher.load(loaded.state)
        return cls(teacher, alpha, temperature, student.dtype)

    def teacher_probs(self, x: Any) -> Any:
        """softmax(z_t / T) of the teacher at every position of x (B, T), (B, T, V)."""
        with no_grad():
            z = self.teacher.forward(x)
        return get_xp().asarray(softmax(z.astype(np.float64), self.temperature), self.dtype)

    def loss(self, student: GPT, x: Any, y: Any, key: DropoutKey | None) -> Tensor:
        """(1 − A)·CE + A·T²·KL for one microbatch: the student's objective."""
        logits = student(x, None, key)  # (B, T, V), with the graph
        ce = ops.cross_entropy(logits, y)
        if self.alpha == 0.0:
            return ce
        kl = soft_target_kl(logits, self.teacher_probs(x), self.temperature)
        return ce * (1.0 - self.alpha) + kl * (self.alpha * self.temperature ** 2)


__all__ = ["Distillation", "SoftTargetKL", "check_distillation", "check_layout",
           "check_settings", "soft_target_kl"]
