"""Generate text from a checkpoint with a KV cache, on one process or under tp and pp.

    python -m mpipar.generate --checkpoint DIR --prompt TEXT -n N
    mpirun -n 4 python -m mpipar.generate --checkpoint DIR --prompts FILE -n N --tp 2 --pp 2

The checkpoint may come from any training layout, float or int8 (`mpipar.quantize`). With
one prompt the text streams to stdout token by token; with several (``--prompts FILE``, one
per line) they are generated as one batch and printed each under a ``=== prompt i ===``
line when all are done. Timings go to stderr: time to first token (the prefill), the time
per later token, and tokens per second. Sampling, the context window and stopping are
described in `mpipar.decoding`; the cache in `mpipar.kv_cache`. Exit codes as train.py's
(docs/design.md §7): a bad flag, prompt or checkpoint exits 2 with one line.
"""

from __future__ import annotations

# isort: off
import mpipar.threads  # noqa: F401  (before numpy: one BLAS thread per rank under mpirun)
# isort: on

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from mpipar import backend
from mpipar.agreement import ERROR, RankReport
from mpipar.checkpoint import CheckpointError
from mpipar.data import CharTokenizer, DataError
from mpipar.decoding import Generator, SamplingConfig
from mpipar.flags import positive_int
from mpipar.grid import ConfigError
from mpipar.inference import LoadedCheckpoint, load_for_inference
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

PROG = "python -m mpipar.generate"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Generate text from a checkpoint with "
                                 "a KV cache (under mpirun: --tp, --pp).")
    ap.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="checkpoint of train.py --save or python -m mpipar.quantize")
    prompt = ap.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text to continue (default: a newline, or the first "
                        "character of the vocabulary if it has none)")
    prompt.add_argument("--prompts", metavar="FILE",
                        help="UTF-8 file of prompts, one per line, generated as one batch")
    ap.add_argument("-n", "--num-tokens", type=int, default=200,
                    help="tokens (characters) to generate per prompt (default: 200)")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="divide the logits by this (> 0) before sampling (default: 0.8)")
    ap.add_argument("--top-k", type=int, metavar="K",
                    help="sample among the K likeliest tokens only (default: all)")
    ap.add_argument("--top-p", type=float, default=1.0, metavar="P",
                    help="sample among the likeliest tokens that make up probability P, in "
                         "(0, 1] (default: 1, all)")
    ap.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    ap.add_argument("--seed", type=int, default=0,
                    help="prompt i draws from the stream of seed + i (default: 0)")
    ap.add_argument("--stop", metavar="TEXT",
                    help="end a prompt's generation once its text ends with TEXT (kept)")
    ap.add_argument("--shift", type=positive_int, default=1,
                    help="when the context window is full, drop this many tokens at once and "
                         "prefill again (default: 1, the context is always the last seq_len "
                         "tokens)")
    ap.add_argument("--no-cache", action="store_true",
                    help="recompute the whole context for every token (for comparison)")
    add_layout_flags(ap)
    return ap


@dataclass
class Request:
    """The prompts and settings, checked on every rank before any communication."""

    loaded: LoadedCheckpoint
    prompts: list[list[int]]
    sampling: SamplingConfig
    stop: list[int]


def read_prompts(args: argparse.Namespace, tok: CharTokenizer) -> list[list[int]]:
    """Token ids of each prompt; UsageError/DataError for an empty or unknown-character one."""
    if args.prompts:
        try:
            texts = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--prompts {args.prompts}: cannot read it ({exc})") from exc
        if not texts:
            raise UsageError(f"--prompts {args.prompts} holds no prompt")
    elif args.prompt is not None:
        texts = [args.prompt]
    else:
        texts = ["\n" if "\n" in tok.chars else tok.chars[0]]
    prompts = []
    for i, text in enumerate(texts, start=1):
        where = f"prompt {i} of {args.prompts}" if args.prompts else "--prompt"
        if not text:
            raise UsageError(f"{where} is empty: give at least one character to continue")
        try:
            prompts.append(tok.encode(text).tolist())
        except DataError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return prompts


def configure(args: argparse.Namespace) -> Request:
    if args.num_tokens < 1:
        raise UsageError(f"-n must be at least 1, got {args.num_tokens}")
    if math.isnan(args.top_p):
        raise UsageError("--top-p must be in (0, 1], got nan")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    sampling.check()
    loaded = load_for_inference(args.checkpoint)
    prompts = read_prompts(args, loaded.tokenizer)
    if args.shift > loaded.cfg.seq_len:
        raise UsageError(f"--shift {args.shift} exceeds the context length {loaded.cfg.seq_len}")
    stop = []
    if args.stop:
        try:
            stop = loaded.tokenizer.encode(args.stop).tolist()
        except DataError as exc:
            raise UsageError(f"--stop: {exc}") from None
    return Request(loaded, prompts, sampling, stop)


def report(gen: Generator, request: Request, model_bytes: int, layout: str) -> str:
    """The timing line for stderr."""
    s = gen.stats
    per = statistics.median(s.step_s) if s.step_s else 0.0
    rows = len(request.prompts)
    return (f"generated {s.tokens} tokens ({rows} prompt{'s' * (rows > 1)}) in "
            f"{s.total_s:.3f} s | first token {s.first_token_s * 1e3:.1f} ms | then "
            f"{per * 1e3:.2f} ms per token (median) | {s.tokens / s.total_s:.0f} tokens/s | "
            f"{layout}, cache {'off' if gen.cache is None else 'on'}, KV cache "
            f"{model_bytes:,} bytes on rank 0")


def run(gen: Generator, request: Request, n: int, show: bool) -> list[list[int]]:
    """Generate; rank 0 (``show``) streams a single prompt's text or prints the batch's."""
    tok = request.loaded.tokenizer

    def stream(row: int, token: int) -> None:
        sys.stdout.write(tok.chars[token])
        sys.stdout.flush()

    single = len(request.prompts) == 1
    if show and single:
        sys.stdout.write(tok.decode(request.prompts[0]))
    out = gen.run(request.prompts, n, stream if show and single else None)
    if show and single:
        print()
    elif show:
        for i, (prompt, text) in enumerate(zip(request.prompts, out, strict=True), start=1):
            print(f"=== prompt {i} ===\n{tok.decode(prompt + text)}")
    return out


def main(argv: list[str] | None = None) -> int:
    args, found = parse(build_parser(), argv)
    if args is not None:
        try:
            backend.use_device(args.device)
            request = configure(args)
            sizes = check_layout(args, request.loaded, batch_size=1, allow_dp=False)
            found = found_ok(args, {"prompts": request.prompts})
        except (UsageError, ConfigError, CheckpointError, ValueError) as exc:
            found = RankReport(ERROR, str(exc))
    world, exit_code = meet(PROG, args, found)
    if exit_code is not None:
        return exit_code
    model = build(world, args, sizes, request.loaded)
    gen = Generator(model, request.sampling, use_cache=not args.no_cache, shift=args.shift,
                    stop=request.stop)
    run(gen, request, args.num_tokens, show=world.rank == 0)
    if world.rank == 0:
        cache_bytes = gen.cache.nbytes if gen.cache is not None else 0
        print(report(gen, request, cache_bytes, f"tp {sizes[1]} × pp {sizes[2]}"),
              file=sys.stderr)
    if args.trace:
        write_trace(world, args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
