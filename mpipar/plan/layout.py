"""A layout: how one training step is spread over devices, in `train.py`'s terms.

Every field is one of `train.py`'s flags (docs/design.md §2), so a `Layout` turns into the exact
command that runs it (`mpipar.plan.search.command`). ``batch_size`` is the global batch B in
sequences; each data-parallel replica takes B/dp of it, cut into ``microbatches`` of
b = B/(dp·m) sequences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mpipar.model import RECOMPUTE_MODES

PRECISIONS = ("fp32", "fp16", "bf16")
SCHEDULES = ("naive", "gpipe", "1f1b", "interleaved", "zb-h1")


@dataclass(frozen=True)
class Layout:
    """dp × tp × pp (× cp) ranks and the options that change memory, traffic or time."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    batch_size: int = 8
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    recompute: str = "none"
    precision: str = "fp32"
    dtype: str = "float32"
    allreduce: str = "mpi"
    cp: int = 1  # context parallelism: ranks sharing each sequence (--cp)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, "
                             f"got {self.recompute!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def grad_replicas(self) -> int:
        """Ranks holding the same weights, over which gradients are reduced: dp · cp."""
        return self.dp * self.cp

    @property
    def micro_batch(self) -> int:
        """b, the sequences of one microbatch on one replica: B/(dp·m)."""
        return self.batch_size // (self.dp * self.microbatches)

    @property
    def item(self) -> int:
        """Bytes of a parameter, activation, gradient or message: the compute precision."""
        if self.precision != "fp32":
            return 2
        return 8 if self.dtype == "float64" else 4

    @property
    def state_item(self) -> int:
        """Bytes of an element of optimizer state (and of a master weight): fp32 under
        16-bit compute, else the dtype."""
        return 4 if self.precision != "fp32" else self.item

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        """A short name: dp2 tp1 pp2 m4 1f1b z1 sp rc=full bf16."""
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}", f"m{self.microbatches}"]
        if self.cp > 1:
            parts.insert(3, f"cp{self.cp}")
        if self.pp > 1:
            parts.append(self.schedule + (f"v{self.virtual_stages}"
                                          if self.virtual_stages > 1 else ""))
        parts.append(f"z{self.zero}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.recompute != "none":
            parts.append(f"rc={self.recompute}")
        parts.append(self.precision)
        return " ".join(parts)


__all__ = ["Layout", "PRECISIONS", "SCHEDULES"]
