"""Evaluate a checkpoint on held-out text: ``python -m mpipar.evaluate --checkpoint DIR``.

Two measures, on the held-out split of the text (its last 10%, never trained on):

**Perplexity over the whole split.** Every character of the split after the first is
predicted from the characters before it, exactly once. The split of N tokens is cut into
windows of T = seq_len inputs at offsets 0, T, 2T, ... (targets shifted by one); when T does
not divide N − 1 a last window, ending at the split's end, scores only the targets no earlier
window did. With ℓ_i = −ln p(x_i | context) the loss is the mean over the N − 1 targets:

    loss = (1/(N−1)) Σ ℓ_i  (nats/char)      perplexity = e^loss      bits/char = loss / ln 2

Windows do not overlap, so a window's first positions see little context; a sliding window
would score a little better at T times the cost. The windows go through the model in
batches, in any layout: data-parallel ranks take a share of each batch's rows, tensor- and
pipeline-parallel ranks split the model (`mpipar.inference`).

**BLEU and ROUGE of continuations** (`mpipar.text_metrics`). K passages start at evenly
spaced offsets of the split; each gives the model its first P characters as the prompt, and
the model continues it greedily for C characters, which are compared, word by word, with
the C characters that really follow.
"""

from __future__ import annotations

# isort: off
import mpipar.threads  # noqa: F401  (before numpy: one BLAS thread per rank under mpirun)
# isort: on

import argparse
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from mpipar import backend
from mpipar.agreement import ERROR, RankReport
from mpipar.checkpoint import CheckpointError
from mpipar.data import DataError, default_corpus, load_text, make_dataset, shard_rows
from mpipar.decoding import Generator, SamplingConfig
from mpipar.flags import non_negative_int, positive_int
from mpipar.grid import ConfigError
from mpipar.inference import InferenceModel, load_for_inference
from mpipar.inference_cli import (
    UsageError,
    add_layout_flags,
    build,
    check_layout,
    found_ok,
    meet,
    parse,
    write_trace,
)
from mpipar.text_metrics import corpus_bleu, mean_rouge

PROG = "python -m mpipar.evaluate"


# --------------------------------------------------------------------------------------------
# Perplexity over the whole split
# --------------------------------------------------------------------------------------------


def heldout_windows(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """``(start, first)`` per window: inputs tokens[start : start+T], scored from position
    ``first`` on; together they score each of the n − 1 targets exactly once."""
    if n_tokens < seq_len + 1:
        raise DataError(f"held-out split of {n_tokens} tokens is shorter than one window "
                        f"of {seq_len} + 1")
    full = (n_tokens - 1) // seq_len
    windows = [(k * seq_len, 0) for k in range(full)]
    rest = (n_tokens - 1) - full * seq_len
    if rest:
        windows.append((n_tokens - 1 - seq_len, seq_len - rest))
    return windows


def window_batches(tokens: np.ndarray, seq_len: int,
                   batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches ``(x, y, mask)`` of shape (batch_size, T) over all windows; the last batch is
    filled up with masked-out copies of the first window (mask 0), so every batch has the
    same shape on every rank."""
    windows = heldout_windows(len(tokens), seq_len)
    offsets = np.arange(seq_len + 1)
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo:lo + batch_size]
        chunk += [(windows[0][0], seq_len)] * (batch_size - len(chunk))  # scores nothing
        starts = np.asarray([s for s, _ in chunk])
        rows = np.asarray(tokens)[starts[:, None] + offsets].astype(np.int64)  # (B, T+1)
        first = np.asarray([f for _, f in chunk])
        mask = (np.arange(seq_len)[None, :] >= first[:, None]).astype(np.float64)
        yield rows[:, :-1], rows[:, 1:], mask


@dataclass(frozen=True)
class Perplexity:
    loss: float  # nats per character
    perplexity: float
    bits_per_char: float
    targets: int  # characters scored
    windows: int


def perplexity(model: InferenceModel, tokens: np.ndarray, batch_size: int) -> Perplexity:
    """Mean −ln p over every target of ``tokens`` (all ranks take part, all get the result).

    Each data-parallel rank scores its rows of each batch; of the ranks that hold the head,
    tensor-parallel rank 0 adds its sums, and one all-reduce totals them.
    """
    grid, seq_len = model.grid, model.cfg.seq_len
    sums = np.zeros(2)  # [Σ ℓ, targets scored]
    for x, y, mask in window_batches(tokens, seq_len, batch_size):
        xs, ys, ms = (shard_rows(a, grid.dp_rank, grid.dp) for a in (x, y, mask))
        nll = model.token_nll(xs, ys)
        if nll is not None and grid.tp_rank == 0:
            sums += [(nll * ms).sum(), ms.sum()]
    with grid.world.tracer.context(phase="other"):
        grid.world.allreduce(sums)
    loss = sums[0] / sums[1]
    return Perplexity(loss, math.exp(loss), loss / math.log(2), int(sums[1]),
                      len(heldout_windows(len(tokens), seq_len)))


# --------------------------------------------------------------------------------------------
# BLEU and ROUGE of continuations
# --------------------------------------------------------------------------------------------


def passages(tokens: np.ndarray, k: int, prompt_len: int,
             cont_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, true continuation) at ``k`` evenly spaced offsets of ``tokens``."""
    room = len(tokens) - prompt_len - cont_len
    if room < 0:
        raise DataError(f"held-out split of {len(tokens)} tokens is shorter than a passage of "
                        f"{prompt_len} + {cont_len}")
    starts = [i * room // max(k - 1, 1) for i in range(k)]
    return [(tokens[s:s + prompt_len].tolist(),
             tokens[s + prompt_len:s + prompt_len + cont_len].tolist()) for s in starts]


def continuation_scores(model: InferenceModel, tokens: np.ndarray, k: int, prompt_len: int,
                        cont_len: int, decode) -> dict[str, float]:
    """BLEU and ROUGE-1/2/L of greedy continuations of ``k`` passages.

    Data-parallel replicas share the passages (replica d takes every dp-th one) and exchange
    their texts, a small control message.
    """
    grid = model.grid
    pairs = passages(tokens, k, prompt_len, cont_len)
    mine = list(range(grid.dp_rank, k, grid.dp))
    made = []
    if mine:
        gen = Generator(model, SamplingConfig(greedy=True))
        made = gen.run([pairs[i][0] for i in mine], cont_len)
    texts = {i: decode(out) for i, out in zip(mine, made, strict=True)}
    for part in grid.world.allgather_object(texts):
        texts.update(part)
    hyps = [texts[i] for i in range(k)]
    refs = [decode(cont) for _, cont in pairs]
    return {"bleu": corpus_bleu(hyps, refs).score, **mean_rouge(hyps, refs)}


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Perplexity over the whole held-out "
                                 "split, and BLEU/ROUGE of generated continuations.")
    ap.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="checkpoint of train.py --save or python -m mpipar.quantize")
    ap.add_argument("--data", metavar="FILE",
                    help="UTF-8 text whose last 10%% is held out (default: the built-in corpus)")
    ap.add_argument("--batch-size", type=positive_int, default=32,
                    help="windows per forward pass, over all data-parallel ranks (default: 32)")
    ap.add_argument("--passages", type=non_negative_int, default=16,
                    help="passages continued for BLEU/ROUGE; 0 skips them (default: 16)")
    ap.add_argument("--prompt-chars", type=positive_int,
                    help="characters of each passage given as the prompt (default: seq_len)")
    ap.add_argument("--continuation-chars", type=positive_int, default=100,
                    help="characters generated and compared (default: 100)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    add_layout_flags(ap)
    return ap


def held_out(args: argparse.Namespace, loaded) -> tuple[np.ndarray, str]:
    """The held-out tokens in the checkpoint's vocabulary, and where they come from."""
    text, source = (load_text(args.data), args.data) if args.data else default_corpus()
    data = make_dataset(text, loaded.tokenizer, seq_len=loaded.cfg.seq_len, source=source)
    return data.val, source


def report(ppl: Perplexity, cont: dict | None, args: argparse.Namespace, n_chars: int,
           source: str, prompt_len: int) -> str:
    lines = [f"held-out text: {n_chars:,} characters (the last 10% of {source}); "
             f"{ppl.targets:,} predictions scored in {ppl.windows:,} windows",
             f"loss {ppl.loss:.4f} nats/char | perplexity {ppl.perplexity:.4f} | "
             f"bits/char {ppl.bits_per_char:.4f}"]
    if cont is not None:
        lines.append(f"{args.passages} passages, {prompt_len}-character prompts, "
                     f"{args.continuation_chars} characters greedy | BLEU {cont['bleu']:.2f} | "
                     f"ROUGE-1 {cont['rouge1']:.4f} | ROUGE-2 {cont['rouge2']:.4f} | "
                     f"ROUGE-L {cont['rougeL']:.4f}")
    if args.json:
        lines.append(json.dumps({**asdict(ppl), **(cont or {})}))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, found = parse(build_parser(), argv)
    if args is not None:
        try:
            backend.use_device(args.device)
            loaded = load_for_inference(args.checkpoint)
            tokens, source = held_out(args, loaded)
            prompt_len = args.prompt_chars or loaded.cfg.seq_len
            if args.passages:
                passages(tokens, args.passages, prompt_len, args.continuation_chars)
            sizes = check_layout(args, loaded, batch_size=args.batch_size, allow_dp=True)
            heldout_windows(len(tokens), loaded.cfg.seq_len)
            found = found_ok(args, {"data": source})
        except (UsageError, ConfigError, CheckpointError, DataError, ValueError) as exc:
            found = RankReport(ERROR, str(exc))
    world, exit_code = meet(PROG, args, found)
    if exit_code is not None:
        return exit_code
    model = build(world, args, sizes, loaded)
    ppl = perplexity(model, tokens, args.batch_size)
    cont = None
    if args.passages:
        cont = continuation_scores(model, tokens, args.passages, prompt_len,
                                   args.continuation_chars, loaded.tokenizer.decode)
    if world.rank == 0:
        print(report(ppl, cont, args, len(tokens), source, prompt_len))
    if args.trace:
        write_trace(world, args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
