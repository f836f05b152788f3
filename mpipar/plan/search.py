"""Every layout of a model on a cluster: which fit, why the others do not, and which is fastest.

The order is the sound one (Narayanan et al. 2021, §3.3; the ZeRO paper's advice too):

1. **fit in memory**: a layout whose fullest device needs more than the device has is out,
   whatever its speed; so are layouts mpipar cannot run (`mpipar.grid.layout_problems`, and
   ZeRO-3 under 16-bit precision);
2. **the batch**: the global batch B is the user's (it sets the optimisation), so only layouts
   that divide it, B = dp·m·b, are considered;
3. **throughput**: the rest are ranked by predicted step time, fastest first; among equal
   times the simpler layout first (fewer microbatches, a lower ZeRO stage), then the one that
   leaves more memory free.

`explain` says in one paragraph why the best layout won; `command` gives the exact `mpirun`
line that trains it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from mpipar.grid import layout_problems
from mpipar.model import PRESETS
from mpipar.plan.cluster import Cluster, group_link
from mpipar.plan.comm import comm_bytes_per_step
from mpipar.plan.compute import StepEstimate, step_estimate
from mpipar.plan.layout import Layout
from mpipar.plan.memory import MemoryEstimate, memory_per_device
from mpipar.plan.model_shape import ModelShape, from_preset


@dataclass
class Plan:
    """One layout with its estimates, or the reasons it cannot run."""

    layout: Layout
    memory: MemoryEstimate | None = None
    step: StepEstimate | None = None
    comm_bytes: dict[str, int] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.problems

    def to_dict(self, command_line: str = "") -> dict[str, object]:
        return {"layout": self.layout.to_dict(), "name": self.layout.describe(),
                "feasible": self.feasible, "problems": self.problems,
                "memory": self.memory.to_dict() if self.memory else None,
                "step": self.step.to_dict() if self.step else None,
                "comm_bytes": self.comm_bytes, "links": self.links, "command": command_line}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(shape: ModelShape, cluster: Cluster, batch: int, *, precision: str,
                      max_microbatches: int = 64,
                      schedules: tuple[str, ...] = ("1f1b", "interleaved"),
                      cp: int = 1) -> list[Layout]:
    """Every dp × tp × pp = devices, microbatch count, schedule, ZeRO stage, sequence
    parallelism and recomputation worth trying. Microbatches are powers of two (and, with a
    pipeline, at least pp: fewer leave most of it idle). GPipe and the naive schedule take
    the time of 1F1B or more and more memory, so they are tried only when asked for; so is
    ZB-H1 (``--schedule zb-h1``), a smaller bubble for p stashes on every stage. Context
    parallelism is a choice the user makes for long sequences (``--cp C``): the layouts then
    split the remaining devices/C into dp × tp × pp."""
    out = []
    for tp, pp in itertools.product(divisors(cluster.devices), repeat=2):
        if cluster.devices % (tp * pp * cp) or pp > shape.n_layer:
            continue
        dp = cluster.devices // (tp * pp * cp)
        ms = [m for m in (2 ** k for k in range(12)) if m <= max_microbatches
              and (pp == 1 or m >= pp) and batch % (dp * m) == 0]
        kinds = [(k, 1) for k in schedules if k != "interleaved" and (pp > 1 or k == "1f1b")]
        if "interleaved" in schedules and pp > 1 and shape.n_layer >= 2 * pp:
            kinds.append(("interleaved", 2))
        for m, (sched, v), zero, sp, rc in itertools.product(
                ms, kinds, range(4), (False, True), ("none", "selective", "full")):
            if sp and tp == 1:
                continue
            out.append(Layout(dp, tp, pp, batch, m, sched, v, zero, sp, rc, precision, cp=cp))
    return out


def problems_of(shape: ModelShape, layout: Layout, cluster: Cluster) -> list[str]:
    """Why mpipar cannot run ``layout``, or why it does not fit (empty: it can)."""
    lay = layout
    problems = layout_problems(lay.world, lay.dp, lay.tp, lay.pp, batch_size=lay.batch_size,
                               microbatches=lay.microbatches, n_layer=shape.n_layer,
                               n_head=shape.n_head, d_model=shape.d_model,
                               virtual_stages=lay.virtual_stages, schedule=lay.schedule,
                               zero=lay.zero, sequence_parallel=lay.sequence_parallel,
                               seq_len=shape.seq_len, allreduce=lay.allreduce, cp=lay.cp)
    if lay.zero == 3 and lay.precision != "fp32":
        problems.append(f"--zero 3 runs in full precision only, not --precision {lay.precision}")
    if lay.schedule == "zb-h1" and lay.pp > 1 and lay.zero == 3:
        problems.append("--schedule zb-h1 does not take --zero 3")
    return problems


def evaluate(shape: ModelShape, layout: Layout, cluster: Cluster) -> Plan:
    """The estimates of one layout; its problems, memory included, if it cannot run."""
    plan = Plan(layout, problems=problems_of(shape, layout, cluster))
    if plan.problems:
        return plan
    plan.memory = memory_per_device(shape, layout)
    if plan.memory.peak > cluster.memory_bytes:
        m = plan.memory
        plan.problems.append(
            f"needs {m.peak / 1e9:.1f} GB per device (parameters {m.params / 1e9:.1f}, "
            f"gradients {m.grads / 1e9:.1f}, optimizer {m.optimizer / 1e9:.1f}, activations "
            f"{m.activations / 1e9:.1f}), more than the {cluster.memory_bytes / 1e9:.1f} GB "
            f"a device has")
        return plan
    plan.step = step_estimate(shape, layout, cluster)
    plan.comm_bytes = comm_bytes_per_step(shape, layout)
    plan.links = {g: group_link(cluster, layout, g)[2] for g in plan.comm_bytes}
    return plan


def search(shape: ModelShape, cluster: Cluster, batch: int, *, precision: str = "fp32",
           layouts: list[Layout] | None = None) -> tuple[list[Plan], list[Plan]]:
    """(feasible plans, fastest first; infeasible plans with their reasons)."""
    if layouts is None:
        layouts = candidate_layouts(shape, cluster, batch, precision=precision)
    plans = [evaluate(shape, lay, cluster) for lay in layouts]
    good = sorted((p for p in plans if p.feasible),
                  key=lambda p: (p.step.step_s, p.layout.microbatches, p.layout.zero,
                                 p.memory.peak))
    return good, [p for p in plans if not p.feasible]


def command(shape: ModelShape, layout: Layout, *, steps: int = 400) -> str:
    """The `mpirun ... train.py ...` line that trains ``layout`` (docs/design.md §2 flags)."""
    preset = next((n for n in PRESETS if from_preset(n, shape.vocab_size) == shape), None)
    model = (f"--preset {preset}" if preset else
             f"--n-layer {shape.n_layer} --d-model {shape.d_model} --n-head {shape.n_head} "
             f"--seq-len {shape.seq_len}")
    lay = layout
    parts = [f"mpirun -n {lay.world} python train.py {model} --steps {steps}",
             f"--batch-size {lay.batch_size} --dp {lay.dp} --tp {lay.tp} --pp {lay.pp}"
             + (f" --cp {lay.cp}" if lay.cp > 1 else "")]
    if lay.microbatches > 1:
        parts.append(f"--microbatches {lay.microbatches}")
    if lay.pp > 1 and (lay.schedule, lay.virtual_stages) != ("1f1b", 1):
        parts.append(f"--schedule {lay.schedule} --virtual-stages {lay.virtual_stages}")
    options = [(lay.zero, f"--zero {lay.zero}"), (lay.sequence_parallel, "--sequence-parallel"),
               (lay.recompute != "none", f"--recompute {lay.recompute}"),
               (lay.precision != "fp32", f"--precision {lay.precision}"),
               (lay.allreduce != "mpi", f"--allreduce {lay.allreduce}")]
    parts += [text for on, text in options if on]
    return " ".join(parts)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 2**20:.1f} MiB"


def _biggest_difference(a: StepEstimate, b: StepEstimate) -> str:
    """The part of the step where ``b`` loses most time to ``a``."""
    parts = {"compute (including the bubble)": (a.compute_s / (1 - a.bubble),
                                                b.compute_s / (1 - b.bubble)),
             "the optimizer": (a.optimizer_s, b.optimizer_s)}
    for g in set(a.comm_s) | set(b.comm_s):
        parts[f"{g} communication"] = (a.comm_s.get(g, 0.0), b.comm_s.get(g, 0.0))
    name, (x, y) = max(parts.items(), key=lambda kv: kv[1][1] - kv[1][0])
    return f"{name} ({y * 1e3:.3g} ms against {x * 1e3:.3g} ms)"


def explain(good: list[Plan], bad: list[Plan], cluster: Cluster) -> str:
    """One paragraph: how many layouts fit, why the best one is best, what the next loses."""
    total = len(good) + len(bad)
    memory = sum(any("GB per device" in q for q in p.problems) for p in bad)
    text = (f"Of {total} layouts of {cluster.devices} devices, {len(bad) - memory} cannot run "
            f"in mpipar (a size that does not divide) and {memory} do not fit in "
            f"{_gb(cluster.memory_bytes)} per device; {len(good)} remain.")
    if not good:
        return text + " None fits: add devices, recompute, or shard more (ZeRO, tp, pp)."
    best, lay = good[0], good[0].layout
    st, mem = best.step, best.memory
    text += (f" The fastest is {lay.describe()}: {st.step_s:.4g} s per step, "
             f"{st.tokens_per_s:,.0f} tokens/s, MFU {st.mfu:.1%}, using {_gb(mem.peak)} of "
             f"{_gb(cluster.memory_bytes)}.")
    if lay.tp > 1:
        text += (f" Its tp = {lay.tp} all-reduces every layer's activations and stays on the "
                 f"{best.links.get('tp', 'intra')}-node link.")
    if lay.pp > 1:
        text += (f" Its pp = {lay.pp} sends only one activation per microbatch across "
                 f"the {best.links.get('pp')}-node link, at a bubble of {st.bubble:.1%} "
                 f"with m = {lay.microbatches}.")
    if lay.zero:
        text += f" ZeRO-{lay.zero} cuts the optimizer state to {_gb(mem.optimizer)}."
    sizes = (lay.dp, lay.tp, lay.pp)
    others = [p for p in good[1:] if (p.layout.dp, p.layout.tp, p.layout.pp) != sizes]
    if others:
        nxt = others[0]
        text += (f" The best other split of dp × tp × pp, {nxt.layout.describe()}, is "
                 f"{nxt.step.step_s / st.step_s - 1:.2%} slower, mostly in "
                 f"{_biggest_difference(st, nxt.step)}.")
    return text


__all__ = ["Plan", "candidate_layouts", "command", "evaluate", "explain", "problems_of",
           "search"]
