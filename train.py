"""Train a tiny GPT on one process or many: ``mpirun -n N python train.py [--dp D --tp T --pp P]``.

Run ``python train.py --help`` for every flag. With no flags it trains the ``small`` preset
on the built-in corpus for about a minute. Exit codes: 0 ok; 2 bad usage or configuration
(every rank exits before any communication); 1 any other failure (the whole job ends).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# One BLAS thread per rank unless the user chose otherwise: several ranks each running
# several BLAS threads on the same cores slow each other down badly.
if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np

from mpipar import backend
from mpipar.checkpoint import CheckpointError, check_state, load_checkpoint, save_checkpoint
from mpipar.data import CharTokenizer, DataError, default_corpus, load_text, make_dataset
from mpipar.grid import ConfigError, resolve_sizes, validate_layout
from mpipar.model import PRESETS, GPTConfig, flops_per_token
from mpipar.training import MetricsWriter, TrainConfig, format_progress, peak_memory_bytes

DEFAULT_PRESET = "small"
DEFAULT_STEPS = 400


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="train.py",
        description="Train a GPT-2 style character model with data, tensor and pipeline "
                    "parallelism written out with MPI. World size must equal dp × tp × pp.",
        epilog="Examples:  python train.py   |   mpirun -n 4 python train.py --dp 4   |   "
               "mpirun -n 4 python train.py --tp 2 --dp 2 --dtype float64",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = ap.add_argument_group("layout")
    g.add_argument("--dp", type=positive_int, help="data-parallel size (default: N/(tp·pp))")
    g.add_argument("--tp", type=positive_int, help="tensor-parallel size (default 1)")
    g.add_argument("--pp", type=positive_int, help="pipeline-parallel size (default 1)")

    g = ap.add_argument_group("model (a preset, then explicit flags override it)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    g.add_argument("--n-layer", type=positive_int)
    g.add_argument("--n-head", type=positive_int)
    g.add_argument("--d-model", type=positive_int)
    g.add_argument("--seq-len", type=positive_int)
    g.add_argument("--dropout", type=float, default=0.0)

    g = ap.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS)
    g.add_argument("--batch-size", type=positive_int,
                   help="global batch in sequences (default: the preset's)")
    g.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final learning rate as a fraction of --lr (cosine decay)")
    g.add_argument("--warmup-steps", type=non_negative_int, default=20)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="global norm; 0 disables")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--seed", type=non_negative_int, default=1337)
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    g.add_argument("--eval-every", type=non_negative_int, default=100,
                   help="validate every K steps and at the end; 0: only at the end")
    g.add_argument("--eval-batches", type=positive_int, default=4)
    g.add_argument("--log-every", type=positive_int, default=25)
    g.add_argument("--data", metavar="FILE",
                   help="UTF-8 text to train on (default: the built-in corpus)")

    g = ap.add_argument_group("parallelism")
    g.add_argument("--microbatches", type=positive_int, default=1)
    g.add_argument("--schedule", choices=["naive", "gpipe", "1f1b", "interleaved"],
                   default="1f1b")
    g.add_argument("--virtual-stages", type=positive_int, default=1)
    g.add_argument("--zero", type=int, choices=[0, 1, 2], default=0)
    g.add_argument("--dp-strategy", choices=["per-param", "flat", "bucketed"],
                   default="bucketed", help="how data parallelism all-reduces gradients")
    g.add_argument("--bucket-mb", type=positive_float, default=1.0)
    g.add_argument("--no-overlap", action="store_true",
                   help="all-reduce buckets after backward instead of during it")
    g.add_argument("--allreduce", choices=["mpi", "ring"], default="mpi")
    g.add_argument("--sequence-parallel", action="store_true")

    g = ap.add_argument_group("output")
    g.add_argument("--metrics", metavar="FILE", help="JSON lines of metrics (rank 0)")
    g.add_argument("--trace", metavar="FILE", help="communication trace, JSON lines")
    g.add_argument("--save", metavar="DIR", help="write a checkpoint at the end")
    g.add_argument("--stop-at", type=positive_int, metavar="STEP",
                   help="stop after STEP steps, as if interrupted (the learning-rate schedule "
                        "still follows --steps); resume later with --resume")
    g.add_argument("--resume", metavar="DIR", help="continue from a checkpoint")
    g.add_argument("--sample", type=non_negative_int, default=0, metavar="N",
                   help="print N generated characters at the end")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=positive_int)
    g.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    g.add_argument("--quiet", action="store_true", help="print only the final summary")
    return ap


class UsageError(ValueError):
    """A bad combination of flags (exit code 2)."""


def configure(args: argparse.Namespace, world_size: int):
    """Turn flags into configs and validate them, touching no other process."""
    preset = dict(PRESETS[args.preset])
    batch_size = args.batch_size or preset.pop("batch_size")
    preset.pop("batch_size", None)
    shape = {k: getattr(args, k) or v for k, v in preset.items()}
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if shape["d_model"] % shape["n_head"]:
        raise UsageError(f"--n-head {shape['n_head']} does not divide --d-model "
                         f"{shape['d_model']}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    # Values argparse lets through that would fail (or silently do nothing) mid-run;
    # written so that NaN fails every test.
    for flag, value, ok, rule in (
        ("--lr", args.lr, math.isfinite(args.lr), "finite"),
        ("--min-lr-ratio", args.min_lr_ratio, 0.0 <= args.min_lr_ratio <= 1.0, "in [0, 1]"),
        ("--weight-decay", args.weight_decay, 0.0 <= args.weight_decay < math.inf,
         "finite and >= 0"),
        ("--grad-clip", args.grad_clip, 0.0 <= args.grad_clip < math.inf,
         "finite and >= 0 (0 disables clipping)"),
        ("--momentum", args.momentum, 0.0 <= args.momentum < 1.0, "in [0, 1)"),
    ):
        if not ok:
            raise UsageError(f"{flag} must be {rule}, got {value}")
    # Output paths are checked now, not after training: a run must not end by failing to save.
    from mpipar.checkpoint import META_FILE, STATE_FILE

    for flag, path in (("--metrics", args.metrics), ("--trace", args.trace)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(path) or ".")):
            raise UsageError(f"{flag} {path}: not a file in an existing directory")
    if args.save and os.path.exists(args.save) and not (
            os.path.isdir(args.save) and set(os.listdir(args.save)) <= {STATE_FILE, META_FILE}):
        raise UsageError(f"--save {args.save} exists and is not a checkpoint directory; "
                         "refusing to replace it")

    resumed = None
    if args.resume:
        arrays, meta = load_checkpoint(args.resume)
        resumed = (arrays, meta)
        tokenizer = CharTokenizer.from_chars(meta.get("tokenizer", []))
    if args.data:
        text, source = load_text(args.data), args.data
    else:
        text, description = default_corpus()
        source = description
    if resumed is None:
        tokenizer = CharTokenizer.from_text(text)
    data = make_dataset(text, tokenizer, seq_len=shape["seq_len"], source=source)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, dropout=args.dropout, dtype=args.dtype,
                    **shape)
    dp, tp, pp = resolve_sizes(world_size, args.dp, args.tp, args.pp)
    if args.zero and args.optimizer != "adamw":
        raise UsageError(f"--zero {args.zero} shards AdamW's state; it does not apply to "
                         f"--optimizer {args.optimizer}")
    validate_layout(world_size, dp, tp, pp, batch_size=batch_size,
                    microbatches=args.microbatches, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    d_model=cfg.d_model, virtual_stages=args.virtual_stages,
                    schedule=args.schedule, zero=args.zero,
                    sequence_parallel=args.sequence_parallel, seq_len=cfg.seq_len)
    tc = TrainConfig(
        steps=args.steps, batch_size=batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed, optimizer=args.optimizer,
        momentum=args.momentum, eval_every=args.eval_every, eval_batches=args.eval_batches,
        log_every=args.log_every, microbatches=args.microbatches, schedule=args.schedule,
        virtual_stages=args.virtual_stages, zero=args.zero, bucket_mb=args.bucket_mb,
        overlap=not args.no_overlap, allreduce=args.allreduce,
        dp_strategy=args.dp_strategy.replace("-", "_"),
        sequence_parallel=args.sequence_parallel)
    if resumed is not None:
        check_resume(resumed, cfg, tc, dp)
    return cfg, tc, (dp, tp, pp), data, source, resumed


def check_resume(resumed, cfg: GPTConfig, tc: TrainConfig, dp: int = 1) -> None:
    """The checkpoint must be of this model and this run (only --steps... may not change)."""
    arrays, meta = resumed
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError("checkpoint meta.json has no 'model' section")
    for key, value in cfg.to_dict().items():
        if saved.get(key) != value:
            raise CheckpointError(f"checkpoint was saved with {key}={saved.get(key)!r} but this "
                                  f"run has {key}={value!r}")
    from mpipar.model import GPT
    from mpipar.optim import SGD, AdamW

    model = GPT(cfg)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    model_state = {k[6:]: v for k, v in arrays.items() if k.startswith("model.")}
    check_state(expected, model_state, what="model")
    # A fresh optimizer of this run's kind holds every state array, zeroed (ZeRO shards AdamW).
    if tc.optimizer == "sgd":
        fresh = SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum)
    else:
        fresh = AdamW(model.parameters(), lr=tc.lr)
    opt_state = {k[6:]: v for k, v in arrays.items() if k.startswith("optim.")}
    check_state({k: v.shape for k, v in fresh.state_dict().items()}, opt_state,
                what="optimizer")
    step = meta.get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint meta.json has a bad step {step!r}")
    if step > tc.steps:
        raise CheckpointError(f"checkpoint is at step {step}, past --steps {tc.steps}")


# Settings that change the numbers a resumed run computes (layout-only options do not).
RESUME_SENSITIVE = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                    "grad_clip", "seed", "optimizer", "momentum")


def changed_settings(saved: dict, tc: TrainConfig) -> str:
    """``"lr 0.003 -> 0.01, ..."`` for every resume-sensitive setting that changed."""
    now = tc.to_dict()
    return ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in RESUME_SENSITIVE
                     if k in saved and saved[k] != now[k])


def launcher_rank() -> int:
    """This process's rank as the MPI launcher announced it (read before MPI starts)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A bad flag is reported in one line that names it and its value, like every other usage
    # error, rather than after the whole usage block (--help shows that).
    parser.print_usage = lambda file=None: None
    if launcher_rank() != 0:  # under mpirun, let one rank report a bad flag, not every rank
        parser.error = lambda message: sys.exit(2)
    args = parser.parse_args(argv)
    from mpipar.comm import world_size_and_rank

    world_size, rank = world_size_and_rank()
    try:
        backend.use_device(args.device)
        cfg, tc, sizes, data, source, resumed = configure(args, world_size)
    except (UsageError, ConfigError, DataError, CheckpointError, ValueError, RuntimeError) as exc:
        if rank == 0:
            print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    return run(args, cfg, tc, sizes, data, source, resumed, rank)


def run(args, cfg, tc, sizes, data, source, resumed, rank) -> int:
    from mpipar.comm import Comm, install_excepthook
    from mpipar.grid import ProcessGrid, check_same_config
    from mpipar.trace import Tracer, format_summary_table, to_chrome_trace, write_jsonl
    from mpipar.training import Trainer

    tracer = Tracer(rank, enabled=True)
    world = Comm.world(tracer)
    install_excepthook(world)
    report = print if rank == 0 else (lambda *a, **k: None)  # the final summary
    say = report if not args.quiet else (lambda *a, **k: None)  # progress, suppressed by --quiet
    try:
        check_same_config(world, {"argv": sys.argv[1:], "model": cfg.to_dict(),
                                  "train": tc.to_dict(), "sizes": list(sizes),
                                  "vocab": data.tokenizer.to_json()})
    except ConfigError as exc:
        if rank == 0:
            print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    dp, tp, pp = sizes
    grid = ProcessGrid.build(world, dp, tp, pp)
    trainer = Trainer(cfg, tc, grid, data, tracer)
    if resumed is not None:
        arrays, meta = resumed
        trainer.load_full_state(
            {k[6:]: v for k, v in arrays.items() if k.startswith("model.")},
            {k[6:]: v for k, v in arrays.items() if k.startswith("optim.")})
        trainer.step = meta["step"]
        changed = changed_settings(meta.get("train", {}), tc)
        if changed:
            say("warning: resuming with training settings that differ from the checkpoint's "
                f"({changed}); the run will not continue exactly as it would have")
    n_params = sum(int(np.prod(s)) for s in trainer.expected_model_shapes().values())
    say(f"mpipar | world {world.size} = dp {dp} × tp {tp} × pp {pp} | {source}")
    say(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
        f"seq_len {cfg.seq_len}, vocab {cfg.vocab_size}, {n_params:,} parameters, {cfg.dtype}")
    say(f"training: {tc.steps} steps of {tc.batch_size} sequences ({tc.batch_size * cfg.seq_len}"
        f" tokens), {tc.microbatches} microbatch(es), {tc.optimizer} lr {tc.lr}"
        + (f", resuming at step {trainer.step}" if resumed is not None else ""))
    from mpipar.parallel.zero import format_memory_report, memory_report

    memory = memory_report(trainer.optimizer, trainer.grad_sync, trainer.params)
    if tc.zero and dp > 1:
        say(format_memory_report(memory))

    metrics = MetricsWriter(args.metrics, rank == 0)
    t_start = time.perf_counter()
    step_times, tokens = [], 0
    last = None
    stop_at = min(tc.steps, args.stop_at or tc.steps)
    while trainer.step < stop_at:
        m = trainer.train_step()
        last = m
        step_times.append(m["step_time_s"])
        tokens += tc.batch_size * cfg.seq_len
        metrics.write(m)
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"loss became {m['loss']} at step {m['step']}")
        if m["step"] % tc.log_every == 0 or trainer.step == tc.steps:
            say(format_progress(m, tc.steps, time.perf_counter() - t_start))
        final = trainer.step == stop_at
        if (tc.eval_every and trainer.step % tc.eval_every == 0) or final:
            val = trainer.evaluate()
            record = {"step": m["step"], "val_loss": val, "val_ppl": math.exp(min(val, 50)),
                      "val_bpc": val / math.log(2)}
            metrics.write(record)
            say(f"step {m['step']:5d} | val loss {val:.4f} | perplexity {record['val_ppl']:.2f}"
                f" | {record['val_bpc']:.3f} bits/char")
    elapsed = time.perf_counter() - t_start

    if args.save:
        model_state, opt_state = trainer.full_state()
        if rank == 0:
            arrays = {f"model.{k}": v for k, v in model_state.items()}
            arrays.update({f"optim.{k}": v for k, v in opt_state.items()})
            save_checkpoint(args.save, arrays, {
                "format": 1, "step": trainer.step, "model": cfg.to_dict(),
                "train": tc.to_dict(), "tokenizer": data.tokenizer.to_json(),
                "layout": {"dp": dp, "tp": tp, "pp": pp}})
            say(f"saved checkpoint to {args.save} (step {trainer.step})")
    if args.sample:
        prompt = data.tokenizer.encode("\n").tolist() if "\n" in data.tokenizer.chars else [0]
        out = trainer.generate(prompt, args.sample, temperature=args.temperature,
                               top_k=args.top_k, seed=tc.seed)
        if rank == 0:
            print("--- sample ---")
            print(data.tokenizer.decode(out[len(prompt):]))
            print("--------------")

    # Communication summary: every rank's totals, gathered as a small control message.
    all_totals = world.allgather_object(
        {f"{op}|{group}": v for (op, group), v in tracer.totals().items()})
    peaks = world.allgather_object(peak_memory_bytes())
    pipeline = None
    if trainer.pipeline is not None:  # measured bubble and stashed activations, every rank's
        from mpipar.parallel.pipeline.measure import pipeline_report, step_extents

        pipeline = pipeline_report(world.allgather_object(
            (step_extents(tracer.records), trainer.pipeline.memory_summary())),
            tc.schedule, pp, tc.microbatches, tc.virtual_stages)
    if args.trace:
        write_jsonl(_rank_path(args.trace, rank, world.size), tracer.records)
        if world.size > 1:
            world.barrier()
        if rank == 0:
            merge_traces(args.trace, world.size)
    if rank == 0:
        summary_table(all_totals, sum(step_times), format_summary_table, report)
        median = float(np.median(step_times[1:] if len(step_times) > 1 else step_times or [0]))
        tps = tc.batch_size * cfg.seq_len / median if median else 0.0
        summary = {
            "event": "summary", "steps": len(step_times), "tokens": tokens,
            "time_s": elapsed, "median_step_time_s": median, "tokens_per_s": tps,
            "flops_per_token": flops_per_token(cfg),
            "final_loss": last["loss"] if last else None,
            "layout": {"world": world.size, "dp": dp, "tp": tp, "pp": pp},
            "comm": merge_totals(all_totals), "peak_memory_bytes": peaks,
            "memory_rank0": memory,  # optimizer-state and gradient bytes (ZeRO's saving)
        }
        if pipeline is not None:
            from mpipar.parallel.pipeline.measure import format_pipeline_report

            summary["pipeline"] = pipeline
            report(format_pipeline_report(pipeline))
        metrics.write(summary)
        report(f"done: {len(step_times)} steps in {elapsed:.1f}s, median step {median * 1e3:.1f} ms"
            f", {tps:.0f} tokens/s")
    metrics.close()
    if args.trace and rank == 0:
        import json

        with open(os.path.splitext(args.trace)[0] + ".chrome.json", "w") as f:
            from mpipar.trace import load_jsonl

            json.dump(to_chrome_trace(load_jsonl(args.trace)), f)
    return 0


def _rank_path(path: str, rank: int, size: int) -> str:
    return path if size == 1 else f"{path}.rank{rank}"


def merge_traces(path: str, size: int) -> None:
    """Concatenate the per-rank trace files into ``path`` (one JSON object per line)."""
    if size == 1:
        return
    with open(path, "w", encoding="utf-8") as out:
        for r in range(size):
            part = f"{path}.rank{r}"
            with open(part, encoding="utf-8") as f:
                out.write(f.read())
            os.remove(part)


def merge_totals(all_totals: list[dict]) -> dict[str, dict[str, float]]:
    """Sum per-rank (op|group) totals: calls, bytes and time over all ranks."""
    merged: dict[str, dict[str, float]] = {}
    for totals in all_totals:
        for key, v in totals.items():
            acc = merged.setdefault(key, {"calls": 0, "bytes": 0, "time": 0.0})
            for field in ("calls", "bytes", "time"):
                acc[field] += v[field]
    return merged


def summary_table(all_totals, step_time_total, format_fn, say) -> None:
    merged = merge_totals(all_totals)
    if not merged:
        return
    n = len(all_totals)
    per_rank = {tuple(k.split("|")): {f: v[f] / n for f in v} for k, v in merged.items()}
    say("communication per rank (mean over ranks):")
    say(format_fn(per_rank, step_time_total))



if __name__ == "__main__":
    sys.exit(main())
