"""The full state of a run from the shards of any layout, and back: what a checkpoint holds.

A checkpoint (:mod:`mpipar.checkpoint`) holds the parameters and optimizer state as the
1-process run holds them, so a run saved in one layout resumes in any other. In a parallel
layout no rank holds that: tensor parallelism splits matrices into shards (each parameter
knows its place in the whole, ``full_shape`` and ``shard_index``), pipeline parallelism puts
the layers on different stages, and data parallelism keeps dp copies of everything.

* :func:`full_state` assembles the whole from the ranks' parts (every rank calls it, every
  rank gets the full arrays): one sum all-reduce per array, to which each element is
  contributed by exactly one rank (:func:`writes_full_state`) and zeros by all others.
* :func:`load_full_state` is the inverse and needs no communication: each rank cuts its own
  shard out of the full arrays.

Under ZeRO-3 (:mod:`mpipar.parallel.zero3`) a rank holds 1/dp of each block's parameters:
they are gathered whole for the duration of :func:`full_state` (`ShardedParameters.gathered`),
and :func:`load_full_state` hands each parameter's local value to the sharded parameters,
which keep their shard of it.

Which rank counts an element as its own (:func:`owns`) is the same question the global
gradient norm asks: a sum over ranks must see every element of the model exactly once.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from mpipar.backend import get_xp, to_numpy
from mpipar.grid import ProcessGrid
from mpipar.nn import Parameter
from mpipar.optim import state_key_param_name
from mpipar.parallel.zero3 import Zero3AdamW


def owns(p: Parameter, grid: ProcessGrid) -> bool:
    """Whether this rank counts ``p``'s elements as its own among the tp and pp ranks.

    Copies are counted once: a parameter replicated over tensor parallelism (LayerNorm gains,
    row-parallel biases, wpe) belongs to tp rank 0, and the tied embedding, held by the first
    and the last pipeline stage, to the first. Shards of a split parameter each belong to the
    rank that holds them. Data-parallel replicas are not decided here: a caller summing over
    them divides by :attr:`DataParallel.grad_replicas`, or takes dp rank 0's copy.
    """
    if p.replicated_in_tp and grid.tp_rank != 0:
        return False
    return not (p.tied_embedding and grid.pp > 1 and not grid.is_first_stage)


def writes_full_state(p: Parameter | None, grid: ProcessGrid) -> bool:
    """Whether this rank writes its part of a state array of ``p`` into the full state.

    One data-parallel replica writes (dp rank 0; replicas agree, and a ZeRO optimizer's
    ``state_dict`` has already gathered its shards) the parts it :func:`owns`; an expert's
    weights under expert parallelism, which dp ranks hold in turn, are written by the first
    of their own replicas (``p.data_replica`` 0). State that
    belongs to no parameter (``p is None``: AdamW's step count) is the same on every rank
    and written by the one rank at tp rank 0 of the first stage.
    """
    replica = grid.dp_rank if p is None or p.data_replica is None else p.data_replica
    # an expert's weights: its first edp replica writes; cp ranks hold replicas too
    if replica != 0 or getattr(grid, "cp_rank", 0) != 0:
        return False
    if p is None:
        return grid.tp_rank == 0 and grid.is_first_stage
    return owns(p, grid)


def gather_names(grid: ProcessGrid, names: list[str]) -> list[str]:
    """The sorted union of the names held on any rank (a small control message)."""
    everyone = grid.world.allgather_object(names)
    return sorted({n for names_r in everyone for n in names_r})


def assemble(grid: ProcessGrid, dtype: np.dtype, p: Parameter | None, local: Any) -> np.ndarray:
    """The full array of a state whose part on this rank is ``local`` (``None``: none here).

    ``p`` is the parameter the state belongs to (``None``: scalar state). A first 8-integer
    all-reduce (max) agrees on the full shape and on whether the value is an integer (the
    optimizer's step count); then each writer puts its shard at its ``shard_index`` in a zero
    array, and a sum all-reduce of those arrays is the whole.
    """
    writer = local is not None and writes_full_state(p, grid)
    head = np.zeros(8, dtype=np.int64)  # [ndim, is_int, dims...]
    if writer:
        full_shape = p.full_shape if p is not None else np.shape(local)
        head[0] = len(full_shape)
        head[1] = to_numpy(local).dtype.kind in "iu"
        head[2:2 + len(full_shape)] = full_shape
    grid.world.allreduce(head, op="max")
    full_shape = tuple(int(s) for s in head[2:2 + head[0]])
    buf = np.zeros(full_shape, dtype=np.int64 if head[1] else dtype)
    if writer:
        if p is None or p.shard_index is None:
            buf[...] = to_numpy(local)
        else:
            buf[p.shard_index] = to_numpy(local)[p.local_index]
    grid.world.allreduce(buf)
    return buf


def full_state(params: list[Parameter], optimizer: Any, grid: ProcessGrid,
               dtype: np.dtype) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(model_state, opt_state)`` of the whole model as the 1-process run holds them.

    ``params`` are this rank's parameters and ``optimizer`` updates them. Every rank calls
    this (it communicates); every rank gets the full arrays.
    """
    by_name = {p.name: p for p in params}
    opt_local = optimizer.state_dict()
    whole = (optimizer.sharded.gathered() if isinstance(optimizer, Zero3AdamW)
             else contextlib.nullcontext())
    with whole:
        if grid.world.size == 1:
            return {n: to_numpy(p.data).copy() for n, p in by_name.items()}, opt_local
        model = {}
        for name in gather_names(grid, sorted(by_name)):
            p = by_name.get(name)
            model[name] = assemble(grid, dtype, p, None if p is None else p.data)
    opt = {}
    for key in gather_names(grid, sorted(opt_local)):
        owner = state_key_param_name(key)
        p = by_name.get(owner) if owner is not None else None
        opt[key] = assemble(grid, dtype, p, opt_local.get(key))
    return model, opt


def load_full_state(params: list[Parameter], optimizer: Any,
                    model_state: dict[str, np.ndarray],
                    opt_state: dict[str, np.ndarray]) -> None:
    """Load a full (1-process shaped) state: each rank keeps its own shard of it.

    No communication. The optimizer state of a shard has the shard's local shape, which is
    padded for a vocabulary that tp does not divide (the padding stays zero).
    """
    by_name = {p.name: p for p in params}
    local_values = {}
    for p in params:
        full = model_state[p.name]
        part = full if p.shard_index is None else full[p.shard_index]
        local = np.zeros(p.shape, dtype=p.dtype)  # the padding of a vocabulary shard stays 0
        local[p.local_index] = part
        local_values[id(p)] = local
    if isinstance(optimizer, Zero3AdamW):
        optimizer.sharded.load(local_values)
    else:
        for p in params:
            p.data[...] = get_xp().asarray(local_values[id(p)])
    local_opt = {}
    for key, value in opt_state.items():
        owner = state_key_param_name(key)
        p = by_name.get(owner) if owner is not None else None
        if owner is not None and p is None:
            continue  # a parameter another rank holds
        if p is None or p.shard_index is None:
            local_opt[key] = value
        else:
            local = np.zeros(p.shape, dtype=value.dtype)
            local[p.local_index] = value[p.shard_index]
            local_opt[key] = local
    optimizer.load_state_dict(local_opt)
