"""Where a training step's time goes: time per operation and direction, on every rank.

``train.py --profile`` prints, after training, a table per rank and the mean over ranks:
for each kind of work (``matmul fwd``, ``attention bwd``, ``layernorm fwd``, ``adamw``,
``allreduce dp``, ``recv pp``, ...) the calls and milliseconds per step, the share of the
step, and for the operations made of matrix products the GFLOP/s they ran at.
``--profile FILE`` also writes every operation as a span into a Chrome/Perfetto trace,
beside the communication and compute spans of ``--trace``, on one timeline.

How a step is split. The profiler keeps a stack of open *regions*. A region's **exclusive**
time is its duration minus that of everything nested in it, so every instant of a step is
charged to exactly one row and the rows of a step add up to the step:

* every autograd ``Function``, forward and backward, is a region (the hook in
  :mod:`mpipar.autograd`, :func:`~mpipar.autograd.set_op_timer`), named by :func:`op_label`;
* every communication call is charged with its *exposed* time (docs/design.md §6): a
  blocking call whole, a non-blocking one for as long as its wait blocked; it is taken out of
  whatever region it happened in. A blocking call includes the time spent waiting for the
  other rank: for a pipeline's ``recv pp``, that is the bubble;
* the trainer's compute spans (``forward``, ``backward``) are regions too: what is left of
  them once their operations are taken out is ``python fwd`` (the model's own code between
  operations) and ``autograd bwd`` (the backward engine: ordering, accumulation, hooks);
* the training step marks its other parts (``batch``, ``zero grad``, ``grad sync``,
  ``grad norm``, ``clip``, the optimizer) with :meth:`Profiler.region`, and the step itself is
  the outermost region, whose exclusive time is ``other`` (the loop's own Python).

The profiler is a :class:`~mpipar.trace.Tracer` that also times computation: it records
communication exactly as the tracer does, so ``--trace`` and ``--profile`` work together.
Off, it costs nothing: the autograd hook is one attribute check per operation, and the
trainer's regions are shared no-op context managers. On, each operation costs two clock reads
and a few dictionary updates, a few microseconds: about 4% of a ``tiny`` step, less for
larger models (``bench/bench_profile.py`` measures it). On a GPU, whose kernels run
asynchronously, every region boundary also waits for the device (``backend.synchronize``), so
each kernel's time is charged to the operation that launched it.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from mpipar import fused, ops
from mpipar.autograd import Context, Function, set_op_timer
from mpipar.backend import synchronize
from mpipar.trace import COMPUTE, Tracer, TraceRecord, to_chrome_trace

_NULL = contextlib.nullcontext()

# Row names of the Functions whose class name does not say it the way a reader of the model
# would: the fused linear layer is the model's matrix product.
LABELS: dict[type, str] = {
    fused.Linear: "matmul",
    fused.CausalAttention: "attention",
    fused.LayerNorm: "layernorm",
    fused.CrossEntropy: "cross-entropy",
    ops.MatMul: "matmul",
}


def _linear_flops(x: Any, w: Any, *_: Any, **__: Any) -> int:
    """y = x Wᵀ: 2·rows·in·out FLOPs (x is (..., in), W is (out, in))."""
    return 2 * (x.size // x.shape[-1]) * w.shape[0] * w.shape[1]


def _matmul_flops(a: Any, b: Any, **__: Any) -> int:
    """A @ B batched: 2·M·K·N per matrix, times the broadcast batch."""
    batch = max(a.size // (a.shape[-2] * a.shape[-1]), b.size // (b.shape[-2] * b.shape[-1]))
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


def _attention_flops(qkv: Any, *_: Any, **__: Any) -> int:
    """Q Kᵀ and P V for every head: 2 · 2·B·H·T²·D = 4·B·T²·C (the masked half included,
    since it is computed)."""
    b, t, c3 = qkv.shape
    return 4 * b * t * t * (c3 // 3)


# Forward FLOPs of the operations made of matrix products; a backward pass computes two
# products for each one of the forward (dX and dW, or dQ/dK and dV/dP), so twice as many.
GEMM_FLOPS: dict[type, Callable[..., int]] = {
    fused.Linear: _linear_flops,
    ops.MatMul: _matmul_flops,
    fused.CausalAttention: _attention_flops,
}

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def op_label(fn: type[Function]) -> str:
    """The row name of a Function: from :data:`LABELS`, else its class name in lower case
    words (``CopyToTensorParallelRegion`` → ``copy to tensor parallel region``)."""
    return LABELS.get(fn) or _CAMEL.sub(" ", fn.__name__).lower()


def span_label(name: str) -> str:
    """The row of a trainer's compute span (``forward``, ``backward chunk 1``, ...): what is
    left of it once its operations are taken out."""
    kind = name.split()[0] if name else ""
    return {"forward": "python fwd", "backward": "autograd bwd"}.get(kind, f"python {kind}")


class Profiler(Tracer):
    """A :class:`Tracer` that also charges every instant of a training step to one row.

    ``keep_spans``: keep every region as a compute :class:`TraceRecord` (for the Chrome trace
    of ``--profile FILE``); without it only the per-row totals are kept.

    Per step: ``with profiler.training_step(): ...`` around the whole step; inside it the autograd
    hook is installed, so evaluation and generation outside steps are not counted. The first
    step warms caches and allocates buffers; when a run has more, it is left out
    (:meth:`summary` says how many steps were counted).
    """

    def __init__(self, rank: int, keep_spans: bool = False) -> None:
        super().__init__(rank, enabled=True)
        self.keep_spans = keep_spans
        self.rows: dict[str, list[float]] = {}  # label -> [calls, seconds, flops]
        self.steps = 0  # steps counted in rows
        self.step_seconds = 0.0  # their summed duration
        self.spans: list[TraceRecord] = []
        self._stack: list[list] = []  # open regions: [start, seconds of what is nested]
        self._flops: dict[int, int] = {}  # id(ctx) -> forward FLOPs, until its backward
        self._labels: dict[tuple[type, str], str] = {}
        self._seen_steps = 0

    # -- regions -----------------------------------------------------------------------------
    def _push(self) -> None:
        synchronize()  # on a GPU: the work queued before the region is not charged to it
        self._stack.append([time.perf_counter(), 0.0])

    def _pop(self, label: str, flops: int = 0) -> float:
        """Close the innermost region: charge its exclusive time to ``label``; return its
        whole duration (on a GPU, once the region's kernels have finished)."""
        synchronize()
        end = time.perf_counter()
        start, nested = self._stack.pop()
        total = end - start
        self._charge(label, total - nested, flops)
        if self._stack:
            self._stack[-1][1] += total
        if self.keep_spans:
            self.spans.append(TraceRecord(self.rank, COMPUTE, "", None, 0, "", (), self.phase,
                                          self.step, self.microbatch, start, end, name=label))
        return total

    def _charge(self, label: str, seconds: float, flops: int = 0) -> None:
        row = self.rows.get(label)
        if row is None:
            row = self.rows[label] = [0, 0.0, 0]
        row[0] += 1
        row[1] += seconds
        row[2] += flops

    @contextlib.contextmanager
    def region(self, label: str) -> Iterator[None]:
        """Charge the exclusive time of the ``with`` body to the row ``label``."""
        self._push()
        try:
            yield
        finally:
            self._pop(label)

    @contextlib.contextmanager
    def training_step(self) -> Iterator[None]:
        """One training step: the outermost region (``other``), with the autograd hook on."""
        self._seen_steps += 1
        if self._seen_steps == 2:  # the first step warmed up: count from the second on
            self.rows.clear()
            self.steps, self.step_seconds = 0, 0.0
        previous = set_op_timer(self)
        self._push()
        try:
            yield
        finally:
            self.step_seconds += self._pop("other")
            self.steps += 1
            set_op_timer(previous)
            self._flops.clear()  # forward passes without a backward (a teacher, say)

    # -- the autograd hook -------------------------------------------------------------------
    def _label(self, fn: type[Function], direction: str) -> str:
        key = (fn, direction)
        label = self._labels.get(key)
        if label is None:
            label = self._labels[key] = f"{op_label(fn)} {direction}"
        return label

    def forward(self, fn: type[Function], ctx: Context, args: list, kwargs: dict) -> Any:
        """Run ``fn.forward`` as a region; remember its FLOPs for its backward."""
        count = GEMM_FLOPS.get(fn)
        flops = count(*args, **kwargs) if count is not None else 0
        self._push()
        out = fn.forward(ctx, *args, **kwargs)
        self._pop(self._label(fn, "fwd"), flops)
        if flops:
            self._flops[id(ctx)] = flops
        return out

    def backward(self, fn: type[Function], ctx: Context, grad: Any) -> Any:
        """Run ``fn.backward`` as a region (twice the forward's FLOPs)."""
        flops = 2 * self._flops.pop(id(ctx), 0)
        self._push()
        out = fn.backward(ctx, grad)
        self._pop(self._label(fn, "bwd"), flops)
        return out

    # -- the tracer's side -------------------------------------------------------------------
    def record(self, op: str, group: str, peer: int | None, nbytes: int, dtype: str,
               shape: tuple, start: float, end: float, **stamp: Any) -> None:
        """Record as the tracer does; charge a communication call's exposed time to the row
        ``"<op> <group>"`` and take it out of the region it happened in."""
        super().record(op, group, peer, nbytes, dtype, shape, start, end, **stamp)
        if op == COMPUTE or not self._stack:
            return
        waited = stamp.get("waited")
        exposed = end - start if waited is None else waited
        self._stack[-1][1] += exposed
        self._charge(f"{op} {group}", exposed)

    def span(self, name: str, phase: str | None = None,
             microbatch: int | None = None) -> contextlib.AbstractContextManager:
        """The tracer's compute span, which is also a region (``python fwd``, ...)."""
        if not self._stack:
            return super().span(name, phase, microbatch)
        return self._profiled_span(name, phase, microbatch)

    @contextlib.contextmanager
    def _profiled_span(self, name: str, phase: str | None,
                       microbatch: int | None) -> Iterator[None]:
        with super().span(name, phase, microbatch):
            self._push()
            try:
                yield
            finally:
                self._pop(span_label(name))

    # -- results -----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """This rank's totals: ``steps``, ``step_time_s`` (their summed duration) and
        ``rows`` (label → ``calls``, ``seconds``, ``flops``), largest first."""
        rows = sorted(self.rows.items(), key=lambda item: -item[1][1])
        return {"rank": self.rank, "steps": self.steps, "step_time_s": self.step_seconds,
                "rows": {k: {"calls": int(c), "seconds": s, "flops": int(f)}
                         for k, (c, s, f) in rows}}


def region(profiler: Profiler | None, label: str) -> contextlib.AbstractContextManager:
    """``profiler.region(label)``, or a shared no-op when there is no profiler."""
    return _NULL if profiler is None else profiler.region(label)


# ---- tables ------------------------------------------------------------------------------------


def mean_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over ranks of per-rank summaries (a row missing on a rank counts 0 there)."""
    n = len(summaries)
    rows: dict[str, dict[str, float]] = {}
    for s in summaries:
        for label, row in s["rows"].items():
            acc = rows.setdefault(label, {"calls": 0.0, "seconds": 0.0, "flops": 0.0})
            for field in acc:
                acc[field] += row[field] / n
    ordered = dict(sorted(rows.items(), key=lambda item: -item[1]["seconds"]))
    return {"rank": "mean", "steps": summaries[0]["steps"],
            "step_time_s": sum(s["step_time_s"] for s in summaries) / n, "rows": ordered}


def format_profile(summary: dict[str, Any]) -> str:
    """One rank's (or the mean's) table: per row, calls and ms per step, share of the step,
    and GFLOP/s where the row did matrix products."""
    steps = max(summary["steps"], 1)
    step_ms = summary["step_time_s"] / steps * 1e3
    who = "mean over ranks" if summary["rank"] == "mean" else f"rank {summary['rank']}"
    head = (f"profile, {who}: {step_ms:.2f} ms per step over {summary['steps']} step(s)\n"
            f"{'':22}{'calls':>8}{'ms':>10}{'share':>8}{'GFLOP/s':>10}\n"
            f"{'':22}{'/step':>8}{'/step':>10}")
    lines = [head]
    total = 0.0
    for label, row in summary["rows"].items():
        seconds = row["seconds"]
        total += seconds
        rate = f"{row['flops'] / seconds / 1e9:10.1f}" if row["flops"] and seconds > 0 else ""
        share = seconds / summary["step_time_s"] if summary["step_time_s"] else 0.0
        lines.append(f"{label:22}{row['calls'] / steps:8.1f}{seconds / steps * 1e3:10.3f}"
                     f"{share:8.1%}{rate}")
    lines.append(f"{'total':22}{'':8}{total / steps * 1e3:10.3f}"
                 f"{total / summary['step_time_s'] if summary['step_time_s'] else 0:8.1%}")
    return "\n".join(lines)


def format_profiles(summaries: list[dict[str, Any]]) -> str:
    """Every rank's table, then (with several ranks) the mean over ranks."""
    tables = [format_profile(s) for s in summaries]
    if len(summaries) > 1:
        tables.append(format_profile(mean_summary(summaries)))
    note = ("rows: exclusive time (nested work is charged to its own row); communication is "
            "its exposed time, waiting for the other ranks included (for recv pp: the "
            "pipeline bubble)")
    return "\n\n".join(tables) + "\n" + note


# ---- gathering ---------------------------------------------------------------------------------


def gather_profiles(world: Any, path: str | None) -> list[dict[str, Any]] | None:
    """Every rank's :meth:`Profiler.summary`, on every rank (collective); None unless
    ``world``'s tracer is a Profiler. With ``path``, rank 0 also writes the Chrome/Perfetto
    trace of every rank's communication records and profiled spans there."""
    profiler = world.tracer
    if not isinstance(profiler, Profiler):
        return None
    summaries = world.allgather_object(profiler.summary())
    if path:
        records = world.gather_object(profiler.records + profiler.spans)
        if world.rank == 0:
            trace = to_chrome_trace(r for rank in records for r in rank)
            trace["otherData"] = {"profile": summaries}
            with open(path, "w", encoding="utf-8") as f:
                json.dump(trace, f)
    return summaries
