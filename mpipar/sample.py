"""Generate text from a saved checkpoint: ``python -m mpipar.sample --checkpoint DIR``.

Sampling draws each next token from softmax(logits / temperature), restricted to the
``top_k`` most likely tokens when given. The random stream is ``default_rng(seed)``, so the
same checkpoint, prompt and seed give the same text in every layout.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import numpy as np

from mpipar.autograd import no_grad
from mpipar.checkpoint import CheckpointError, check_state, read_checkpoint, unpack_state
from mpipar.data import CharTokenizer, DataError
from mpipar.model import GPT, GPTConfig
from mpipar.resume import model_specs, saved_vocabulary


def sample_tokens(logits_fn: Callable[[np.ndarray], np.ndarray], prompt: list[int], n: int,
                  seq_len: int, *, temperature: float = 1.0, top_k: int | None = None,
                  seed: int = 0) -> list[int]:
    """Extend ``prompt`` by ``n`` tokens. ``logits_fn(idx (1, t)) -> (1, V)`` next-token logits.

    The context is cropped to the last ``seq_len`` tokens. ``temperature`` 0 means greedy.
    """
    rng = np.random.default_rng(seed)
    tokens = list(prompt)
    for _ in range(n):
        idx = np.asarray([tokens[-seq_len:]], dtype=np.int64)
        logits = np.asarray(logits_fn(idx), dtype=np.float64)[0]
        if temperature <= 0:
            tokens.append(int(np.argmax(logits)))
            continue
        logits = logits / temperature
        if top_k is not None and 0 < top_k < logits.size:
            cutoff = np.partition(logits, -top_k)[-top_k]
            logits = np.where(logits < cutoff, -np.inf, logits)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        tokens.append(int(rng.choice(p.size, p=p)))
    return tokens


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mpipar.sample",
                                 description="Generate text from a checkpoint saved by "
                                             "train.py --save DIR.")
    ap.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="directory written by train.py --save")
    ap.add_argument("-n", "--num-chars", type=_count, default=200,
                    help="characters to generate (default: 200)")
    ap.add_argument("--prompt", default=None,
                    help="text to start from (default: a newline, or the first character of "
                         "the vocabulary if it has no newline)")
    ap.add_argument("--temperature", type=_temperature, default=0.8,
                    help="divide the logits by this before sampling; 0 always takes the most "
                         "likely character (default: 0.8)")
    ap.add_argument("--top-k", type=_positive, default=None, metavar="K",
                    help="sample only among the K most likely characters (default: all)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the sampling random stream (default: 0)")
    return ap


def load_model(directory: str) -> tuple[GPT, GPTConfig, CharTokenizer]:
    """The model of a checkpoint, every array checked against it before it is loaded.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it.
    """
    ckpt = read_checkpoint(directory)
    try:
        cfg = GPTConfig(**ckpt.meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: meta.json has no usable model configuration "
                              f"({type(exc).__name__}: {exc})") from exc
    tokenizer = saved_vocabulary(ckpt)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{ckpt.path}: meta.json has {tokenizer.vocab_size} characters "
                              f"in its vocabulary but a model of vocab_size {cfg.vocab_size}")
    model_state, _ = unpack_state(ckpt.specs)
    check_state(model_specs(cfg), model_state)
    model = GPT(cfg)
    model.load_state_dict(unpack_state(ckpt.arrays())[0])
    return model, cfg, tokenizer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, cfg, tok = load_model(args.checkpoint)
        if args.prompt is None:
            prompt = tok.encode("\n").tolist() if "\n" in tok.chars else [0]
        else:
            prompt = tok.encode(args.prompt).tolist() or [0]
    except (CheckpointError, DataError) as exc:
        print(f"sample: error: {exc}", file=sys.stderr)
        return 2
    model.eval()
    with no_grad():
        out = sample_tokens(lambda idx: model(idx).data[:, -1, :], prompt, args.num_chars,
                            cfg.seq_len, temperature=args.temperature, top_k=args.top_k,
                            seed=args.seed)
    print(tok.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
