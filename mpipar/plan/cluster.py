"""The machines a layout runs on: a `Cluster`, from flags, a JSON file or this machine's profile.

A cluster is ``devices`` devices, ``devices_per_node`` to a node, each with ``memory_bytes``
of memory and a peak rate ``peak_flops``, of which matrix products sustain
``gemm_flops``; two links, ``intra`` (inside a node: NVLink, shared memory) and ``inter``
(between nodes: InfiniBand, Ethernet), each a latency α and a bandwidth β (`comm.Link`).
Non-matrix work (LayerNorm, GELU, softmax, the Python between operations) costs
``overhead_s_per_token`` seconds per token, per block and per unit of width h (so it scales
with L·h like the elementwise work does), and the optimizer ``optimizer_s_per_param`` per
parameter it updates; a GPU cluster's both are small, a CPU's are not. ``power_w`` is one
device's power draw, for the energy estimate. ``concurrent_fraction`` is the share of its
rate a device keeps while every device of its node computes at once (1 for GPUs; cores of a
CPU share caches, memory bandwidth and, on a shared machine, their time with other work); it
applies to layouts of more than one device.

Rank r of a layout sits at (pp, dp, tp) with tp fastest (docs/design.md §4), so a group's
ranks lie inside one node when the span of its ranks fits in one: tp groups span tp ranks,
dp groups tp·dp, pipeline groups the whole world (`group_link`).

`python -m mpipar.plan calibrate` measures this machine (`mpipar.plan.calibrate`) and writes
`profile_path()`, which ``--cluster this`` reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mpipar.plan.comm import Link
from mpipar.plan.layout import Layout

GB = 10**9


@dataclass(frozen=True)
class Cluster:
    """Devices, their memory and rates, the two links, and the power per device."""

    name: str = "cluster"
    devices: int = 8
    devices_per_node: int = 8
    memory_bytes: int = 80 * GB
    peak_flops: float = 312e12
    gemm_flops: float = 0.6 * 312e12
    intra: Link = Link(5e-6, 300e9)
    inter: Link = Link(10e-6, 25e9)
    overhead_s_per_token: float = 0.0
    optimizer_s_per_param: float = 0.0
    power_w: float = 400.0
    concurrent_fraction: float = 1.0  # of its rate a device keeps while all of a node work

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cluster:
        """From `to_dict`'s form; unknown keys are an error that names them."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown cluster field(s): {', '.join(unknown)}")
        links = {k: Link(**d[k]) if isinstance(d[k], dict) else Link(*d[k])
                 for k in ("intra", "inter") if k in d}
        return cls(**{**d, **links})

    def with_(self, **changes: Any) -> Cluster:
        return replace(self, **changes)


def profile_path() -> Path:
    """Where calibrate writes this machine's profile: $MPIPAR_PROFILE, or
    ~/.cache/mpipar/cluster_this.json."""
    env = os.environ.get("MPIPAR_PROFILE")
    return Path(env) if env else Path.home() / ".cache" / "mpipar" / "cluster_this.json"


def load_cluster(path: str | os.PathLike) -> Cluster:
    """A cluster from a JSON file (`Cluster.to_dict`'s keys)."""
    with open(path) as f:
        return Cluster.from_dict(json.load(f))


def save_cluster(cluster: Cluster, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(cluster.to_dict(), indent=2) + "\n")


def group_link(cluster: Cluster, layout: Layout, group: str) -> tuple[Link, int, str]:
    """(link, group size, "intra" or "inter") of a group of ``layout`` on ``cluster``."""
    t, c, d = layout.tp, layout.cp, layout.dp
    span = {"tp": t, "dp": t * d, "cp": t * c, "dpcp": t * c * d}.get(group, layout.world)
    size = {"tp": t, "dp": d, "pp": layout.pp, "embed": 2, "cp": c,
            "dpcp": d * c}.get(group, layout.world)
    if span <= cluster.devices_per_node:
        return cluster.intra, size, "intra"
    return cluster.inter, size, "inter"


# A stated example: the Megatron-LM 2021 machine (Narayanan et al. 2021, §5: DGX A100 nodes,
# 8 × 80 GB A100 each, 312 TFLOP/s bf16 peak, NVLink/NVSwitch 300 GB/s, 8 × 200 Gb/s
# InfiniBand HDR per node, i.e. 25 GB/s per GPU). 400 W is the A100 SXM's TDP.
A100_CLUSTER = Cluster(name="a100", devices=1024, devices_per_node=8, memory_bytes=80 * GB,
                       peak_flops=312e12, gemm_flops=0.6 * 312e12,
                       intra=Link(5e-6, 300e9), inter=Link(10e-6, 25e9), power_w=400.0)


__all__ = ["A100_CLUSTER", "Cluster", "GB", "group_link", "load_cluster", "profile_path",
           "save_cluster"]
