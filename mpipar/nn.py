"""Modules: containers of named parameters, and the layers a GPT is built from.

A ``Module`` finds its parameters by looking at its attributes, so ``model.named_parameters()``
yields names such as ``blocks.0.attn.qkv.weight`` without any registration code. Those names
matter beyond printing: a parameter's initial value is drawn from a random stream keyed by
``(seed, name)``, so the same parameter gets the same numbers in every parallel layout (a
pipeline stage that builds only some blocks, a tensor-parallel rank that keeps only a slice).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpipar import ops
from mpipar.autograd import Tensor
from mpipar.backend import get_xp, to_numpy


@dataclass(frozen=True)
class Init:
    """How a parameter starts: ``normal`` (mean 0, ``std``), ``zeros`` or ``ones``."""

    kind: str
    std: float = 0.0


class Parameter(Tensor):
    """A leaf tensor the optimizer updates.

    ``full_shape`` is the shape of the whole parameter in the 1-process model and
    ``shard_index`` the numpy index that selects this rank's part of it (``None``: all of it).
    Tensor parallelism sets them; ``replicated_in_tp`` says whether tensor-parallel peers hold
    the same values (LayerNorm gains, row-parallel biases), which matters for the gradient norm.
    ``local_index`` is where in ``data`` those values go (``...``: all of it); it differs only
    for a padded shard (a vocabulary that tp does not divide), whose padding rows stay zero.
    ``tied`` says this module uses the parameter twice (the embedding doubling as the head);
    ``tied_embedding`` marks the token-embedding matrix on every pipeline stage that holds a
    copy of it (the first embeds with it, the last scores with it), so the stages can sum its
    two gradient terms. ``before_sequence_split`` marks a replicated parameter used before
    sequence parallelism splits the sequence (the position table): its gradient is complete
    on every tensor-parallel rank, unlike that of the LayerNorms inside the blocks, which see
    one piece of the sequence each. The model sets these flags where it builds the layers;
    the parallel code asks the flag, never the name. ``data_replica`` is which data-parallel
    copy of the parameter this rank holds when that is not its dp rank: an expert's weights
    under expert parallelism are copied over the edp group only, and this is the rank's place
    in it (`mpipar.parallel.expert_parallel`); None for every other parameter.
    """

    is_parameter = True  # its gradient is a W of a split backward (`defer_weight_grads`)

    __slots__ = ("init", "full_shape", "shard_index", "local_index", "replicated_in_tp", "tied",
                 "tied_embedding", "before_sequence_split", "data_replica")

    def __init__(self, shape: tuple[int, ...], init: Init, dtype: Any = np.float32,
                 full_shape: tuple[int, ...] | None = None, shard_index: Any = None) -> None:
        super().__init__(get_xp().zeros(shape, dtype=dtype), requires_grad=True)
        self.init = init
        self.full_shape = tuple(full_shape) if full_shape is not None else tuple(shape)
        self.shard_index = shard_index
        self.local_index: Any = ...
        self.replicated_in_tp = shard_index is None
        self.tied = False
        self.tied_embedding = False
        self.before_sequence_split = False
        self.data_replica: int | None = None


def master_copy(p: Parameter, dtype: Any) -> Parameter:
    """A zeroed parameter like ``p`` in ``dtype``: the same name, init, place in the full
    parameter and flags, so it can stand for ``p`` wherever a parameter is named, sharded or
    counted. Mixed precision keeps the fp32 master weights of 16-bit parameters in these."""
    m = Parameter(p.shape, p.init, dtype, full_shape=p.full_shape, shard_index=p.shard_index)
    m.name = p.name
    for flag in ("local_index", "replicated_in_tp", "tied", "tied_embedding",
                 "before_sequence_split", "data_replica"):
        setattr(m, flag, getattr(p, flag))
    return m


def unique_parameters(params: Iterable[Parameter]) -> list[Parameter]:
    """The parameters in order, each object once (a tied weight may be listed twice)."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def initial_value(seed: int, name: str, init: Init, shape: tuple[int, ...]) -> np.ndarray:
    """The full initial value (float64, on the host) of the parameter called ``name``.

    The stream is ``default_rng([seed, crc32(name)])``: it depends on nothing but the seed and
    the name, so any subset of the model, built in any process, starts identically.
    """
    if init.kind == "zeros":
        return np.zeros(shape)
    if init.kind == "ones":
        return np.ones(shape)
    if init.kind == "normal":
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        return rng.standard_normal(shape) * init.std
    raise ValueError(f"unknown initialisation {init.kind!r} for parameter {name!r}")


def initialize_parameter(p: Parameter, seed: int, name: str) -> None:
    """Set ``p`` to its part of the seed-determined value of the parameter called ``name``,
    rounded once from float64 to ``p``'s dtype."""
    full = initial_value(seed, name, p.init, p.full_shape)
    part = full if p.shard_index is None else full[p.shard_index]
    p.data[p.local_index] = get_xp().asarray(part.astype(p.data.dtype))


class Module:
    """Base class: parameters and sub-modules are found among the attributes."""

    training: bool = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def name_parameters(self) -> None:
        """Store each parameter's full dotted name on it (``p.name``)."""
        for name, p in self.named_parameters():
            p.name = name

    def initialize(self, seed: int) -> None:
        """Set every parameter to its seed-determined value (its shard of it, if sharded)."""
        for name, p in self.named_parameters():
            initialize_parameter(p, seed, name)

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the parameters, by name."""
        return {name: to_numpy(p.data).copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy ``state`` into the parameters; names and shapes must match exactly."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
        for name, p in own.items():
            value = state[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model "
                                 f"shape {tuple(p.shape)}")
            p.data[...] = get_xp().asarray(value.astype(p.data.dtype, copy=False))


class ModuleList(Module):
    """Modules named by index, starting at ``start`` (a pipeline stage keeps global indices)."""

    def __init__(self, modules: list[Module], start: int = 0) -> None:
        self._items = list(modules)
        self.start = start

    def __iter__(self) -> Iterator[Module]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Module:
        return self._items[i]

    def children(self) -> Iterator[tuple[str, Module]]:
        for i, m in enumerate(self._items):
            yield str(self.start + i), m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, m in self.children():
            yield from m.named_parameters(f"{prefix}{name}.")


class Linear(Module):
    """y = x Wᵀ + b, W of shape (out, in), initialised N(0, std²); b starts at 0."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, std: float = 0.02,
                 dtype: Any = np.float32) -> None:
        self.weight = Parameter((d_out, d_in), Init("normal", std), dtype)
        self.bias = Parameter((d_out,), Init("zeros"), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class Embedding(Module):
    """y = W[idx]: row ``idx`` of a (vocab, d) table initialised N(0, std²)."""

    def __init__(self, n: int, d: int, std: float = 0.02, dtype: Any = np.float32) -> None:
        self.weight = Parameter((n, d), Init("normal", std), dtype)

    def forward(self, idx: Any) -> Tensor:
        return ops.embedding(self.weight, idx)


class LayerNorm(Module):
    """y = γ ⊙ (x − μ)/√(σ² + ε) + β over the last axis; γ starts at 1, β at 0."""

    def __init__(self, d: int, eps: float = 1e-5, dtype: Any = np.float32) -> None:
        self.weight = Parameter((d,), Init("ones"), dtype)
        self.bias = Parameter((d,), Init("zeros"), dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class DropoutKey:
    """Where a forward pass sits in training, so dropout masks are the same in every layout.

    A mask is drawn for the *whole* global batch of step ``step`` from the stream
    ``default_rng([seed, step, site])`` (one site per dropout layer), then sliced: ``rows`` is
    the slice of the global batch this forward pass computes (its data-parallel shard and
    microbatch). Tensor and sequence parallelism slice the other axes the same way, so a rank
    applies exactly the mask the 1-process model applies to the same elements.
    """

    seed: int
    step: int
    global_batch: int
    rows: slice


class Dropout(Module):
    """Zero each element with probability ``p`` and scale the rest by 1/(1 − p) (training only).

    ``site`` numbers this layer among the model's dropout layers (its random stream).
    """

    def __init__(self, p: float, site: int) -> None:
        self.p = p
        self.site = site

    def active(self, key: DropoutKey | None) -> bool:
        return self.training and self.p > 0.0 and key is not None

    def mask_from_full(self, key: DropoutKey, full_shape: tuple[int, ...],
                       other_index: tuple = ()) -> Any:
        """The scaled mask this rank applies: the global mask at ``(key.rows, *other_index)``.

        ``full_shape`` is the activation's shape for the whole global batch in the 1-process
        model; ``other_index`` selects this rank's part of the non-batch axes (a tensor- or
        sequence-parallel slice), empty when it holds them all.
        """
        rng = np.random.default_rng([key.seed, key.step, self.site])
        keep = rng.random(full_shape) >= self.p
        part = keep[(key.rows, *other_index)]
        return get_xp().asarray(part.astype(np.float64) * (1.0 / (1.0 - self.p)))

    def forward(self, x: Tensor, key: DropoutKey | None = None) -> Tensor:
        if not self.active(key):
            return x
        mask = self.mask_from_full(key, (key.global_batch, *x.shape[1:]))
        return ops.dropout(x, mask.astype(x.dtype, copy=False))
