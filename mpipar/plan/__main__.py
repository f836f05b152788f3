"""`python -m mpipar.plan`: every feasible layout of a model on a cluster, ranked.

    python -m mpipar.plan --model medium --cluster this
    python -m mpipar.plan --model gpt3-175b --batch-size 1536 --cluster a100 --precision bf16
    python -m mpipar.plan --n-layer 24 --d-model 1024 --n-head 16 --seq-len 1024 \\
        --vocab-size 50257 --batch-size 512 --devices 64 --memory-gb 40 --json
    python -m mpipar.plan calibrate [--model medium] [--quick]

Exit codes: 0 the plan was printed (even if no layout fits: the text says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys

from mpipar.plan.cluster import A100_CLUSTER, GB, Cluster, load_cluster, profile_path
from mpipar.plan.comm import Link
from mpipar.plan.layout import Layout
from mpipar.plan.model_shape import PUBLISHED, ModelShape, resolve_shape
from mpipar.plan.search import Plan, candidate_layouts, command, explain, search

PRESET_BATCH = {"tiny": 8, "small": 16, "medium": 32}


class UsageError(Exception):
    """Bad flags: exit 2 with this message."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpipar.plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rank every layout (dp, tp, pp, microbatches, schedule, ZeRO, sequence "
                    "parallelism, recomputation) of a model on a cluster: memory per device, "
                    "communication per group, step time, tokens/s, MFU, energy and the "
                    "mpirun command. 'python -m mpipar.plan calibrate --help' measures this "
                    "machine.",
        epilog="Models: tiny, small, medium (mpipar's presets) and " + ", ".join(PUBLISHED))
    m = p.add_argument_group("model")
    m.add_argument("--model", default="small", help="a preset or published shape (small)")
    for flag in ("--n-layer", "--d-model", "--n-head", "--seq-len", "--vocab-size"):
        m.add_argument(flag, type=int, help="override the model's value")
    m.add_argument("--batch-size", type=int,
                   help="global batch in sequences (a preset's own; else required)")
    m.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    c = p.add_argument_group("cluster (flags override --cluster's values)")
    c.add_argument("--cluster", default=None,
                   help="'this' (the calibrated profile), 'a100' (1024 A100-80GB, 8 per node, "
                        "NVLink 300 GB/s, IB 25 GB/s), or a JSON file")
    c.add_argument("--devices", type=int)
    c.add_argument("--devices-per-node", type=int)
    c.add_argument("--memory-gb", type=float, help="memory per device, 10^9 bytes")
    c.add_argument("--peak-tflops", type=float, help="peak FLOP/s per device, 10^12")
    c.add_argument("--gemm-tflops", type=float,
                   help="sustained matrix-product FLOP/s per device (default 60%% of peak)")
    c.add_argument("--intra-gbps", type=float, help="intra-node bandwidth, GB/s")
    c.add_argument("--intra-latency-us", type=float)
    c.add_argument("--inter-gbps", type=float, help="inter-node bandwidth, GB/s")
    c.add_argument("--inter-latency-us", type=float)
    c.add_argument("--power-w", type=float, help="power per device, for the energy estimate")
    f = p.add_argument_group("only layouts with (each flag as train.py's)")
    for flag in ("--dp", "--tp", "--pp", "--microbatches", "--zero"):
        f.add_argument(flag, type=int)
    f.add_argument("--cp", type=int, default=1,
                   help="context-parallel ranks per sequence; the others form dp × tp × pp (1)")
    f.add_argument("--schedule", choices=("naive", "gpipe", "1f1b", "interleaved", "zb-h1"))
    f.add_argument("--recompute", choices=("none", "selective", "full"))
    f.add_argument("--sequence-parallel", choices=("yes", "no"))
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=10, help="layouts in the table (0: all)")
    o.add_argument("--details", type=int, default=3, help="layouts shown in full (3)")
    o.add_argument("--json", action="store_true", help="one JSON document instead of text")
    return p


def model_of(args: argparse.Namespace) -> ModelShape:
    """The model: --model's shape with any explicit flags applied."""
    try:
        base = resolve_shape(args.model)
        fields = {k: getattr(args, k) for k in base.to_dict() if getattr(args, k) is not None}
        return ModelShape(**{**base.to_dict(), **fields})
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def cluster_of(args: argparse.Namespace) -> Cluster:
    """--cluster's description with the flags' values applied."""
    if args.cluster == "this":
        path = profile_path()
        if not path.exists():
            raise UsageError(f"no profile of this machine at {path}: run "
                             "'python -m mpipar.plan calibrate' first")
        base = load_cluster(path)
    elif args.cluster == "a100":
        base = A100_CLUSTER
    elif args.cluster:
        try:
            base = load_cluster(args.cluster)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"cannot read cluster file {args.cluster}: {e}") from None
    else:
        base = Cluster(devices=1)
    changes = {k: v for k, v in {
        "devices": args.devices, "devices_per_node": args.devices_per_node,
        "memory_bytes": None if args.memory_gb is None else int(args.memory_gb * GB),
        "peak_flops": None if args.peak_tflops is None else args.peak_tflops * 1e12,
        "power_w": args.power_w}.items() if v is not None}
    if args.peak_tflops is not None or args.gemm_tflops is not None:
        changes["gemm_flops"] = (args.gemm_tflops or 0.6 * args.peak_tflops) * 1e12
    for name in ("intra", "inter"):
        link = getattr(base, name)
        bw, lat = getattr(args, f"{name}_gbps"), getattr(args, f"{name}_latency_us")
        changes[name] = Link(link.alpha if lat is None else lat * 1e-6,
                             link.beta if bw is None else bw * 1e9)
    cluster = base.with_(**changes)
    bad = [f"{k} must be positive, got {v}" for k, v in (
        ("--devices", cluster.devices), ("--devices-per-node", cluster.devices_per_node),
        ("--memory-gb", cluster.memory_bytes / GB), ("--gemm-tflops", cluster.gemm_flops))
        if v <= 0]
    if bad:
        raise UsageError("; ".join(bad))
    return cluster


def batch_of(args: argparse.Namespace, shape: ModelShape) -> int:
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        return args.batch_size
    if args.model in PRESET_BATCH:
        return PRESET_BATCH[args.model]
    raise UsageError(f"--model {args.model} has no default batch: give --batch-size")


def size(n: float) -> str:
    """Bytes in the unit a reader compares: GB from 0.1 GB, else MiB or KiB."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def header(shape: ModelShape, cluster: Cluster, batch: int) -> list[str]:
    from mpipar.plan.memory import parameter_count

    return [f"model: L={shape.n_layer} h={shape.d_model} a={shape.n_head} s={shape.seq_len} "
            f"V={shape.vocab_size}, {parameter_count(shape):,} parameters; global batch "
            f"{batch} sequences ({batch * shape.seq_len:,} tokens)",
            f"cluster {cluster.name}: {cluster.devices} devices, {cluster.devices_per_node} "
            f"per node, {size(cluster.memory_bytes)} each; peak {cluster.peak_flops / 1e12:.4g}"
            f" TFLOP/s, matrix products {cluster.gemm_flops / 1e12:.4g} TFLOP/s sustained; "
            f"intra-node α {cluster.intra.alpha * 1e6:.3g} µs β {cluster.intra.beta / 1e9:.3g}"
            f" GB/s, inter-node α {cluster.inter.alpha * 1e6:.3g} µs β "
            f"{cluster.inter.beta / 1e9:.3g} GB/s"]


def table(plans: list[Plan]) -> list[str]:
    lines = [f"{'#':>3}  {'layout':<52} {'peak/device':>12} {'step s':>10} {'tokens/s':>12} "
             f"{'MFU':>7} {'J/token*':>9}"]
    for i, p in enumerate(plans, 1):
        st = p.step
        lines.append(f"{i:>3}  {p.layout.describe():<52} {size(p.memory.peak):>12} "
                     f"{st.step_s:>10.4g} {st.tokens_per_s:>12,.0f} {st.mfu:>7.2%} "
                     f"{st.joules_per_token:>9.3g}")
    return lines


def details(i: int, p: Plan, shape: ModelShape) -> list[str]:
    m, st = p.memory, p.step
    comm = "; ".join(f"{g} {size(b)} = {b:,} B ({p.links[g]}-node, "
                     f"{st.comm_s.get(g, 0) * 1e3:.3g} ms)"
                     for g, b in p.comm_bytes.items()) or "none"
    return [f"#{i} {p.layout.describe()}",
            f"  memory per device (pipeline rank {m.rank}): parameters {size(m.params)}, "
            f"gradients {size(m.grads)}, optimizer state {size(m.optimizer)}, activations "
            f"{size(m.activations)}" + (f", ZeRO-2 gradient buffer {size(m.transient)}"
                                        if m.transient else "") + f"; peak {size(m.peak)}",
            f"  communication per step (bytes over all ranks; time on the slowest): {comm}",
            f"  compute {st.compute_s * 1e3:.4g} ms, bubble {st.bubble:.1%}, optimizer "
            f"{st.optimizer_s * 1e3:.3g} ms; step {st.step_s * 1e3:.4g} ms, "
            f"{st.tokens_per_s:,.0f} tokens/s, MFU {st.mfu:.2%}, "
            f"{st.joules_per_token:.3g} J/token (estimate)",
            f"  command: {command(shape, p.layout)}"]


def text_report(shape: ModelShape, cluster: Cluster, batch: int, good: list[Plan],
                bad: list[Plan], top: int, n_details: int) -> str:
    shown = good if top == 0 else good[:top]
    lines = header(shape, cluster, batch) + [""]
    if shown:
        lines += [f"feasible layouts, fastest first ({len(shown)} of {len(good)}):"]
        lines += table(shown)
        lines += [f"* energy from the stated {cluster.power_w:g} W per device: an estimate, "
                  "not a measurement", ""]
        for i, p in enumerate(shown[:n_details], 1):
            lines += details(i, p, shape) + [""]
    if bad:
        lines.append(f"not feasible ({min(5, len(bad))} of {len(bad)} shown):")
        fits = [p for p in bad if any("GB per device" in q for q in p.problems)]
        for p in (fits + [p for p in bad if p not in fits])[:5]:
            lines.append(f"  {p.layout.describe()}: {'; '.join(p.problems)}")
        lines.append("")
    lines.append(explain(good, bad, cluster))
    return "\n".join(lines)


def json_report(shape: ModelShape, cluster: Cluster, batch: int, good: list[Plan],
                bad: list[Plan], top: int) -> str:
    shown = good if top == 0 else good[:top]
    return json.dumps({
        "model": shape.to_dict(), "cluster": cluster.to_dict(), "batch_size": batch,
        "feasible_count": len(good), "infeasible_count": len(bad),
        "feasible": [p.to_dict(command(shape, p.layout)) for p in shown],
        "infeasible": [p.to_dict() for p in bad[:100]],
        "energy_note": f"estimate from the stated {cluster.power_w:g} W per device",
        "explanation": explain(good, bad, cluster)}, indent=1)


def chosen(args: argparse.Namespace, layouts: list[Layout]) -> list[Layout]:
    """The layouts that agree with every layout flag given."""
    want = {k: getattr(args, k) for k in ("dp", "tp", "pp", "microbatches", "zero",
                                          "schedule", "recompute") if getattr(args, k)
            is not None}
    if args.sequence_parallel:
        want["sequence_parallel"] = args.sequence_parallel == "yes"
    return [lay for lay in layouts if all(getattr(lay, k) == v for k, v in want.items())]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        from mpipar.plan.calibrate import calibrate_main

        return calibrate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        shape, cluster = model_of(args), cluster_of(args)
        batch = batch_of(args, shape)
        if args.cp < 1 or cluster.devices % args.cp:
            raise UsageError(f"--cp {args.cp} must be a positive divisor of --devices "
                             f"{cluster.devices}")
    except UsageError as e:
        print(f"python -m mpipar.plan: error: {e}", file=sys.stderr)
        return 2
    good, bad = search(shape, cluster, batch, precision=args.precision,
                       layouts=chosen(args, candidate_layouts(
                           shape, cluster, batch, precision=args.precision,
                           schedules=(args.schedule,) if args.schedule else ("1f1b",
                                                                             "interleaved"),
                           cp=args.cp)))
    if args.json:
        print(json_report(shape, cluster, batch, good, bad, args.top))
    else:
        print(text_report(shape, cluster, batch, good, bad, args.top, args.details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
