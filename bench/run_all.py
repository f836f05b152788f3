"""Run every benchmark in ``bench/`` (``bench_*.py``), one after another, and summarise.

A benchmark that needs several processes says so at its top with ``NPROCS = 2`` (any integer
literal); it is then launched as ``mpirun -n NPROCS python bench_x.py``, with the ``mpirun``
next to this Python (the venv's MPICH) or else the one on PATH. Each script gets one BLAS
thread per process and the repository on ``PYTHONPATH``; its output goes straight to the
terminal. A script that runs past ``--timeout`` seconds is killed with every process it
started. The exit code is 1 if any benchmark failed or timed out, else 0.

Every benchmark appends its figures, with the machine, BLAS kernel and environment they
were measured on, as JSON lines to one results file (``--results FILE``; by default
``runs/bench/run-<date>-<time>.jsonl``, through the variable ``MPIPAR_BENCH_RESULTS`` that
``bench/machine.py`` reads). ``--compare OLD NEW`` prints, for every (benchmark, case) in
both files, each figure of the old and the new run and their ratio.

Run: ``python bench/run_all.py [--timeout 900] [--only NAME ...] [--list] [--results FILE]``
(``make bench``); ``python bench/run_all.py --compare OLD.jsonl NEW.jsonl``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_ENV = "MPIPAR_BENCH_RESULTS"  # read by bench/machine.py's emit


def declared_nprocs(script: Path) -> int:
    """The value of a top-level ``NPROCS = <int>`` in ``script`` (1 if there is none).

    Read from the source without importing it: importing would run its setup (and, for an
    MPI benchmark, start MPI in this process).
    """
    for node in ast.parse(script.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):  # NPROCS: int = 2
            target, value = node.target, node.value
        else:
            continue
        if not (isinstance(target, ast.Name) and target.id == "NPROCS"):
            continue
        n = value.value if isinstance(value, ast.Constant) else None
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{script.name}: NPROCS must be an integer literal >= 1")
        return n
    return 1


def mpirun() -> str:
    """``mpirun`` next to the running Python, else the first on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun") or shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("no mpirun next to this Python or on PATH")
    return found


def command(script: Path, nprocs: int) -> list[str]:
    if nprocs == 1:
        return [sys.executable, str(script)]
    return [mpirun(), "-n", str(nprocs), sys.executable, str(script)]


def descendants(pid: int) -> list[int]:
    """Pids of every live process below ``pid`` (read from /proc; empty where there is none).

    MPICH's launcher starts each rank in a session of its own, so killing the launcher's
    process group would miss them: they are found through their parents instead.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant (found before any dies)."""
    victims = [pid, *descendants(pid)]
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_one(script: Path, timeout: float, results: Path) -> tuple[str, float]:
    """Run one benchmark with its output on this terminal; return (status, seconds)."""
    nprocs = declared_nprocs(script)
    cmd = command(script, nprocs)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env[RESULTS_ENV] = str(results)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    print(f"\n=== {script.name} ({nprocs} process{'es' if nprocs > 1 else ''}): "
          f"{' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        return f"timed out after {timeout:.0f} s (killed)", time.perf_counter() - t0
    status = "ok" if code == 0 else f"failed (exit {code})"
    return status, time.perf_counter() - t0


# ---- comparing two runs ------------------------------------------------------------------------


def load_results(path: str) -> dict[tuple[str, str], dict[str, float]]:
    """``{(benchmark, case): {figure: value}}`` of a results file, numeric figures only (the
    last line wins when a case repeats)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[(r["benchmark"], r["case"])] = {
                    k: float(v) for k, v in r["metrics"].items()
                    if isinstance(v, int | float) and not isinstance(v, bool)}
    return out


def compare(old_path: str, new_path: str) -> str:
    """A table of every figure the two runs share: old, new, new/old."""
    old, new = load_results(old_path), load_results(new_path)
    rows = [(key, name) for key in sorted(old.keys() & new.keys())
            for name in sorted(old[key].keys() & new[key].keys())]
    wide = max([len(name) for _, name in rows] + [len("figure")])
    case = max([len(key[1]) for key, _ in rows] + [len("case")])
    lines = [f"{'benchmark':14} {'case':{case}} {'figure':{wide}} {'old':>12} {'new':>12} "
             f"{'new/old':>8}"]
    for key, name in rows:
        a, b = old[key][name], new[key][name]
        ratio = f"{b / a:8.3f}" if a and math.isfinite(a) and math.isfinite(b) else ""
        lines.append(f"{key[0]:14} {key[1]:{case}} {name:{wide}} {a:12.4g} {b:12.4g} {ratio}")
    only = sorted(old.keys() ^ new.keys())
    if only:
        lines.append("in one run only: " + ", ".join(f"{b}/{c}" for b, c in only))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run every bench/bench_*.py and summarise.")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="run only benchmarks whose file name contains one of these")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--results", metavar="FILE",
                    help="JSON lines of every figure (default: runs/bench/run-<time>.jsonl)")
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                    help="compare two results files and exit")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0

    scripts = sorted(BENCH.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(n in s.name for n in args.only)]
    if not scripts:
        print("run_all.py: no benchmarks matched", file=sys.stderr)
        return 1
    if args.list:
        for s in scripts:
            try:
                print(f"{s.name}  ({declared_nprocs(s)} process(es))")
            except (ValueError, SyntaxError) as exc:
                print(f"{s.name}  (cannot run: {exc})")
        return 0

    results_file = Path(args.results or REPO / "runs" / "bench" /
                        time.strftime("run-%Y%m%d-%H%M%S.jsonl")).resolve()
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for script in scripts:
        try:
            results.append((script.name, *run_one(script, args.timeout, results_file)))
        except (OSError, ValueError, SyntaxError) as exc:  # no mpirun, a bad NPROCS, ...
            results.append((script.name, f"not run: {exc}", 0.0))
    print("\n=== summary")
    width = max(len(name) for name, _, _ in results)
    for name, status, seconds in results:
        print(f"{name:{width}}  {seconds:7.1f} s  {status}")
    print(f"figures: {results_file} (compare two runs: python bench/run_all.py --compare "
          "OLD NEW)")
    failed = [name for name, status, _ in results if status != "ok"]
    if failed:
        print(f"{len(failed)} of {len(results)} benchmarks did not succeed: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
