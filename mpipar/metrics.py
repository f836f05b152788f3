"""What ``train.py`` reports while it runs: metrics lines, progress lines, the final summary.

The metrics file (docs/design.md §3) holds one JSON object per line, written by global rank 0:
a line per training step (``step, loss, lr, grad_norm, step_time_s, tokens_per_s``), a line
per evaluation (``step, val_loss, val_ppl, val_bpc``) and a last ``{"event": "summary"}``
line with the totals. The same numbers are printed as progress lines for a person to read.
A number that is not finite (a loss that became NaN) is written as ``null``.
"""

from __future__ import annotations

import json
import math
import resource
from typing import Any

from mpipar.trace import format_summary_table


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``: JSON has no such
    numbers (Python writes ``NaN``, which most other readers refuse), ``null`` is JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class MetricsWriter:
    """JSON lines on global rank 0; a no-op elsewhere or without a path.

    Strict JSON: a loss that became NaN is written as ``null`` (:func:`strict_json`).
    """

    def __init__(self, path: str | None, active: bool) -> None:
        self._file = open(path, "w", encoding="utf-8") if path and active else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def format_progress(m: dict[str, Any], total_steps: int, elapsed: float) -> str:
    """The progress line of a step's metrics ``m``, with the time left at the mean pace."""
    done = m["step"] + 1
    eta = elapsed / max(done, 1) * (total_steps - done)
    return (f"step {m['step']:5d}/{total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:8.0f} tok/s | "
            f"ETA {eta:5.0f}s" + moe_progress(m))


def moe_progress(m: dict[str, Any]) -> str:
    """A mixture of experts' part of the progress line: aux loss and dropped assignments."""
    if "aux_loss" not in m:
        return ""
    return f" | aux {m['aux_loss']:.4f} | dropped {m['dropped_tokens']}"


def eval_record(step: int, val_loss: float) -> dict[str, Any]:
    """The metrics line of an evaluation: the loss in nats, as perplexity and bits per char."""
    return {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
            "val_bpc": val_loss / math.log(2)}


def format_eval(record: dict[str, Any]) -> str:
    return (f"step {record['step']:5d} | val loss {record['val_loss']:.4f} | perplexity "
            f"{record['val_ppl']:.2f} | {record['val_bpc']:.3f} bits/char")


def peak_memory_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_record(memory: dict[str, int]) -> dict[str, int]:
    """This rank's memory for the summary, in bytes: its parameters, gradient storage and
    optimizer state (from a ZeRO memory report, ``memory``), and the peak resident memory
    of the whole process."""
    return {"parameters": memory["param_bytes"], "gradients": memory["grad_bytes"],
            "optimizer_state": memory["optimizer_state_bytes"], "peak": peak_memory_bytes()}


def merge_totals(all_totals: list[dict]) -> dict[str, dict[str, float]]:
    """Sum per-rank ``"op|group"`` totals over all ranks: calls, bytes, time (launch to
    completion) and exposed time (what held the ranks up; see `mpipar.trace.comm_totals`)."""
    merged: dict[str, dict[str, float]] = {}
    for totals in all_totals:
        for key, v in totals.items():
            acc = merged.setdefault(key, {"calls": 0, "bytes": 0, "time": 0.0, "exposed": 0.0})
            for field in acc:
                acc[field] += v[field]
    return merged


def format_comm_summary(all_totals: list[dict], step_time_total: float) -> str | None:
    """The communication table of a run, per rank (the mean over ranks); None if none."""
    merged = merge_totals(all_totals)
    if not merged:
        return None
    n = len(all_totals)
    per_rank = {tuple(k.split("|")): {f: v[f] / n for f in v} for k, v in merged.items()}
    return ("communication per rank (mean over ranks):\n"
            + format_summary_table(per_rank, step_time_total))
