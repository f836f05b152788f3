"""One page per run: ``train.py --report DIR`` and ``python -m mpipar.report RUN``.

A run started with ``--report DIR`` writes into DIR its metrics (``metrics.jsonl``, §3 of
docs/design.md), its communication trace (``trace.jsonl``, §6), a description
(``run.json``: the configuration and the command that reproduces it) and, from those three,
``report.html``: one self-contained HTML file with every picture inline as SVG, no script and
no request to any server, so it opens from disk anywhere. Its sections:

* **loss**: training loss per step and validation loss at each evaluation;
* **throughput**: tokens/s per step;
* **communication**: calls, bytes and seconds per op, group and phase, mean per rank, with
  the *exposed* seconds (blocking calls, and the waits of non-blocking ones: what held the
  ranks up) apart from the *overlapped* ones (non-blocking calls in flight while the rank
  computed), and the exposed share of the step time;
* **pipeline** (pipeline runs): the last step's measured timeline and the bubble;
* **memory**: each rank's parameters, gradients, optimizer state and peak resident memory;
* **configuration**: the model, training and layout settings and the exact command.

``python -m mpipar.report RUN`` redraws the page of a run directory (or of a metrics file,
with ``--trace``), and `cmd_loss` is ``python -m mpipar.viz loss``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from mpipar.figures.charts import Series, in_ms, line_chart, stacked_bars, timeline_chart
from mpipar.parallel.pipeline.measure import trace_steps, trace_timeline
from mpipar.svg import BACKWARD_COLOR, FORWARD_COLOR, RANK_COLORS
from mpipar.trace import TraceRecord, grouped_totals, human_bytes, load_jsonl

RUN_FILE, REPORT_FILE = "run.json", "report.html"
METRICS_FILE, TRACE_FILE = "metrics.jsonl", "trace.jsonl"


# ---- the run directory ---------------------------------------------------------------------


def prepare_run_dir(path: str, metrics: str | None, trace: str | None) -> tuple[str, str]:
    """Create the directory (its parent exists: `mpipar/outputs.py` checked that before the
    first step); the metrics and trace paths (given, or the files inside it)."""
    os.makedirs(path, exist_ok=True)
    return metrics or os.path.join(path, METRICS_FILE), trace or os.path.join(path, TRACE_FILE)


def reproduce_command(world: int, argv: list[str]) -> str:
    """The shell command that runs ``train.py argv`` on ``world`` processes again."""
    launcher = ["mpirun", "-n", str(world)] if world > 1 else []
    return shlex.join([*launcher, "python", "train.py", *argv])


def write_run(path: str, description: dict[str, Any]) -> None:
    """``run.json``: the configuration, the command, and where the metrics and trace are
    (relative to the directory, so that it can be moved whole)."""
    d = dict(description)
    for key in ("metrics", "trace"):
        d[key] = os.path.relpath(d[key], path)
    with open(os.path.join(path, RUN_FILE), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=1)
        f.write("\n")


@dataclass
class RunData:
    """What a page is drawn from: the run's description, metrics lines and trace records."""

    description: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    records: list[TraceRecord] = field(default_factory=list)


def read_metrics(path: str) -> tuple[list[dict], list[dict], dict]:
    """(step lines, evaluation lines, summary) of a metrics file (docs/design.md §3)."""
    steps, evals, summary = [], [], {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("event") == "summary":
                summary = record
            elif "val_loss" in record:
                evals.append(record)
            elif "loss" in record:
                steps.append(record)
    return steps, evals, summary


def load_run(run: str, trace: str | None = None) -> RunData:
    """A run directory written by ``--report`` or, for a metrics file, that file (and
    ``trace`` when given)."""
    if os.path.isdir(run):
        with open(os.path.join(run, RUN_FILE), encoding="utf-8") as f:
            description = json.load(f)
        metrics = os.path.join(run, description["metrics"])
        trace = trace or os.path.join(run, description["trace"])
    else:
        description, metrics = {}, run
    data = RunData(description)
    data.steps, data.evals, data.summary = read_metrics(metrics)
    if trace and os.path.exists(trace):
        data.records = load_jsonl(trace)
    return data


# ---- the sections --------------------------------------------------------------------------


def loss_chart(steps: list[dict], evals: list[dict], name: str = "loss") -> str:
    """Training loss per step and validation loss at each evaluation, as SVG."""
    series = [Series("training loss", [m["step"] for m in steps], [m["loss"] for m in steps],
                     FORWARD_COLOR)]
    if evals:
        series.append(Series("validation loss", [e["step"] for e in evals],
                             [e["val_loss"] for e in evals], BACKWARD_COLOR, dots=True))
    return line_chart(series, title="Loss", xlabel="step", ylabel="loss (nats per token)",
                      name=name)


def loss_section(data: RunData) -> str:
    text = ""
    if data.evals:
        e = data.evals[-1]
        text = (f"<p>Last evaluation, step {e['step']}: validation loss {e['val_loss']:.4f}, "
                f"perplexity {e.get('val_ppl', 0):.2f}, {e.get('val_bpc', 0):.3f} bits per "
                "character.</p>")
    return loss_chart(data.steps, data.evals) + text


def throughput_section(data: RunData) -> str:
    steps = [m["step"] for m in data.steps]
    chart = line_chart([Series("tokens/s", steps, [m["tokens_per_s"] for m in data.steps],
                               RANK_COLORS[2])],
                       title="Throughput", xlabel="step", ylabel="tokens per second",
                       name="throughput")
    s = data.summary
    if not s:
        return chart
    return chart + (f"<p>Median step {s['median_step_time_s'] * 1e3:.1f} ms (the first step, "
                    f"a warm-up, left out), {s['tokens_per_s']:.0f} tokens/s over the run, "
                    f"{s['flops_per_token']:,} FLOPs per token.</p>")


def comm_rows(data: RunData) -> list[tuple[tuple, dict[str, float]]]:
    """Per (op, group, phase): the mean per rank of calls, bytes, time and exposed time."""
    ranks = len({r.rank for r in data.records}) or 1
    totals = grouped_totals(data.records, ("op", "group", "phase"))
    return [(key, {k: v / ranks for k, v in row.items()}) for key, row in totals.items()]


def comm_section(data: RunData) -> str:
    if not data.records:
        return "<p>No trace: run with <code>--trace FILE</code> or <code>--report DIR</code>.</p>"
    rows = comm_rows(data)
    if not rows:
        return "<p>This run made no communication calls.</p>"
    step_time = sum(m["step_time_s"] for m in data.steps)
    body = []
    for (op, group, phase), row in rows:
        share = row["exposed"] / step_time if step_time > 0 else 0.0
        body.append(
            f"<tr><td>{escape(op)}</td><td>{escape(group)}</td><td>{escape(phase)}</td>"
            f"<td>{row['calls']:g}</td><td>{human_bytes(row['bytes'])}</td>"
            f"<td>{row['exposed'] * 1e3:.2f}</td><td>{(row['time'] - row['exposed']) * 1e3:.2f}"
            f"</td><td>{share:.1%}</td></tr>")
    table = ("<table class=\"comm\"><thead><tr><th>op</th><th>group</th><th>phase</th>"
             "<th>calls</th>"
             "<th>bytes</th><th>exposed ms</th><th>overlapped ms</th><th>share of step time"
             "</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>")
    bars = stacked_bars(
        [(f"{op} {group} {phase}", [row["exposed"] * 1e3,
                                     (row["time"] - row["exposed"]) * 1e3])
         for (op, group, phase), row in rows],
        ["exposed (held the rank up)", "overlapped (hidden behind compute)"],
        [RANK_COLORS[3], RANK_COLORS[0]], title="Communication time per rank, ms",
        name="comm", fmt=lambda v: f"{v:.2f} ms")
    return (bars + table + "<p>Mean per rank over the whole run. <em>Exposed</em>: the time "
            "blocking calls took and the time spent waiting for non-blocking ones, during "
            "which the rank did nothing else. <em>Overlapped</em>: the rest of a non-blocking "
            "call's launch-to-completion span, while the rank computed. The share is the "
            "exposed time over the summed step time.</p>")


def pipeline_section(data: RunData) -> str:
    steps = trace_steps(data.records)
    pipe = data.summary.get("pipeline") or {}
    if not steps:
        return "<p>No forward/backward spans in the trace.</p>"
    timeline, ranks = trace_timeline(data.records, steps[-1])
    timeline = in_ms(timeline)
    chart = timeline_chart(timeline, [f"rank {r}" for r in ranks], name="pipeline",
                           title=f"Step {steps[-1]}, measured ({timeline.makespan:.1f} ms)")
    if not pipe:
        return chart
    measured = pipe.get("bubble_measured_mean")
    return chart + (
        f"<p>Schedule {escape(pipe['schedule'])}, p = {pipe['pp']}, m = "
        f"{pipe['microbatches']}, v = {pipe['virtual_stages']}: bubble in theory "
        f"{pipe['bubble_theory']:.1%}"
        + (f", measured {measured:.1%} (mean over ranks and steps after the first)"
           if measured is not None else "") + ". Peak stashed activations per rank: "
        + ", ".join(human_bytes(b) for b in pipe["peak_stash_bytes"]) + ".</p>")


MEMORY_PARTS = (("parameters", "parameters"), ("gradients", "gradients"),
                ("optimizer_state", "optimizer state"))


def memory_section(data: RunData) -> str:
    per_rank = data.summary.get("memory_per_rank")
    if not per_rank:
        return "<p>The metrics file holds no memory figures.</p>"
    bars = stacked_bars(
        [(f"rank {r}", [m[k] / 2**20 for k, _ in MEMORY_PARTS]) for r, m in enumerate(per_rank)],
        [label for _, label in MEMORY_PARTS], RANK_COLORS[:3],
        title="Model state per rank, MiB", name="memory", fmt=lambda v: f"{v:.2f} MiB")
    rows = "".join(
        f"<tr><td>{r}</td>" + "".join(f"<td>{human_bytes(m[k])}</td>" for k, _ in MEMORY_PARTS)
        + f"<td>{human_bytes(m['peak'])}</td></tr>" for r, m in enumerate(per_rank))
    return (bars + "<table><thead><tr><th>rank</th><th>parameters</th><th>gradients</th>"
            "<th>optimizer state</th><th>peak resident memory</th></tr></thead><tbody>"
            + rows + "</tbody></table><p>Peak resident memory is the whole process's "
            "(Python, numpy, MPI and the activations included).</p>")


def config_section(data: RunData) -> str:
    d = data.description
    if not d:
        return "<p>No run description (this page was drawn from a metrics file).</p>"
    parts = [f"<p>To reproduce this run, from the repository root:</p><pre><code>"
             f"{escape(d['command'])}</code></pre>"]
    for title, key in (("layout", "layout"), ("model", "model"), ("training", "train")):
        cells = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(json.dumps(v))}</td></tr>"
                        for k, v in d.get(key, {}).items())
        parts.append(f"<h3>{title}</h3><table class=\"kv\"><tbody>{cells}</tbody></table>")
    parts.append(f"<p>Data: {escape(str(d.get('data', '')))}.</p>")
    return "".join(parts)


# ---- the page ------------------------------------------------------------------------------

STYLE = """body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;max-width:980px;margin:2em
auto;padding:0 1em;color:#222}h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid
#ccc}table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{padding:.2em .7em;
border-bottom:1px solid #eee;text-align:right}th{background:#f4f4f4}td:first-child,
th:first-child,table.kv td,table.comm td:nth-child(-n+3),table.comm th:nth-child(-n+3){
text-align:left}pre{background:#f4f4f4;padding:.7em;overflow-x:auto}
svg{max-width:100%;height:auto;display:block}nav a{margin-right:1em}"""


def headline(data: RunData) -> str:
    s, layout = data.summary, data.summary.get("layout") or data.description.get("layout", {})
    where = (f"world {layout.get('world', '?')} = dp {layout.get('dp', '?')} × tp "
             f"{layout.get('tp', '?')} × pp {layout.get('pp', '?')}")
    if not s:
        return where
    return (f"{where}: {s['steps']} steps, {s['tokens']:,} tokens in {s['time_s']:.1f} s, "
            f"final loss {s['final_loss']:.4f}")


def render(data: RunData) -> str:
    """The whole page, as one string."""
    sections = [("loss", "Loss", loss_section), ("throughput", "Throughput",
                                                  throughput_section),
                ("communication", "Communication", comm_section)]
    if (data.summary.get("layout") or {}).get("pp", 1) > 1 or data.summary.get("pipeline"):
        sections.append(("pipeline", "Pipeline timeline", pipeline_section))
    sections += [("memory", "Memory per rank", memory_section),
                 ("configuration", "Configuration", config_section)]
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{draw(data)}</section>'
                   for key, title, draw in sections)
    title = escape(f"mpipar run: {headline(data)}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<header>"
            f"<h1>mpipar run</h1><p>{escape(headline(data))}</p><nav>{nav}</nav></header>\n"
            f"{body}\n</body>\n</html>\n")


def write_report(run_dir: str, description: dict[str, Any] | None = None,
                 out: str | None = None) -> str:
    """(Optionally write ``run.json``, then) draw the page of ``run_dir``; returns its path."""
    if description is not None:
        write_run(run_dir, description)
    path = out or os.path.join(run_dir, REPORT_FILE)
    Path(path).write_text(render(load_run(run_dir)), encoding="utf-8")
    return path


# ---- python -m mpipar.viz loss, python -m mpipar.report ------------------------------------


def cmd_loss(args: argparse.Namespace) -> int:
    """``viz loss METRICS --out FILE``: the loss curves as SVG (``.svg``) or PNG."""
    steps, evals, _ = read_metrics(args.metrics)
    if not steps:
        print(f"{args.metrics}: no training steps (was it written with --metrics?)",
              file=sys.stderr)
        return 2
    if args.out.endswith(".svg"):
        Path(args.out).write_text(loss_chart(steps, evals), encoding="utf-8")
    else:
        loss_png(steps, evals, args.out)
    print(f"wrote {args.out}")
    return 0


def loss_png(steps: list[dict], evals: list[dict], path: str) -> None:
    """The loss chart as a PNG (needs matplotlib: ``pip install -e '.[viz]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("a PNG needs matplotlib: pip install -e '.[viz]' (or write "
                          "--out FILE.svg, which needs nothing)") from exc
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], color=FORWARD_COLOR,
            label="training loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-",
                color=BACKWARD_COLOR, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mpipar.report",
        description="Draw the HTML report of a run: a directory written by train.py "
                    "--report DIR, or a metrics file written by --metrics FILE.")
    ap.add_argument("run", metavar="RUN", help="run directory, or metrics file (JSON lines)")
    ap.add_argument("--trace", metavar="FILE",
                    help="the run's trace, for a metrics file (default: the directory's)")
    ap.add_argument("--out", metavar="FILE",
                    help="HTML file to write (default: RUN/report.html, or report.html "
                         "beside a metrics file)")
    args = ap.parse_args(argv)
    try:
        if os.path.isdir(args.run):
            path = write_report(args.run, out=args.out)
        else:
            path = args.out or os.path.join(os.path.dirname(args.run), REPORT_FILE)
            Path(path).write_text(render(load_run(args.run, args.trace)), encoding="utf-8")
    except (OSError, ValueError, KeyError) as exc:
        print(f"python -m mpipar.report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
