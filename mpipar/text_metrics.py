"""BLEU and ROUGE: how many of a reference's words and word sequences a generated text repeats.

Both compare a generated text (the hypothesis) with a reference text, word by word; a word is
a maximal run of non-whitespace characters (``str.split``). An *n-gram* is n consecutive
words; counts are *clipped*: a hypothesis n-gram matches at most as many times as it occurs
in the reference.

**BLEU** (Papineni et al. 2002), a precision, for translation. Over a whole corpus of pairs,
with c_n the clipped matches and t_n the hypothesis n-grams, summed over the pairs:

    p_n = c_n / t_n   (n = 1..4)          BP = min(1, exp(1 − r/h))
    BLEU = 100 · BP · exp(¼ Σ_n log p_n)

h and r are the total hypothesis and reference lengths in words; the brevity penalty BP stops
a short, cautious hypothesis from scoring high precision by saying little. An order with no
match at all would make the score 0, so it is smoothed as mteval-v13a does (and sacrebleu by
default): the k-th such order gets p_n = 1 / (2^k · t_n).

**ROUGE** (Lin 2004), a recall, for summarisation. For one pair, with m the matched n-grams:

    ROUGE-n:  P = m / (hypothesis n-grams),  R = m / (reference n-grams),  F = 2PR / (P + R)
    ROUGE-L:  the same with m = the length of the longest common subsequence of the words

(in order, gaps allowed: credit for word order without demanding contiguity). Scores are
reported as the F-measure averaged over the pairs.

Neither knows what the words mean: they reward surface overlap with one reference, so two
equally good continuations of a passage can score very differently. That is why perplexity,
not these, is the measure of a language model (chapter 7); they are here because they are
what translation and summarisation systems report.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ORDER = 4


def words(text: str) -> list[str]:
    """The words of ``text``: maximal runs of non-whitespace characters."""
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """How often each n-gram (a tuple of n consecutive tokens) occurs."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def clipped_matches(hyp: Counter, ref: Counter) -> int:
    """Σ over hypothesis n-grams of min(count in hypothesis, count in reference)."""
    return sum(min(count, ref[gram]) for gram, count in hyp.items())


@dataclass(frozen=True)
class Bleu:
    """A corpus BLEU score with the numbers it is made of."""

    score: float  # 0..100
    precisions: tuple[float, ...]  # p_1..p_4 in percent, smoothed
    brevity_penalty: float
    hyp_len: int
    ref_len: int


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Bleu:
    """BLEU of hypothesis i against reference i, statistics summed over the corpus."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    h = r = 0
    for hyp_text, ref_text in zip(hypotheses, references, strict=True):
        hyp, ref = words(hyp_text), words(ref_text)
        h, r = h + len(hyp), r + len(ref)
        for n in range(1, MAX_ORDER + 1):
            hyp_n = ngrams(hyp, n)
            total[n - 1] += sum(hyp_n.values())
            correct[n - 1] += clipped_matches(hyp_n, ngrams(ref, n))
    bp = 1.0 if h >= r else (math.exp(1 - r / h) if h else 0.0)
    if not any(correct) or not all(total):  # no match, or no n-gram of some order
        return Bleu(0.0, (0.0,) * MAX_ORDER, bp, h, r)
    precisions, misses = [], 0
    for c, t in zip(correct, total, strict=True):
        if c == 0:
            misses += 1
            precisions.append(100.0 / (2 ** misses * t))
        else:
            precisions.append(100.0 * c / t)
    score = bp * math.exp(sum(math.log(p) for p in precisions) / MAX_ORDER)
    return Bleu(score, tuple(precisions), bp, h, r)


def f_measure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n(hypothesis: str, reference: str, n: int) -> tuple[float, float, float]:
    """(precision, recall, F) of the hypothesis's n-grams against the reference's."""
    hyp, ref = ngrams(words(hypothesis), n), ngrams(words(reference), n)
    matched = clipped_matches(hyp, ref)
    p = matched / max(sum(hyp.values()), 1)
    r = matched / max(sum(ref.values()), 1)
    return p, r, f_measure(p, r)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row."""
    row = [0] * (len(b) + 1)  # row[j]: LCS of a[:i] and b[:j], for the current i
    for x in a:
        diagonal = 0  # LCS of a[:i−1] and b[:j−1]
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypothesis: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, F) with the longest common subsequence of words as the match."""
    hyp, ref = words(hypothesis), words(reference)
    if not hyp or not ref:
        return 0.0, 0.0, 0.0
    m = lcs_length(ref, hyp)
    p, r = m / len(hyp), m / len(ref)
    return p, r, f_measure(p, r)


def mean_rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures, each averaged over the pairs."""
    pairs = list(zip(hypotheses, references, strict=True))
    if not pairs:
        raise ValueError("ROUGE needs at least one pair")
    scores = {"rouge1": [rouge_n(h, r, 1)[2] for h, r in pairs],
              "rouge2": [rouge_n(h, r, 2)[2] for h, r in pairs],
              "rougeL": [rouge_l(h, r)[2] for h, r in pairs]}
    return {k: sum(v) / len(v) for k, v in scores.items()}


__all__ = ["Bleu", "corpus_bleu", "lcs_length", "mean_rouge", "ngrams", "rouge_l", "rouge_n",
           "words"]
