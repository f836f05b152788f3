"""mpipar on a real GPU: the GPU path against the CPU, then its throughput (``make gpu-check``).

    python bench/gpu_check.py [--module cupy] [--steps 4] [--layouts dp,tp,pp] [--cuda-aware]
                              [--bench-presets tiny,medium,large] [--precisions fp32,fp16]

On a machine with cupy and a CUDA device, in about 5 minutes:

1. the GPU-path tests (tests/test_device.py), which run every check on the real cupy too;
2. ``train.py --device gpu`` in float64 against the same run on the CPU: every parameter of
   the final checkpoint within a relative 1e-10 (cuBLAS sums in another order than numpy's
   BLAS, so not bit for bit);
3. ``mpirun -n 2`` with dp 2, tp 2 and pp 2, both ranks on the one GPU, MPI buffers staged
   through host memory, against the 1-process CPU run (serial equivalence, 1e-10); with
   ``--cuda-aware`` (or ``MPIPAR_CUDA_AWARE_MPI=1`` set), the same with device buffers
   handed to MPI, for an MPI built with CUDA support (the ``mpich`` wheel is not);
4. throughput: tokens/s of ``train.py --device gpu`` for each preset and precision, and,
   when PyTorch with CUDA is installed, PyTorch eager's on the same GPU with the same GPT
   (bench/bench_peers.py's) and mpipar's ratio to it. bf16 is not measured: cupy has no
   bfloat16 (mpipar refuses ``--precision bf16`` on a GPU).

Any mismatch makes the exit code 1. Without a GPU (cupy missing, or no device) it says so,
checks nothing and exits 0. ``--module`` names another device module with cupy's interface:
the tests run this script on their CPU stand-in (``--module fakecupy --exact``), which must
then match numpy bit for bit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mpipar.checkpoint import load_checkpoint  # noqa: E402

RTOL = 1e-10
LAYOUTS = {"dp": ["--dp", "2"], "tp": ["--tp", "2"], "pp": ["--pp", "2", "--microbatches", "2"]}
# The benchmark's models: train.py's presets, and one larger (8 × 512, 256 characters).
BENCH = {"tiny": ["--preset", "tiny"], "medium": ["--preset", "medium"],
         "large": ["--preset", "medium", "--n-layer", "8", "--n-head", "8", "--d-model", "512",
                   "--seq-len", "256", "--batch-size", "32"]}
TIMEOUT = 240  # seconds, for any one command
BUDGET = 480  # seconds: no throughput run starts after this, so the whole stays under 10 min


def device_module(name: str):
    """The device module and a line about it, or (None, why there is no GPU)."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return None, f"{name} does not import ({exc})"
    try:
        count = module.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001  (no driver, no device: all mean no GPU)
        return None, f"{name} finds no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, f"{name} finds no CUDA device"
    version = getattr(module, "__version__", "")
    return module, f"{name}{' ' + version if version else ''}, {count} device(s)"


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root with ``env`` added; output captured."""
    full = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **env)
    full["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else "mpirun"


def train(args: list[str], env: dict[str, str], n: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *args]
    return run(cmd if n == 1 else [mpirun(), "-n", str(n), *cmd], env)


def compare(got_dir: str, want_dir: str, exact: bool) -> str | None:
    """None if the two checkpoints hold the same parameters (``exact``: bit for bit, else
    within RTOL of the largest element); otherwise what differs."""
    got, want = load_checkpoint(got_dir)[0], load_checkpoint(want_dir)[0]
    if sorted(got) != sorted(want):
        return f"different arrays: {sorted(set(got) ^ set(want))[:4]}"
    worst, where = 0.0, ""
    for name, ref in want.items():
        a, b = np.asarray(got[name], np.float64), np.asarray(ref, np.float64)
        if exact and not np.array_equal(a, b):
            return f"{name} differs (bit for bit)"
        scale = max(float(np.max(np.abs(b))), 1e-300)
        rel = float(np.max(np.abs(a - b))) / scale
        worst, where = max((worst, where), (rel, name))
    return None if worst <= RTOL else f"{where}: relative difference {worst:.3g} > {RTOL}"


class Report:
    """Prints each check as it finishes; remembers whether any failed."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.start = time.perf_counter()

    def check(self, what: str, problem: str | None, seconds: float) -> None:
        print(f"  {'FAIL' if problem else 'ok  '} {what} ({seconds:.0f} s)"
              + (f": {problem}" if problem else ""), flush=True)
        if problem:
            self.failed.append(what)


def failed_run(proc: subprocess.CompletedProcess) -> str | None:
    if proc.returncode == 0:
        return None
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    return f"exit {proc.returncode}\n      " + "\n      ".join(tail)


def run_tests(report: Report, cuda_aware: bool) -> None:
    print("1. the GPU-path tests, on the stand-in and on this GPU", flush=True)
    t0 = time.perf_counter()
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/test_device.py"], {"MPIPAR_CUDA_AWARE_MPI": "1" if cuda_aware else "0"})
    report.check("tests/test_device.py", failed_run(proc), time.perf_counter() - t0)


def equivalence(opts: argparse.Namespace, env: dict[str, str], tmp: str,
                report: Report) -> None:
    """Sections 2 and 3: train.py on the GPU, alone and under mpirun, against the CPU."""
    common = ["--preset", "tiny", "--steps", str(opts.steps), "--eval-every", "0",
              "--dtype", "float64", "--quiet"]
    print("2. train.py --device gpu against the CPU (float64)", flush=True)
    cpu, gpu = os.path.join(tmp, "cpu"), os.path.join(tmp, "gpu")
    t0 = time.perf_counter()
    problem = failed_run(train([*common, "--save", cpu], {}))
    problem = problem or failed_run(train([*common, "--device", "gpu", "--save", gpu], env))
    report.check("1 process", problem or compare(gpu, cpu, opts.exact), time.perf_counter() - t0)
    if problem:
        return
    print("3. mpirun -n 2, both ranks on this GPU, against the 1-process CPU run", flush=True)
    modes = [("host-staged", "0")] + ([("CUDA-aware", "1")] if opts.cuda_aware else [])
    for layout in opts.layouts:
        for mode, aware in modes:
            t0 = time.perf_counter()
            out = os.path.join(tmp, f"{layout}-{aware}")
            proc = train([*common, *LAYOUTS[layout], "--device", "gpu", "--save", out],
                         {**env, "MPIPAR_CUDA_AWARE_MPI": aware}, n=2)
            problem = failed_run(proc) or compare(out, cpu, exact=False)  # sums reordered
            report.check(f"{layout} 2, {mode}", problem, time.perf_counter() - t0)
    if not opts.cuda_aware:
        print("  (CUDA-aware MPI not checked: give --cuda-aware, or set MPIPAR_CUDA_AWARE_MPI=1,"
              " with an MPI built with CUDA support)")


# ---- 4. throughput ----------------------------------------------------------------------


def mpipar_tokens_per_s(model: list[str], precision: str, steps: int,
                        env: dict[str, str], tmp: str) -> tuple[float | None, str | None]:
    """tokens/s of train.py on the GPU (median step; the first step is left out)."""
    metrics = os.path.join(tmp, f"bench-{len(os.listdir(tmp))}.jsonl")
    proc = train([*model, "--precision", precision, "--steps", str(steps), "--eval-every",
                  "0", "--eval-tokens", "1", "--device", "gpu", "--quiet", "--metrics",
                  metrics], env)
    problem = failed_run(proc)
    if problem:
        return None, problem
    with open(metrics, encoding="utf-8") as f:
        summary = [json.loads(line) for line in f][-1]
    return summary["tokens_per_s"], None


def torch_cuda():
    """torch if it is installed and sees a CUDA device, else None."""
    try:
        import torch  # noqa: PLC0415  (optional: the bench extra)
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def model_config(model: list[str]) -> dict:
    """The GPT train.py builds for ``model`` (preset and overrides), as bench_peers wants it."""
    from mpipar.model import PRESETS  # noqa: PLC0415

    cfg = dict(PRESETS[model[model.index("--preset") + 1]])
    for flag, key in (("--n-layer", "n_layer"), ("--n-head", "n_head"),
                      ("--d-model", "d_model"), ("--seq-len", "seq_len"),
                      ("--batch-size", "batch_size")):
        if flag in model:
            cfg[key] = int(model[model.index(flag) + 1])
    return cfg


def torch_tokens_per_s(torch, model: list[str], precision: str, steps: int) -> float:
    """tokens/s of PyTorch eager on the GPU: bench_peers's GPT and AdamW, the median step;
    fp16 under autocast (fp32 weights, fp16 products), as mpipar's fp16 keeps fp32 masters."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_peers import torch_model  # noqa: PLC0415

    from mpipar.data import CharTokenizer, default_corpus  # noqa: PLC0415

    cfg = model_config(model)
    vocab = CharTokenizer.from_text(default_corpus()[0]).vocab_size  # train.py's corpus
    torch.manual_seed(0)
    net = torch_model(cfg, vocab).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    b, t = cfg["batch_size"], cfg["seq_len"]
    times = []
    for i in range(steps + 2):
        x = torch.randint(vocab, (b, t), device="cuda")
        y = torch.randint(vocab, (b, t), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
            loss = net(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return b * t / statistics.median(times)


def throughput(opts: argparse.Namespace, env: dict[str, str], tmp: str,
               report: Report) -> None:
    torch = torch_cuda()
    print("4. throughput, train.py --device gpu (1 process)"
          + ("" if torch else "; PyTorch with CUDA not installed: no ratio"), flush=True)
    for name in opts.bench_presets:
        for precision in opts.precisions:
            t0 = time.perf_counter()
            if t0 - report.start > BUDGET:
                print(f"  not measured: {name} {precision} (past the {BUDGET} s budget)")
                continue
            tps, problem = mpipar_tokens_per_s(BENCH[name], precision, opts.bench_steps,
                                               env, tmp)
            line = f"{name:6s} {precision}"
            if tps is not None:
                line += f": {tps:12,.0f} tokens/s"
                if torch is not None:
                    ref = torch_tokens_per_s(torch, BENCH[name], precision, opts.bench_steps)
                    line += f" | PyTorch eager {ref:12,.0f} tokens/s | ratio {tps / ref:.2f}"
            report.check(line, problem, time.perf_counter() - t0)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", default="cupy", help="device module (default: cupy)")
    ap.add_argument("--steps", type=int, default=4, help="steps of the equivalence runs")
    ap.add_argument("--layouts", default="dp,tp,pp", help="of dp, tp, pp (default: all)")
    ap.add_argument("--cuda-aware", action="store_true",
                    default=os.environ.get("MPIPAR_CUDA_AWARE_MPI", "0") not in ("", "0"),
                    help="also hand device buffers to MPI (an MPI built with CUDA)")
    ap.add_argument("--bench-presets", default="tiny,medium,large",
                    help=f"of {', '.join(BENCH)}, comma-separated ('' for none)")
    ap.add_argument("--precisions", default="fp32,fp16", help="of fp32, fp16")
    ap.add_argument("--bench-steps", type=int, default=12, help="steps per throughput run")
    ap.add_argument("--no-tests", action="store_true", help="skip tests/test_device.py")
    ap.add_argument("--exact", action="store_true",
                    help="the 1-process run must match the CPU bit for bit (the stand-in)")
    opts = ap.parse_args(argv)
    split = lambda text: [w for w in text.split(",") if w]  # noqa: E731
    opts.layouts, opts.bench_presets = split(opts.layouts), split(opts.bench_presets)
    opts.precisions = split(opts.precisions)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    module, about = device_module(opts.module)
    if module is None:
        print(f"gpu-check: no GPU here: {about}. Nothing was checked.")
        return 0
    print(f"gpu-check on {about}", flush=True)
    report = Report()
    env = {"MPIPAR_DEVICE_MODULE": opts.module}
    if not opts.no_tests:
        run_tests(report, opts.cuda_aware)
    with tempfile.TemporaryDirectory() as tmp:
        equivalence(opts, env, tmp, report)
        if opts.bench_presets:
            throughput(opts, env, tmp, report)
    elapsed = time.perf_counter() - report.start
    if report.failed:
        print(f"gpu-check: {len(report.failed)} FAILED ({', '.join(report.failed)}) "
              f"in {elapsed:.0f} s")
        return 1
    print(f"gpu-check: all passed in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
