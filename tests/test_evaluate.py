"""Evaluation: the whole held-out split scored once, BLEU and ROUGE, ``python -m mpipar.evaluate``.

* the windows score every target of a split exactly once, whatever its length;
* in-process, the perplexity equals −ln p summed directly from the 1-process model's logits
  (and the model's own mean cross-entropy where the windows tile the split);
* BLEU and ROUGE-1/2/L against values computed with ``sacrebleu`` (``tokenize='none'``, its
  default ``exp`` smoothing) and ``rouge-score`` (a whitespace tokenizer) on fixed examples,
  and, where those packages are installed (``pip install -e '.[dev]'``), against them live on
  random examples, to 1e-6;
* the command prints perplexity and bits/char and refuses text outside the vocabulary;
* training's periodic validation scores ``--eval-tokens`` rounded up to whole batches, and the
  old ``--eval-batches`` flag names its replacement.
(Evaluation in every dp × tp × pp layout is checked by ``mpi_scripts/inference_checks.py``,
run from ``test_generate.py``.)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import TINY_TEXT, check_ok, describe_run

from mpipar.autograd import no_grad
from mpipar.data import CharTokenizer, eval_batches, make_dataset
from mpipar.evaluate import heldout_windows, perplexity, window_batches
from mpipar.flags import UsageError, parse_args
from mpipar.grid import ProcessGrid
from mpipar.inference import InferenceModel
from mpipar.model import GPT, GPTConfig
from mpipar.text_metrics import corpus_bleu, lcs_length, mean_rouge, rouge_l, rouge_n
from mpipar.trace import Tracer
from mpipar.training import TrainConfig, Trainer

TOL = 1e-6


@pytest.mark.parametrize("n,t", [(9, 4), (10, 4), (5, 4), (103, 8), (33, 32)])
def test_windows_score_every_target_once(n, t):
    scored = []
    for start, first in heldout_windows(n, t):
        assert 0 <= start and start + t + 1 <= n, f"window at {start} runs past the split"
        scored += range(start + 1 + first, start + 1 + t)  # positions of scored targets
    assert sorted(scored) == list(range(1, n)), "each target once, and only targets"


def test_batches_mask_the_filler_rows():
    batches = list(window_batches(np.arange(30), 4, 3))  # 8 windows: 3 batches, 1 filler row
    masks = np.concatenate([m for _, _, m in batches])
    assert masks.shape == (9, 4) and masks.sum() == 29 and not masks[-1].any()
    x, y, _ = batches[0]
    np.testing.assert_array_equal(y, x + 1)


@pytest.fixture(scope="module")
def model() -> tuple[GPT, InferenceModel]:
    cfg = GPTConfig(vocab_size=9, n_layer=2, n_head=2, d_model=8, seq_len=6, dtype="float64")
    gpt = GPT(cfg)
    gpt.initialize(5)
    gpt.eval()
    inference = InferenceModel(cfg, ProcessGrid.single())
    inference.load({name: p.data.copy() for name, p in gpt.named_parameters()})
    return gpt, inference


@pytest.mark.parametrize("n", [31, 40])
def test_perplexity_is_the_mean_over_every_target(model, n):
    gpt, inference = model
    tokens = np.random.default_rng(n).integers(0, 9, size=n)
    got = perplexity(inference, tokens, batch_size=2)
    total = 0.0
    with no_grad():
        for start, first in heldout_windows(n, 6):
            z = gpt(tokens[None, start:start + 6]).data[0]  # (6, V)
            logp = z - z.max(axis=1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
            targets = tokens[start + 1:start + 7]
            total -= logp[np.arange(first, 6), targets[first:]].sum()
    assert got.targets == n - 1
    assert abs(got.loss - total / (n - 1)) <= 1e-12 * got.loss
    assert got.perplexity == pytest.approx(math.exp(got.loss), rel=1e-15)
    assert got.bits_per_char == pytest.approx(got.loss / math.log(2), rel=1e-15)
    if (n - 1) % 6 == 0:  # the windows tile the split: the model's own mean cross-entropy
        x = np.stack([tokens[s:s + 6] for s, _ in heldout_windows(n, 6)])
        y = np.stack([tokens[s + 1:s + 7] for s, _ in heldout_windows(n, 6)])
        with no_grad():
            assert abs(float(gpt(x, y).data) - got.loss) <= 1e-12 * got.loss


# ---- BLEU and ROUGE --------------------------------------------------------------------------

HYPS = ["the cat sat on the mat today", "a quick brown fox jumps", "x y z", "it is what it is"]
REFS = ["the cat is on the mat", "the quick brown fox jumped over", "no overlap here at all",
        "it is what it was and is"]
# sacrebleu 2.6.0 corpus_bleu(HYPS, [REFS], tokenize="none"); rouge-score 0.1.2 RougeScorer
# with a whitespace tokenizer, F-measure averaged over the pairs.
BLEU = 27.929240992479425
ROUGE = {"rouge1": 0.537004662004662, "rouge2": 0.3974747474747474,
         "rougeL": 0.537004662004662}


def test_bleu_and_rouge_match_the_reference_packages_on_fixed_examples():
    bleu = corpus_bleu(HYPS, REFS)
    assert abs(bleu.score - BLEU) <= TOL, bleu
    assert bleu.precisions == pytest.approx((65.0, 50.0, 100 / 3, 12.5), abs=TOL)
    assert bleu.brevity_penalty == pytest.approx(math.exp(1 - 24 / 20), abs=TOL)  # 20 words for 24
    for key, value in mean_rouge(HYPS, REFS).items():
        assert abs(value - ROUGE[key]) <= TOL, f"{key}: {value} vs {ROUGE[key]}"
    # smoothing: no 3- or 4-gram matches; they get 1/(2·3) and 1/(4·1) of their n-grams
    smoothed = corpus_bleu(["the the the cat"], ["the cat sat"])
    assert smoothed.precisions == pytest.approx((50.0, 100 / 3, 25.0, 25.0), abs=TOL)
    assert abs(smoothed.score - 31.947155212313625) <= TOL


def test_rouge_pieces():
    assert lcs_length("a b c d e".split(), "b x d e".split()) == 3
    assert rouge_n("a b a", "a a c", 1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert rouge_l("", "a b") == (0.0, 0.0, 0.0)
    assert corpus_bleu([""], ["a b"]).score == 0.0


def test_bleu_and_rouge_match_the_reference_packages_live():
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    class Whitespace:
        def tokenize(self, text: str) -> list[str]:
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Whitespace())
    rng = np.random.default_rng(0)
    vocab = "the a cat dog sat on mat is was big".split()
    for _ in range(50):
        k = int(rng.integers(1, 5))
        hyps = [" ".join(rng.choice(vocab, size=rng.integers(0, 12))) for _ in range(k)]
        refs = [" ".join(rng.choice(vocab, size=rng.integers(1, 12))) for _ in range(k)]
        want = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score
        assert abs(corpus_bleu(hyps, refs).score - want) <= TOL, (hyps, refs)
        for key, value in mean_rouge(hyps, refs).items():
            pairs = zip(hyps, refs, strict=True)
            ref = np.mean([scorer.score(r, h)[key].fmeasure for h, r in pairs])
            assert abs(value - ref) <= TOL, (key, hyps, refs)


# ---- the command ----------------------------------------------------------------------------


def test_command_reports_perplexity_and_scores(run_python, tiny_checkpoint, tiny_data):
    proc = check_ok(run_python(["-m", "mpipar.evaluate", "--checkpoint", tiny_checkpoint,
                                "--data", tiny_data, "--passages", "3",
                                "--continuation-chars", "30", "--json"], timeout=60))
    lines = proc.stdout.splitlines()
    result = json.loads(lines[-1])
    n_val = len(TINY_TEXT) - int(len(TINY_TEXT) * 0.9)
    assert result["targets"] == n_val - 1 and result["windows"] == -(-(n_val - 1) // 32)
    assert f"perplexity {result['perplexity']:.4f}" in proc.stdout
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert 0 <= result["bleu"] <= 100 and all(0 <= result[k] <= 1 for k in ROUGE)


def test_command_refuses_text_outside_the_vocabulary(run_python, tiny_checkpoint, text_file):
    data = text_file("other.txt", "QQQQ" * 200)
    proc = run_python(["-m", "mpipar.evaluate", "--checkpoint", tiny_checkpoint,
                       "--data", data], timeout=60)
    assert proc.returncode == 2, describe_run(proc)
    assert len(proc.stderr.splitlines()) == 1 and "'Q'" in proc.stderr, proc.stderr


# ---- training's periodic validation -------------------------------------------------------


def test_periodic_validation_scores_eval_tokens_rounded_up_to_batches():
    text = TINY_TEXT
    tok = CharTokenizer.from_text(text)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=8, seq_len=8,
                    dtype="float64")
    data = make_dataset(text, tok, seq_len=8)
    tc = TrainConfig(batch_size=4, eval_tokens=2 * 4 * 8 + 1)  # just over 2 batches: 3
    trainer = Trainer(cfg, tc, ProcessGrid.single(), data, Tracer(0))
    model = trainer.chunks[0]
    with no_grad():
        want = np.mean([float(model(x, y).data)
                        for x, y in eval_batches(data.val, 3, 4, 8, tc.seed)])
    assert abs(trainer.evaluate() - want) <= 1e-12 * want


def test_eval_batches_flag_names_its_replacement():
    with pytest.raises(UsageError, match="--eval-batches was replaced by --eval-tokens"):
        parse_args(["--eval-batches", "4"])
