"""mpipar next to PyTorch on the CPU: the same GPT, the same batch, side by side.

    python bench/bench_peers.py [--preset medium] [--steps 8] [--warmup 2] [--json]

The same model on the same machine, one after another:

* **mpipar**, 1 process with 1 BLAS thread, 1 process with 2 BLAS threads, and data
  parallelism over 2 processes of 1 thread each (``mpirun -n 2 python train.py --dp 2``);
* **PyTorch eager** (the optional ``bench`` extra: ``pip install -e '.[bench]'``), the same
  GPT written the way a PyTorch user writes it (``nn.Linear``, ``nn.LayerNorm``, tanh GELU,
  ``scaled_dot_product_attention`` with a causal mask, the head tied to the embedding,
  ``torch.optim.AdamW`` with decay on matrices only, gradient clipping at 1.0), float32, with
  1 and with 2 intra-op threads;
* **PyTorch DistributedDataParallel** over 2 processes of 1 thread each, gloo backend, each
  computing half of the global batch.

Each configuration trains ``--warmup`` unmeasured steps, then ``--steps`` measured ones; the
configurations take turns for ``--rounds`` rounds, and each reports its best round's median
step time (a busy spell of a shared machine then slows one round, not the comparison). The
ratios printed are mpipar's throughput over PyTorch's for the same resources. Target:
mpipar dp = 2 at ≥ 1.2× PyTorch DDP (gloo) on ``medium``. Without PyTorch the PyTorch
rows are skipped, and the output says so.

Both libraries' speed on a CPU depends on the BLAS kernels they load: numpy's OpenBLAS picks
one for the CPU (``OPENBLAS_CORETYPE`` overrides it), PyTorch uses its own (oneDNN/MKL on
x86); the machine lines at the top record numpy's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import emit, format_machine, machine_info
from run_all import mpirun

NPROCS = 1  # the script starts its own 2-process runs
REPO = Path(__file__).resolve().parent.parent
TARGET_DDP = 1.2


# ---- mpipar, through train.py -------------------------------------------------------------------


def mpipar_run(preset: str, steps: int, nprocs: int, threads: int) -> float:
    """Median step time (s) of ``train.py`` on ``nprocs`` processes of ``threads`` BLAS
    threads each (its summary leaves the first step out)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        args = [sys.executable, str(REPO / "train.py"), "--preset", preset, "--steps",
                str(steps), "--eval-every", "0", "--eval-tokens", "1", "--quiet",
                "--metrics", metrics]
        cmd = args if nprocs == 1 else [mpirun(), "-n", str(nprocs), *args]
        if nprocs > 1:
            cmd += ["--dp", str(nprocs)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   PYTHONPATH=str(REPO))
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(metrics, encoding="utf-8") as f:
            summary = [json.loads(line) for line in f][-1]
    return summary["median_step_time_s"]


# ---- PyTorch ----------------------------------------------------------------------------------


def torch_model(cfg: dict, vocab: int):
    """nanoGPT's GPT in PyTorch, with mpipar's shape, init scale and tied head."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    d, h, t = cfg["d_model"], cfg["n_head"], cfg["seq_len"]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.fc_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b = x.shape[0]
            q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
            q, k, v = (a.view(b, t, h, d // h).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
            return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["n_layer"]))
            self.ln_f = nn.LayerNorm(d)
            for p in self.parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, vocab), targets.view(-1))

    return GPT()


def torch_steps(model, batch: int, seq: int, vocab: int, steps: int, warmup: int) -> list[float]:
    """Train ``model`` on random tokens; the seconds of each measured step."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        x = torch.randint(vocab, (batch, seq), generator=gen)
        y = torch.randint(vocab, (batch, seq), generator=gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def torch_eager(cfg: dict, vocab: int, threads: int, steps: int, warmup: int) -> float:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_model(cfg, vocab)
    return statistics.median(torch_steps(model, cfg["batch_size"], cfg["seq_len"], vocab,
                                         steps, warmup))


def _ddp_worker(rank: int, port: int, cfg: dict, vocab: int, steps: int, warmup: int,
                out) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch_model(cfg, vocab))
    times = torch_steps(model, cfg["batch_size"] // 2, cfg["seq_len"], vocab, steps, warmup)
    slowest = torch.tensor(times)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step ends when both ranks are done
    if rank == 0:
        out.put(statistics.median(slowest.tolist()))
    dist.destroy_process_group()


def torch_ddp(cfg: dict, vocab: int, steps: int, warmup: int) -> float:
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(port, cfg, vocab, steps, warmup, out), nprocs=2, join=True)
    return out.get()


# ---- the table ----------------------------------------------------------------------------------


def configurations(preset: str, steps: int, warmup: int) -> tuple[dict, str | None]:
    """``{label: () -> median step seconds}``; the reason the peers are skipped, if so."""
    from mpipar.data import CharTokenizer, default_corpus
    from mpipar.model import PRESETS

    cfg = dict(PRESETS[preset])
    vocab = CharTokenizer.from_text(default_corpus()[0]).vocab_size
    runs = {"mpipar 1 process, 1 thread": lambda: mpipar_run(preset, warmup + steps, 1, 1),
            "mpipar 1 process, 2 threads": lambda: mpipar_run(preset, warmup + steps, 1, 2),
            "mpipar dp=2, 1 thread each": lambda: mpipar_run(preset, warmup + steps, 2, 1)}
    try:
        import torch
    except ImportError:
        return runs, "PyTorch is not installed (pip install -e '.[bench]')"
    runs[f"PyTorch {torch.__version__} eager, 1 thread"] = \
        lambda: torch_eager(cfg, vocab, 1, steps, warmup)
    runs["PyTorch eager, 2 threads"] = lambda: torch_eager(cfg, vocab, 2, steps, warmup)
    runs["PyTorch DDP gloo, 2 x 1 thread"] = lambda: torch_ddp(cfg, vocab, steps, warmup)
    return runs, None


def measure(preset: str, steps: int, warmup: int,
            rounds: int) -> tuple[dict[str, float], str | None]:
    """The best round's median step seconds per configuration, taking turns."""
    runs, skipped = configurations(preset, steps, warmup)
    times = {label: run() for label, run in runs.items()}
    for _ in range(rounds - 1):
        for label, run in runs.items():
            times[label] = min(times[label], run())
    return times, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    ap.add_argument("--rounds", type=int, default=2, help="turns of every configuration")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    from mpipar.model import PRESETS

    info = machine_info()
    times, skipped = measure(args.preset, args.steps, args.warmup, args.rounds)
    cfg = PRESETS[args.preset]
    tokens = cfg["batch_size"] * cfg["seq_len"]
    print(format_machine(info))
    print(f"{args.preset} preset, batch {cfg['batch_size']} x {cfg['seq_len']} tokens, float32; "
          f"medians of {args.steps} steps after {args.warmup} warm-up, the best of "
          f"{args.rounds} rounds")
    print(f"{'':36} {'ms/step':>9} {'tokens/s':>9}")
    for label, seconds in times.items():
        print(f"{label:36} {seconds * 1e3:9.1f} {tokens / seconds:9.0f}")
    figures = {k: tokens / v for k, v in times.items()}
    if skipped:
        print(f"PyTorch peers skipped: {skipped}")
    else:
        eager1, eager2, ddp = (v for k, v in figures.items() if k.startswith("PyTorch"))
        mine = list(figures.values())
        ratios = {"vs_eager_1_thread": mine[0] / eager1, "vs_eager_2_threads": mine[1] / eager2,
                  "dp2_vs_ddp": mine[2] / ddp}
        verdict = "met" if ratios["dp2_vs_ddp"] >= TARGET_DDP else "NOT met"
        print(f"mpipar / PyTorch throughput: 1 thread {ratios['vs_eager_1_thread']:.2f}x, "
              f"2 threads {ratios['vs_eager_2_threads']:.2f}x, dp=2 vs DDP "
              f"{ratios['dp2_vs_ddp']:.2f}x (target >= {TARGET_DDP}x: {verdict})")
        figures.update(ratios)
    emit("peers", args.preset, figures, info)
    if args.json:
        print(json.dumps({"tokens_per_s": figures, "skipped": skipped, "machine": info}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
