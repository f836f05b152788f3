"""Generation: prefill the prompts, then decode one token at a time, drawing each from the logits.

A batch of B prompts is generated together. Every step draws one token per row from the
next-token distribution (:func:`token_distribution`):

    z = logits / temperature            (temperature > 0; ``greedy`` takes argmax z instead)
    top-k: keep the k largest z         (the others get probability 0)
    p = softmax(z)
    top-p: keep the most likely tokens, in order, until their probability reaches p
           (the nucleus; the token that crosses p is kept), and renormalise

Row b draws from its own stream ``default_rng(seed + b)``: a prompt's text does not depend on
the other prompts of the batch, and a single prompt draws what ``python -m mpipar.sample``
draws with the same seed.

The context. The model has learned positions 0 .. seq_len − 1, so it sees at most seq_len
tokens: a row's context is the tokens since its ``start``, which moves when the context would
overflow. Learned absolute positions make the cache useless then: every cached key was
computed at a position it no longer has. So the context restarts, keeping its last
seq_len − shift + 1 tokens, and is prefilled again. With ``shift`` = 1 (the default) the
context is always the last seq_len tokens, as in the plain sampler, and once the window is
full every token costs a prefill; a larger shift re-prefills once every ``shift`` tokens, at
the price of shorter contexts just after each restart. The same rule holds with and without
the cache, so both see the same contexts and give the same logits.

A row stops after ``n`` tokens or once its text ends with the stop sequence (included); a
stopped row leaves the batch (its cache rows are dropped).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mpipar.inference import InferenceModel
from mpipar.kv_cache import KVCache


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is drawn (see the module docstring)."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the flag for a value that cannot define a distribution."""
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be a positive finite number, got "
                             f"{self.temperature} (use --greedy for the likeliest token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {self.top_k}")


def token_distribution(logits: np.ndarray, s: SamplingConfig) -> np.ndarray:
    """The probabilities (V,) a token is drawn from: temperature, top-k, softmax, top-p."""
    z = np.asarray(logits, dtype=np.float64) / s.temperature
    if s.top_k is not None and s.top_k < z.size:
        cutoff = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < cutoff, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # probability of the tokens ahead of each
        p[order[before >= s.top_p]] = 0.0
        p /= p.sum()
    return p


def draw(logits: np.ndarray, s: SamplingConfig, rngs: Sequence[np.random.Generator]) -> list:
    """One token per row of ``logits`` (B, V), row b from ``rngs[b]``."""
    if s.greedy:
        return [int(np.argmax(row)) for row in logits]
    return [int(rng.choice(row.size, p=token_distribution(row, s)))
            for row, rng in zip(logits, rngs, strict=True)]


@dataclass
class GenerationStats:
    """Wall times of one generation: the first token, then every decode step."""

    first_token_s: float = 0.0  # prefill and the first draw
    step_s: list[float] = field(default_factory=list)  # each later step
    tokens: int = 0  # tokens drawn, all rows
    restarts: int = 0  # context restarts (prefills after the window was full)

    @property
    def total_s(self) -> float:
        return self.first_token_s + sum(self.step_s)


class Generator:
    """Continues a batch of prompts on an :class:`InferenceModel`, with or without a KV cache.

    Every rank of the model's layout runs the same loop: the logits of a step are the same on
    every rank, so every rank draws the same tokens and keeps the same rows.
    """

    def __init__(self, model: InferenceModel, sampling: SamplingConfig, *,
                 use_cache: bool = True, shift: int = 1, stop: Sequence[int] = (),
                 keep_logits: bool = False) -> None:
        sampling.check()
        seq_len = model.cfg.seq_len
        if not 1 <= shift <= seq_len:
            raise ValueError(f"--shift must be in [1, seq_len = {seq_len}], got {shift}")
        self.model, self.sampling = model, sampling
        self.use_cache, self.stop, self.keep_logits = use_cache, list(stop), keep_logits
        self.keep = seq_len - shift + 1  # tokens a restarted context keeps
        self.tracer = model.grid.world.tracer
        self.logits: list[np.ndarray] = []  # each step's (B_active, V), with keep_logits
        self.stats = GenerationStats()

    def run(self, prompts: Sequence[Sequence[int]], n: int,
            on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """The continuations (at most ``n`` tokens each) of ``prompts`` (lists of token ids).

        ``on_token(row, token)`` is called for each token as soon as it is drawn (streaming).
        """
        if n < 1 or not prompts or not all(prompts):
            raise ValueError("need n >= 1 and at least one non-empty prompt")
        seq_len = self.model.cfg.seq_len
        self.logits, self.stats = [], GenerationStats()
        self.seqs = [list(p) for p in prompts]
        self.start = [max(0, len(p) - seq_len) for p in prompts]
        self.active = list(range(len(prompts)))
        self.cache = self.model.new_cache(len(prompts)) if self.use_cache else None
        rngs = [np.random.default_rng(self.sampling.seed + b) for b in range(len(prompts))]
        out: list[list[int]] = [[] for _ in prompts]
        t0 = time.perf_counter()
        logits = self._step(0, prefill=True)
        for i in range(n):
            tokens = draw(logits, self.sampling, [rngs[b] for b in self.active])
            finished = self._append(tokens, out, on_token)
            now = time.perf_counter()
            if i == 0:
                self.stats.first_token_s = now - t0
            else:
                self.stats.step_s.append(now - t0)
            t0 = now
            if i == n - 1 or not self._drop(finished):
                break
            logits = self._step(i + 1, prefill=self._slide() or not self.use_cache)
        return out

    # -- one step ------------------------------------------------------------------------------
    def _append(self, tokens: list[int], out: list[list[int]],
                on_token: Callable[[int, int], None] | None) -> set[int]:
        """Add each active row's token; the rows whose text now ends with the stop sequence."""
        finished = set()
        for b, tok in zip(self.active, tokens, strict=True):
            self.seqs[b].append(tok)
            out[b].append(tok)
            self.stats.tokens += 1
            if on_token is not None:
                on_token(b, tok)
            if self.stop and out[b][-len(self.stop):] == self.stop:
                finished.add(b)
        return finished

    def _drop(self, finished: set[int]) -> bool:
        """Take finished rows out of the batch (and the cache); False when none is left."""
        if finished:
            keep = [j for j, b in enumerate(self.active) if b not in finished]
            self.active = [self.active[j] for j in keep]
            if self.cache is not None and keep:
                self.cache.keep_rows(keep)
        return bool(self.active)

    def _slide(self) -> bool:
        """Restart the context of every row that would overflow; True if any did."""
        moved = False
        for b in self.active:
            if len(self.seqs[b]) - self.start[b] > self.model.cfg.seq_len:
                self.start[b] = len(self.seqs[b]) - self.keep
                moved = True
        if moved and self.use_cache:
            self.stats.restarts += 1
        return moved

    def _step(self, step: int, prefill: bool) -> np.ndarray:
        """Next-token logits (B_active, V): a pass over whole contexts, or over the last token
        with the cache. The trace labels the pass with ``step`` (0: the prompt's prefill)."""
        with self.tracer.context(phase="other", step=step):
            if prefill:
                logits = self._prefill(self.cache)
            else:
                last = np.asarray([[self.seqs[b][-1]] for b in self.active])
                logits = self.model.next_logits(last, np.ones(len(self.active)), self.cache)
        if self.keep_logits:
            self.logits.append(logits)
        return logits

    def _prefill(self, cache: KVCache | None) -> np.ndarray:
        """Every active row's whole context, right-padded to the longest (B, t)."""
        contexts = [self.seqs[b][self.start[b]:] for b in self.active]
        counts = np.asarray([len(c) for c in contexts])
        idx = np.zeros((len(contexts), int(counts.max())), dtype=np.int64)
        for j, c in enumerate(contexts):
            idx[j, :len(c)] = c
        if cache is not None:
            cache.reset()
        return self.model.next_logits(idx, counts, cache)


__all__ = ["GenerationStats", "Generator", "SamplingConfig", "draw", "token_distribution"]
