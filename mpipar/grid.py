"""The process grid: how ``world = dp × tp × pp (× cp)`` ranks are arranged and grouped.

A run with data-parallel size D, tensor-parallel size T and pipeline size P places global
rank r at coordinates (pp, dp, tp) with tp varying fastest, then dp, then pp::

    tp = r % T          dp = (r // T) % D          pp = r // (T × D)

so the T ranks of a tensor-parallel group are neighbours (they exchange activations in every
layer and talk the most; on a real cluster neighbours share a node). For D=2, T=2, P=2::

    pp stage 0:  dp 0: ranks 0 1   dp 1: ranks 2 3      (tp groups {0,1} {2,3} {4,5} {6,7})
    pp stage 1:  dp 0: ranks 4 5   dp 1: ranks 6 7      (dp groups {0,2} {1,3} {4,6} {5,7})
                                                        (pp groups {0,4} {1,5} {2,6} {3,7})

Each rank belongs to exactly one group of each kind: the ranks that differ from it only in
that coordinate. :class:`ProcessGrid` makes those groups with ``Comm.split`` and hands them
out explicitly; nothing is kept in module-level state.

Context parallelism (``--cp C``) adds a fourth coordinate between tp and dp (tp fastest,
then cp, dp, pp; :func:`grid_coords`), a cp group per (pp, dp, tp) and the gradient group of
the ranks sharing (pp, tp); with C = 1 everything above is unchanged.

The checks on a layout (:func:`resolve_sizes`, :func:`validate_layout`) are pure functions,
so they run, and are tested, without MPI. They raise :class:`ConfigError` whose message names
the command-line flags and quotes the numbers; ``train.py`` turns it into exit code 2.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mpipar.comm import Comm, world_size_and_rank
from mpipar.trace import Tracer

SCHEDULES = ("naive", "gpipe", "1f1b", "interleaved", "zb-h1")
ZERO_STAGES = (0, 1, 2, 3)


class ConfigError(ValueError):
    """A bad command line or layout; the message names the flags and the numbers."""


# ---- pure layout arithmetic ---------------------------------------------------------------


def resolve_sizes(
    world_size: int, dp: int | None = None, tp: int | None = None, pp: int | None = None,
    cp: int = 1,
) -> tuple[int, int, int]:
    """Fill in omitted sizes: tp and pp default to 1, dp to ``world / (tp × pp × cp)``.

    Returns ``(dp, tp, pp)``; raises :class:`ConfigError` when they cannot multiply to the
    world size. ``cp`` (context parallelism, ``--cp``) is given, never inferred.
    """
    tp = 1 if tp is None else tp
    pp = 1 if pp is None else pp
    for flag, value in (("--tp", tp), ("--pp", pp), ("--dp", dp), ("--cp", cp)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    others, named = tp * pp * cp, f"--tp {tp} × --pp {pp}" + (f" × --cp {cp}" if cp > 1 else "")
    if dp is None:
        if world_size % others != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by {named} = "
                f"{others}, so --dp cannot be inferred"
            )
        dp = world_size // others
    if dp * others != world_size:
        raise ConfigError(
            f"world size {world_size} != --dp {dp} × {named} = {dp * others}"
        )
    return dp, tp, pp


def validate_layout(
    world_size: int,
    dp: int,
    tp: int,
    pp: int,
    *,
    batch_size: int,
    microbatches: int,
    n_layer: int,
    n_head: int,
    d_model: int,
    virtual_stages: int = 1,
    schedule: str = "1f1b",
    zero: int = 0,
    sequence_parallel: bool = False,
    seq_len: int | None = None,
    allreduce: str = "mpi",
    cp: int = 1,
) -> None:
    """Check that a model and batch can be split over a dp × tp × pp grid.

    The rules, and why:

    * ``world == dp × tp × pp``: every rank gets exactly one grid position.
    * ``batch_size % (dp × microbatches) == 0``: each data-parallel rank takes
      ``batch_size / dp`` sequences and cuts them into equal microbatches, so every
      microbatch has the same shape on every rank (and the mean loss is the serial one).
    * ``n_head % tp == 0``: attention is split by heads; ``d_model % tp == 0`` and
      ``4·d_model % tp == 0``: the QKV/MLP weights are split by columns.
    * ``n_layer >= pp × virtual_stages``: each of the ``pp × V`` model chunks needs at least
      one layer (layers are split as evenly as possible, so no divisibility is needed).
    * the interleaved schedule needs ``virtual_stages >= 2`` and ``microbatches % pp == 0``
      (Megatron-LM's rule: microbatches go round the stages in groups of pp); the other
      schedules take one chunk per rank (``virtual_stages == 1``).
    * sequence parallelism splits the sequence over tp ranks: ``seq_len % tp == 0``.
    * ``zero`` is 0 (off), 1 (shard optimizer state), 2 (also shard gradients) or 3 (also
      shard parameters). Stage 3 gathers and reduce-scatters with MPI's collectives, so it
      does not take ``allreduce="ring"``, the ring that ZeRO-1/2's two halves can be.
    * context parallelism (``cp > 1``) makes the world ``dp × tp × pp × cp`` and cuts each
      sequence into 2·cp chunks (two per rank, for balanced causal work): ``seq_len % (2·cp)
      == 0``; it does not combine with sequence parallelism (both would split the sequence).

    Every violated rule is reported, in one :class:`ConfigError` (:func:`layout_problems`
    lists them without raising).
    """
    problems = layout_problems(
        world_size, dp, tp, pp, batch_size=batch_size, microbatches=microbatches,
        n_layer=n_layer, n_head=n_head, d_model=d_model, virtual_stages=virtual_stages,
        schedule=schedule, zero=zero, sequence_parallel=sequence_parallel, seq_len=seq_len,
        allreduce=allreduce, cp=cp)
    if problems:
        raise problems_error(problems)


def layout_problems(world_size: int, dp: int, tp: int, pp: int, *, batch_size: int,
                    microbatches: int, n_layer: int, n_head: int, d_model: int,
                    virtual_stages: int = 1, schedule: str = "1f1b", zero: int = 0,
                    sequence_parallel: bool = False, seq_len: int | None = None,
                    allreduce: str = "mpi", cp: int = 1) -> list[str]:
    """The rules of :func:`validate_layout` that a layout breaks, one line each."""
    sizes = {
        "--dp": dp, "--tp": tp, "--pp": pp, "--cp": cp, "--batch-size": batch_size,
        "--microbatches": microbatches, "--virtual-stages": virtual_stages,
        "--n-layer": n_layer, "--n-head": n_head, "--d-model": d_model,
    }
    problems = [f"{flag} must be at least 1, got {v}" for flag, v in sizes.items() if v < 1]
    if problems:  # the arithmetic below would divide by them
        return problems
    if cp > 1:
        return (_cp_problems(world_size, dp, tp, pp, cp, sequence_parallel, seq_len)
                + _grid_problems(dp * tp * pp, dp, tp, pp, batch_size, microbatches)
                + _shape_problems(tp, pp, virtual_stages, n_layer, n_head, d_model)
                + _schedule_problems(schedule, pp, microbatches, virtual_stages)
                + _option_problems(tp, False, seq_len, zero, allreduce))
    return (_grid_problems(world_size, dp, tp, pp, batch_size, microbatches)
            + _shape_problems(tp, pp, virtual_stages, n_layer, n_head, d_model)
            + _schedule_problems(schedule, pp, microbatches, virtual_stages)
            + _option_problems(tp, sequence_parallel, seq_len, zero, allreduce))


def _grid_problems(world_size: int, dp: int, tp: int, pp: int, batch_size: int,
                   microbatches: int) -> list[str]:
    problems = []
    if world_size != dp * tp * pp:
        problems.append(
            f"world size {world_size} != --dp {dp} × --tp {tp} × --pp {pp} = {dp * tp * pp}"
        )
    if batch_size % (dp * microbatches) != 0:
        problems.append(
            f"--batch-size {batch_size} is not divisible by --dp {dp} × --microbatches "
            f"{microbatches} = {dp * microbatches} (every microbatch must have the same size)"
        )
    return problems


def _cp_problems(world_size: int, dp: int, tp: int, pp: int, cp: int,
                 sequence_parallel: bool, seq_len: int | None) -> list[str]:
    """Context parallelism's rules: the world holds cp copies of the dp × tp × pp grid, and
    each sequence is cut into 2·cp equal chunks."""
    problems = []
    if world_size != dp * tp * pp * cp:
        problems.append(f"world size {world_size} != --dp {dp} × --tp {tp} × --pp {pp} × "
                        f"--cp {cp} = {dp * tp * pp * cp}")
    if seq_len is None:
        problems.append("--cp needs the sequence length (--seq-len)")
    elif seq_len % (2 * cp) != 0:
        problems.append(f"--cp {cp} needs --seq-len {seq_len} divisible by 2 × --cp = "
                        f"{2 * cp} (each rank holds two of 2·cp equal chunks)")
    if sequence_parallel:
        problems.append(f"--cp {cp} does not combine with --sequence-parallel (both split "
                        f"the sequence; use one of them)")
    return problems


def _shape_problems(tp: int, pp: int, virtual_stages: int, n_layer: int, n_head: int,
                    d_model: int) -> list[str]:
    problems = []
    if d_model % n_head != 0:
        problems.append(f"--d-model {d_model} is not divisible by --n-head {n_head}")
    if n_head % tp != 0:
        problems.append(f"--n-head {n_head} is not divisible by --tp {tp}")
    if d_model % tp != 0:
        problems.append(f"--d-model {d_model} is not divisible by --tp {tp}")
    if (4 * d_model) % tp != 0:
        problems.append(f"MLP width 4 × --d-model = {4 * d_model} is not divisible by --tp {tp}")
    if n_layer < pp * virtual_stages:
        problems.append(
            f"--n-layer {n_layer} gives fewer layers than stages: --pp {pp} × "
            f"--virtual-stages {virtual_stages} = {pp * virtual_stages} model chunks"
        )
    return problems


def _schedule_problems(schedule: str, pp: int, microbatches: int,
                       virtual_stages: int) -> list[str]:
    if schedule not in SCHEDULES:
        return [f"--schedule {schedule!r} is not one of {', '.join(SCHEDULES)}"]
    if schedule != "interleaved":
        if virtual_stages == 1:
            return []
        return [f"--virtual-stages {virtual_stages} needs --schedule interleaved "
                f"(--schedule {schedule} runs one model chunk per rank)"]
    problems = []
    if virtual_stages < 2:
        problems.append(
            f"--schedule interleaved needs --virtual-stages >= 2, got {virtual_stages}"
        )
    if microbatches % pp != 0:
        problems.append(
            f"--schedule interleaved needs --microbatches {microbatches} divisible by "
            f"--pp {pp}"
        )
    return problems


def _option_problems(tp: int, sequence_parallel: bool, seq_len: int | None,
                     zero: int, allreduce: str) -> list[str]:
    problems = []
    if sequence_parallel and tp > 1:
        if seq_len is None:
            problems.append("--sequence-parallel needs the sequence length (--seq-len)")
        elif seq_len % tp != 0:
            problems.append(
                f"--sequence-parallel needs --seq-len {seq_len} divisible by --tp {tp}"
            )
    if zero not in ZERO_STAGES:
        problems.append(f"--zero {zero} is not one of {', '.join(map(str, ZERO_STAGES))}")
    if zero == 3 and allreduce == "ring":
        problems.append("--zero 3 gathers parameters and reduce-scatters gradients with MPI's "
                        "collectives; --allreduce ring (ZeRO-1/2's two halves written as a "
                        "ring) does not apply to it")
    return problems


def problems_error(problems: list[str]) -> ConfigError:
    """One :class:`ConfigError` for all ``problems``: the line itself when there is one, else
    ``invalid configuration:`` and one indented ``- problem`` line each."""
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def rank_coords(rank: int, dp: int, tp: int, pp: int) -> tuple[int, int, int]:
    """Global rank → ``(pp_rank, dp_rank, tp_rank)``; tp varies fastest, then dp, then pp."""
    if not 0 <= rank < dp * tp * pp:
        raise ValueError(f"rank {rank} outside a grid of {dp} × {tp} × {pp} ranks")
    return rank // (tp * dp), (rank // tp) % dp, rank % tp


def coords_rank(pp_rank: int, dp_rank: int, tp_rank: int, dp: int, tp: int) -> int:
    """``(pp_rank, dp_rank, tp_rank)`` → global rank; the inverse of :func:`rank_coords`."""
    return (pp_rank * dp + dp_rank) * tp + tp_rank


def grid_coords(rank: int, dp: int, tp: int, pp: int, cp: int = 1) -> tuple[int, int, int, int]:
    """Global rank → ``(pp_rank, dp_rank, cp_rank, tp_rank)``: tp fastest, then cp, dp, pp::

        tp = r % T     cp = (r // T) % C     dp = (r // (T·C)) % D     pp = r // (T·C·D)

    It is :func:`rank_coords` of a grid whose data coordinate is the pair (dp, cp) flattened
    to dp·C + cp, so with C = 1 it is :func:`rank_coords` with cp_rank 0.
    """
    pp_rank, dpcp, tp_rank = rank_coords(rank, dp * cp, tp, pp)
    return pp_rank, dpcp // cp, dpcp % cp, tp_rank


def split_colors(rank: int, dp: int, tp: int, pp: int,
                 cp: int = 1) -> dict[str, tuple[int | None, int]]:
    """The ``(color, key)`` global ``rank`` hands to ``Comm.split`` for each kind of group.

    A group is the ranks that share every coordinate but one, so its color is the pair of
    shared coordinates flattened to one int, and its key the coordinate that varies (which
    orders the group, so a ``pp`` group's ranks are its stage numbers)::

        tp:    color = pp·D + dp    key = tp
        dp:    color = pp·T + tp    key = dp
        pp:    color = dp·T + tp    key = pp
        embed: color = dp·T + tp on the first and last stage, None (opt out) between

    (``embed`` only matters with pp > 1, where :meth:`ProcessGrid.build` makes it.)

    With context parallelism (``cp`` = C > 1) tp, pp and embed are the groups above of the
    grid whose data coordinate is dp·C + cp (:func:`grid_coords`), whose data group becomes
    ``dpcp`` (the ranks sharing pp and tp: the gradient group), and two more are added::

        dp:    color = (pp·C + cp)·T + tp    key = dp
        cp:    color = (pp·D + dp)·T + tp    key = cp
    """
    if cp > 1:
        colors = split_colors(rank, dp * cp, tp, pp)
        pp_r, dp_r, cp_r, tp_r = grid_coords(rank, dp, tp, pp, cp)
        colors["dpcp"] = colors["dp"]
        colors["dp"] = ((pp_r * cp + cp_r) * tp + tp_r, dp_r)
        colors["cp"] = ((pp_r * dp + dp_r) * tp + tp_r, cp_r)
        return colors
    pp_rank, dp_rank, tp_rank = rank_coords(rank, dp, tp, pp)
    pipe = dp_rank * tp + tp_rank
    return {
        "tp": (pp_rank * dp + dp_rank, tp_rank),
        "dp": (pp_rank * tp + tp_rank, dp_rank),
        "pp": (pipe, pp_rank),
        "embed": (pipe if pp_rank in (0, pp - 1) else None, pp_rank),
    }


# ---- the communicators ------------------------------------------------------------------


@dataclass
class ProcessGrid:
    """This rank's place in the dp × tp × pp grid and its three (or four) groups.

    ``dp_comm`` holds the ranks with the same (pp, tp) coordinates (they hold the same weight
    shard and average gradients), ``tp_comm`` those with the same (pp, dp) (they split each
    layer), ``pp_comm`` those with the same (dp, tp) (they pass activations along, ordered by
    stage). ``embed_comm`` joins the first and last pipeline stage of a ``pp_comm``: the
    token embedding lives on the first stage and, tied as ``lm_head``, on the last, so their
    two gradient contributions are summed over it. It is ``None`` when ``pp == 1`` (one copy,
    nothing to sum) and on middle stages. ``next_rank``/``prev_rank`` are the global ranks of
    the neighbouring stages (``None`` at the ends); ``pp_comm`` ranks equal stage numbers.

    Context parallelism (``cp`` > 1) adds ``cp_comm``, the ranks with the same (pp, dp, tp)
    ordered by cp rank (they hold the chunks of the same sequences and pass keys and values
    around a ring), and ``dpcp_comm``, the ranks with the same (pp, tp): they hold the same
    weights and reduce gradients (:attr:`grad_comm`). With cp = 1 both are ``None``.
    """

    world: Comm
    dp_comm: Comm
    tp_comm: Comm
    pp_comm: Comm
    embed_comm: Comm | None
    dp: int
    tp: int
    pp: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    cp: int = 1
    cp_rank: int = 0
    cp_comm: Comm | None = None
    dpcp_comm: Comm | None = None

    @property
    def grad_comm(self) -> Comm:
        """The group that reduces gradients: dp × cp ranks (the dp group when cp = 1)."""
        return self.dpcp_comm if self.dpcp_comm is not None else self.dp_comm

    @property
    def grad_size(self) -> int:
        """Ranks holding the same weights, over which gradients are averaged: dp · cp."""
        return self.dp * self.cp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def next_rank(self) -> int | None:
        """Global rank of the next pipeline stage (same dp, tp), or None on the last stage."""
        if self.is_last_stage:
            return None
        return coords_rank(self.pp_rank + 1, self.dp_rank * self.cp + self.cp_rank,
                           self.tp_rank, self.dp * self.cp, self.tp)

    @property
    def prev_rank(self) -> int | None:
        """Global rank of the previous pipeline stage, or None on the first stage."""
        if self.is_first_stage:
            return None
        return coords_rank(self.pp_rank - 1, self.dp_rank * self.cp + self.cp_rank,
                           self.tp_rank, self.dp * self.cp, self.tp)

    @classmethod
    def build(cls, world: Comm, dp: int, tp: int, pp: int, cp: int = 1) -> ProcessGrid:
        """Split ``world`` into its dp, tp, pp (and embedding) groups. Collective over world.

        Each rank passes the ``(color, key)`` of :func:`split_colors`: ranks of equal color
        form a group, ordered by key. With ``cp`` > 1, :meth:`build_cp` instead.
        """
        if cp > 1:
            return cls.build_cp(world, dp, tp, pp, cp)
        if world.size != dp * tp * pp:
            raise ConfigError(
                f"world size {world.size} != --dp {dp} × --tp {tp} × --pp {pp} = {dp * tp * pp}"
            )
        pp_rank, dp_rank, tp_rank = rank_coords(world.rank, dp, tp, pp)
        colors = split_colors(world.rank, dp, tp, pp)
        tp_comm = world.split(*colors["tp"], "tp")
        dp_comm = world.split(*colors["dp"], "dp")
        pp_comm = world.split(*colors["pp"], "pp")
        embed_comm = None
        if pp > 1:  # every rank must take part in the split, even those that opt out
            embed_comm = world.split(*colors["embed"], "embed")
        assert tp_comm is not None and dp_comm is not None and pp_comm is not None
        return cls(world, dp_comm, tp_comm, pp_comm, embed_comm, dp, tp, pp,
                   dp_rank, tp_rank, pp_rank)

    @classmethod
    def build_cp(cls, world: Comm, dp: int, tp: int, pp: int, cp: int) -> ProcessGrid:
        """The groups of a dp × tp × pp × cp grid (:func:`grid_coords`), cp and dpcp included.
        Collective over world."""
        if world.size != dp * tp * pp * cp:
            raise ConfigError(f"world size {world.size} != --dp {dp} × --tp {tp} × --pp {pp} "
                              f"× --cp {cp} = {dp * tp * pp * cp}")
        pp_rank, dp_rank, cp_rank, tp_rank = grid_coords(world.rank, dp, tp, pp, cp)
        colors = split_colors(world.rank, dp, tp, pp, cp)
        comms = {name: world.split(*colors[name], name)
                 for name in ("tp", "dp", "pp", "cp", "dpcp")}
        embed_comm = world.split(*colors["embed"], "embed") if pp > 1 else None
        return cls(world, comms["dp"], comms["tp"], comms["pp"], embed_comm, dp, tp, pp,
                   dp_rank, tp_rank, pp_rank, cp, cp_rank, comms["cp"], comms["dpcp"])

    @classmethod
    def single(cls, tracer: Tracer | None = None) -> ProcessGrid:
        """A 1 × 1 × 1 grid of this process alone (every group is ``Comm.self_group``).

        Needs no collective call, so it also works inside a larger job, e.g. to compute a
        serial reference on one rank.
        """
        if tracer is None:
            tracer = Tracer(world_size_and_rank()[1])
        world, dp_comm, tp_comm, pp_comm = (
            Comm.self_group(name, tracer) for name in ("world", "dp", "tp", "pp")
        )
        return cls(world, dp_comm, tp_comm, pp_comm, None, 1, 1, 1, 0, 0, 0)

    def describe(self) -> str:
        """One line, e.g. ``rank 5: pp 1/2, dp 0/2, tp 1/2``."""
        cp = f", cp {self.cp_rank}/{self.cp}" if self.cp > 1 else ""
        return (
            f"rank {self.world.members[self.world.rank]}: pp {self.pp_rank}/{self.pp}, "
            f"dp {self.dp_rank}/{self.dp}{cp}, tp {self.tp_rank}/{self.tp}"
        )


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys (``{"model": {"d_model": 64}}`` → ``model.d_model``),
    so that a difference is reported as the one setting that differs."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``config`` (sorted keys; non-JSON → str)."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def config_differences(configs: list[dict[str, Any]]) -> str | None:
    """``None`` when every rank's config is the same, else a message naming only the keys
    that differ and, for each group of ranks that agree, their values::

        ranks were started with different configurations (2 variants):
          ranks [0, 2, 3]: lr=0.1
          ranks [1]: lr=0.3

    Values are compared as they are hashed (canonical JSON), so equal means equal bytes.
    """
    flat = [flatten_config(c) for c in configs]
    groups: dict[str, list[int]] = {}
    for rank, c in enumerate(flat):
        groups.setdefault(config_digest(c), []).append(rank)
    if len(groups) == 1:
        return None
    keys = sorted(set().union(*flat))
    differ = [k for k in keys if len({_canonical(c.get(k, "<missing>")) for c in flat}) > 1]
    lines = [f"ranks were started with different configurations ({len(groups)} variants):"]
    for ranks in groups.values():
        c = flat[ranks[0]]
        values = ", ".join(f"{k}={c.get(k, '<missing>')!r}" for k in differ)
        lines.append(f"  ranks {ranks}: {values}")
    return "\n".join(lines)


def check_same_config(world: Comm, config: dict[str, Any]) -> None:
    """Fail on every rank, with one message, unless all ranks were given the same config.

    Ranks started with different arguments (a typo in an MPMD launch, a stale file) would
    otherwise build different models and hang or diverge silently. The configs are
    all-gathered (a small control message) and compared by :func:`config_differences`;
    every rank sees the same list and raises the same :class:`ConfigError`, so all exit
    with code 2.
    """
    message = config_differences(world.allgather_object(config))
    if message is not None:
        raise ConfigError(message)
