"""Optimizers (SGD, AdamW), the learning-rate schedule, and global-norm gradient clipping.

A parameter is any object with ``.data`` (an array), ``.grad`` (an array like ``.data``, or
``None`` when it received no gradient) and ``.name`` (a unique string). The update rules are
small functions that work in place on plain arrays (:func:`sgd_update`, :func:`adamw_update`),
so the sharded optimizer of ZeRO can apply the very same arithmetic to the flat slice of
parameters, gradients and moments that a rank owns. The classes here only keep the state and
loop over parameters.

Both optimizers follow one weight-decay rule (:func:`decay_mask`): weight matrices and
embeddings decay, biases and LayerNorm gains do not.

Every optimizer answers the two questions of global-norm clipping about the gradients it
updates: ``grad_norm_sq(owned)`` (this rank's Σ g², before any reduction over ranks) and
``clip(norm, max_norm)``. Optimizer state is keyed ``"<optimizer>.<slot>.<parameter name>"``
(:func:`state_key`), or ``"<optimizer>.<name>"`` for state of no parameter (AdamW's step
count); :func:`state_key_param_name` reads the parameter back out of a key.

Arrays may be numpy or cupy; every operation uses the array module of the arrays it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from mpipar.backend import array_module, to_numpy
from mpipar.flat_layout import FlatLayout
from mpipar.nn import Parameter, unique_parameters

# --------------------------------------------------------------------------------------------
# Update rules on arrays (in place)
# --------------------------------------------------------------------------------------------


def sgd_update(
    p,
    g,
    lr: float,
    *,
    momentum: float = 0.0,
    buf=None,
    weight_decay: float = 0.0,
) -> None:
    """One SGD step on array ``p`` with gradient ``g``, in place.

    Plain:          θ ← θ − α·g
    With momentum:  b ← μ·b + g;   θ ← θ − α·b      (``buf`` holds b, updated in place)
    Weight decay is decoupled (SGDW, Loshchilov & Hutter 2019): θ ← θ − α·λ·θ first.
    Without momentum this is exactly L2 regularisation, θ ← θ − α(g + λθ); with momentum the
    decay is kept out of the velocity, as AdamW does.
    """
    lr = float(lr)
    if weight_decay:
        p *= 1.0 - lr * float(weight_decay)
    if momentum:
        if buf is None:
            raise ValueError("sgd_update with momentum needs a velocity buffer `buf`")
        buf *= float(momentum)
        buf += g
        g = buf
    p -= lr * g


def adamw_update(
    p,
    g,
    m,
    v,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay,
    step: int,
    scratch=None,
) -> None:
    """One AdamW step (Loshchilov & Hutter 2019) on array ``p``, in place.

    With t = ``step`` (the number of this update, counting from 1):

        m ← β₁·m + (1 − β₁)·g                  first moment  (``m``, in place)
        v ← β₂·v + (1 − β₂)·g²                 second moment (``v``, in place)
        θ ← θ − α·λ·θ                          decoupled weight decay
        θ ← θ − α · m̂ / (√v̂ + ε),   m̂ = m / (1 − β₁ᵗ),   v̂ = v / (1 − β₂ᵗ)

    The last line is evaluated as ``(α / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)``, which is
    the same number without forming m̂ and v̂.

    ``weight_decay`` is either a scalar λ, or an array shaped like ``p`` of per-element
    coefficients λᵢ (e.g. ``wd * mask`` over a flat ZeRO shard that mixes matrices, which
    decay, with biases and LayerNorm gains, which do not).

    Every intermediate is written into ``scratch`` (an array like ``p``; allocated here if not
    given), so a caller that passes one in allocates nothing per step.
    """
    if step < 1:
        raise ValueError(f"adamw_update step counts updates from 1, got {step}")
    xp = array_module(p)
    s = xp.empty_like(p) if scratch is None else scratch
    lr, beta1, beta2, eps = float(lr), float(beta1), float(beta2), float(eps)

    m *= beta1
    xp.multiply(g, 1.0 - beta1, out=s)
    m += s  # m = β₁m + (1 − β₁)g
    v *= beta2
    xp.multiply(g, g, out=s)
    s *= 1.0 - beta2
    v += s  # v = β₂v + (1 − β₂)g²

    _decay_weights(p, weight_decay, lr, s)

    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    xp.sqrt(v, out=s)
    s *= 1.0 / math.sqrt(bias2)
    s += eps  # s = √v̂ + ε
    xp.divide(m, s, out=s)
    s *= lr / bias1  # s = α·m̂/(√v̂ + ε)
    p -= s


def _decay_weights(p, weight_decay, lr: float, scratch) -> None:
    """θ ← θ − α·λ·θ in place, for a scalar λ or an array of per-element λᵢ like ``p``."""
    if np.ndim(weight_decay) == 0:
        if float(weight_decay):
            p *= 1.0 - lr * float(weight_decay)
        return
    if weight_decay.dtype == bool:
        raise ValueError(
            "adamw_update weight_decay array must hold coefficients (wd * mask), "
            "not a boolean mask"
        )
    if weight_decay.shape != p.shape:
        raise ValueError(
            f"weight_decay array has shape {weight_decay.shape}, parameter has {p.shape}"
        )
    array_module(p).multiply(p, weight_decay, out=scratch)
    scratch *= lr
    p -= scratch  # θ = θ − αλᵢθ


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def state_key(optimizer: str, slot: str, param_name: str) -> str:
    """The key of one parameter's state array, e.g. ``state_key("adamw", "m", "wte.weight")``."""
    return f"{optimizer}.{slot}.{param_name}"


def state_key_param_name(key: str) -> str | None:
    """The name of the parameter a state key belongs to; ``None`` for scalar state.

    ``"adamw.m.h.0.attn.c_attn.weight"`` → ``"h.0.attn.c_attn.weight"`` (parameter names
    contain dots themselves, so only the first two dots separate fields);
    ``"adamw.step"`` → ``None``.
    """
    fields = key.split(".", 2)
    return fields[2] if len(fields) == 3 else None


def decay_mask(param) -> bool:
    """Whether weight decay applies to ``param``: matrices and embeddings (ndim ≥ 2) yes,
    vectors (biases, LayerNorm gains and biases) no. SGD and AdamW both follow it.

    This is the GPT-2 / nanoGPT convention. Decaying the weight matrices limits how sharply the
    network can respond to its inputs, which regularises; biases and LayerNorm gains are few,
    set offsets and scales rather than interactions, and pulling a gain towards 0 would only
    fight LayerNorm's purpose.
    """
    return param.data.ndim >= 2


def _unique_params(params: Iterable) -> list:
    """The parameters in order, each object once, with unique names (state is keyed by name)."""
    out = unique_parameters(params)
    names: set[str] = set()
    for p in out:
        if p.name in names:
            raise ValueError(
                f"two different parameters are named {p.name!r}; optimizer state needs unique names"
            )
        names.add(p.name)
    if not out:
        raise ValueError("optimizer got an empty parameter list")
    return out


def _load_into(state: Mapping[str, object], d: Mapping[str, np.ndarray], what: str) -> None:
    """Check ``d`` has exactly the keys and shapes of ``state`` (arrays), then copy it in.

    ``state`` maps a flat name to the live array it restores (numpy or cupy); the copy keeps
    the live array's dtype and device.
    """
    missing = [k for k in state if k not in d]
    unexpected = [k for k in d if k not in state]
    wrong = [
        f"{k} (expected {tuple(state[k].shape)}, got {tuple(np.shape(d[k]))})"
        for k in state
        if k in d and tuple(np.shape(d[k])) != tuple(state[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise ValueError(f"{what} state does not match: " + "; ".join(problems))
    for k, live in state.items():
        xp = array_module(live)
        live[...] = xp.asarray(to_numpy(d[k]))


class Optimizer:
    """What every optimizer over whole (unsharded) gradients shares with the training loop.

    ``params`` are the parameters it updates (unique, named); gradients live in ``p.grad``.
    The trainer asks for this rank's share of the squared gradient norm and for clipping
    through these two methods, so a sharded optimizer (ZeRO) can answer them its own way.
    """

    params: list[Parameter]

    def zero_grad(self) -> None:
        """Drop all gradients (the next backward starts them afresh)."""
        for p in self.params:
            p.grad = None

    def grad_norm_sq(self, owned: Callable[[Parameter], bool]) -> float:
        """Σ g² (float64) over the gradients of this rank's parameters with ``owned(p)``."""
        return grad_norm_sq(p for p in self.params if owned(p))

    def clip(self, norm: float, max_norm: float) -> None:
        """Scale every gradient by max_norm / (norm + 10⁻⁶) when ``norm`` (global) > max_norm."""
        scale_to_max_norm(self.params, norm, max_norm)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and decoupled weight decay.

    See :func:`sgd_update` for the rule. Weight decay, when set, applies to the parameters of
    :func:`decay_mask` (matrices and embeddings), as in :class:`AdamW`.
    State (only with momentum): one velocity per parameter, ``"sgd.momentum.<name>"``.
    """

    def __init__(
        self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ):
        self.params = _unique_params(params)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.bufs = (
            {p.name: array_module(p.data).zeros_like(p.data) for p in self.params}
            if self.momentum
            else {}
        )

    def step(self, lr: float | None = None) -> None:
        """Update every parameter that has a gradient; ``lr`` overrides ``self.lr`` once."""
        lr = self.lr if lr is None else float(lr)
        for p in self.params:
            if p.grad is None:
                continue
            sgd_update(
                p.data,
                p.grad,
                lr,
                momentum=self.momentum,
                buf=self.bufs.get(p.name),
                weight_decay=self.weight_decay if decay_mask(p) else 0.0,
            )

    def _live_state(self) -> dict[str, object]:
        return {state_key("sgd", "momentum", name): b for name, b in self.bufs.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the optimizer state, keyed by flat names."""
        return {k: to_numpy(a).copy() for k, a in self._live_state().items()}

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict` output; ``ValueError`` names missing/extra/misshapen
        keys."""
        _load_into(self._live_state(), d, "SGD")


class AdamW(Optimizer):
    """Adam with decoupled weight decay (see :func:`adamw_update`).

    Weight decay applies only to parameters with ``ndim ≥ 2`` (:func:`decay_mask`): weight
    matrices and embeddings decay; biases and LayerNorm gains do not (GPT-2 convention).

    State: ``"adamw.m.<name>"`` and ``"adamw.v.<name>"`` per parameter, and ``"adamw.step"``,
    the number of updates taken (one counter for all parameters; a parameter whose gradient is
    ``None`` is skipped for that step but its bias correction still uses the shared count).

    ``flat=True`` keeps parameters, gradients and both moments in one flat buffer each, every
    per-parameter array a view into it (:class:`FlatLayout`), so that a step is a dozen array
    operations over cache-sized blocks of all Ψ elements instead of a dozen per parameter.
    The arithmetic of each element is the same, so both ways give the same numbers bit for
    bit; the state keeps its per-parameter names and shapes. The parameters' ``.data``
    become views into the flat buffer, so only the optimizer that owns the parameters should
    ask for it. Gradients are copied into the flat buffer at the step (one pass over Ψ):
    letting backward accumulate into zeroed views instead measured slower, since the engine
    then adds every gradient to the buffer rather than keeping the array it computed.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        flat: bool = False,
    ):
        self.params = _unique_params(params)
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.step_count = 0
        self.flat = FlatLayout(self.params) if flat else None
        if self.flat is not None:  # (Ψ,) each, and per-parameter views of them
            self._flat_m, self._flat_v = self.flat.zeros(), self.flat.zeros()
            self.m, self.v = self.flat.views(self._flat_m), self.flat.views(self._flat_v)
        else:
            self.m = {p.name: array_module(p.data).zeros_like(p.data) for p in self.params}
            self.v = {p.name: array_module(p.data).zeros_like(p.data) for p in self.params}
        # One reusable buffer per distinct (shape, dtype) keeps steps allocation-free.
        self._scratch: dict[tuple, object] = {}

    def _scratch_for(self, a):
        key = (a.shape, str(a.dtype), array_module(a).__name__)
        if key not in self._scratch:
            self._scratch[key] = array_module(a).empty_like(a)
        return self._scratch[key]

    def step(self, lr: float | None = None) -> None:
        """Take one AdamW step on every parameter that has a gradient."""
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        if self.flat is not None and self.flat.gather_grads():
            self._flat_step(lr)
            return
        for p in self.params:
            if p.grad is None:
                continue
            adamw_update(
                p.data,
                p.grad,
                self.m[p.name],
                self.v[p.name],
                lr=lr,
                beta1=self.beta1,
                beta2=self.beta2,
                eps=self.eps,
                weight_decay=self.weight_decay if decay_mask(p) else 0.0,
                step=self.step_count,
                scratch=self._scratch_for(p.data),
            )

    def _flat_step(self, lr: float) -> None:
        """:func:`adamw_update` over the whole flat buffer, decay first on the runs of
        decaying parameters (θ ← θ·(1 − αλ), exactly the per-parameter rule's operation; the
        decay touches only θ, which the moments do not read, so doing it first changes
        nothing)."""
        flat = self.flat
        if self.weight_decay:
            for run in flat.runs(decay_mask):
                flat.params[run] *= 1.0 - lr * self.weight_decay
        scratch = self._scratch_for(flat.params)
        for block in flat.blocks():  # each block's 5 arrays stay in cache through the update
            adamw_update(flat.params[block], flat.grads[block], self._flat_m[block],
                         self._flat_v[block], lr=lr, beta1=self.beta1, beta2=self.beta2,
                         eps=self.eps, weight_decay=0.0, step=self.step_count,
                         scratch=scratch[block])

    def _live_state(self) -> dict[str, object]:
        state: dict[str, object] = {}
        for name in self.m:
            state[state_key("adamw", "m", name)] = self.m[name]
            state[state_key("adamw", "v", name)] = self.v[name]
        return state

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the moments plus ``"adamw.step"`` (a 0-d int64 array)."""
        d = {k: to_numpy(a).copy() for k, a in self._live_state().items()}
        d["adamw.step"] = np.array(self.step_count, dtype=np.int64)
        return d

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict` output; ``ValueError`` names missing/extra/misshapen
        keys."""
        live = self._live_state()
        step = np.zeros((), dtype=np.int64)  # receives "adamw.step" through the same checks
        live["adamw.step"] = step
        _load_into(live, d, "AdamW")
        self.step_count = int(step)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def lr_at(
    step: int,
    *,
    max_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> float:
    """Learning rate for (0-based) ``step``: linear warmup, then cosine decay.

        step < W:        α = α_max · (step + 1) / W
        W ≤ step < S:    α = α_min + ½(α_max − α_min)(1 + cos(π · (step − W) / (S − W)))
        step ≥ S:        α = α_min = min_lr_ratio · α_max

    with W = ``warmup_steps`` and S = ``total_steps``. Warmup counts from ``step + 1`` so the
    very first update already moves (an lr of 0 would waste a step) and step W − 1 reaches
    α_max; the cosine then starts from α_max at step W. ``warmup_steps = 0`` skips warmup.
    """
    if step < 0 or warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"bad schedule: step={step}, warmup_steps={warmup_steps}, total_steps={total_steps}, "
            f"min_lr_ratio={min_lr_ratio} (need step ≥ 0, warmup ≥ 0, total ≥ 1, 0 ≤ ratio ≤ 1)"
        )
    max_lr = float(max_lr)
    min_lr = min_lr_ratio * max_lr
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------


def grad_norm_sq(params: Iterable) -> float:
    """Σ_p Σ_i g_{p,i}² over the local gradients (parameters with ``grad is None`` add 0).

    Accumulated in float64 whatever the gradient dtype, so the sum of many small float32
    squares does not lose digits. A parallel caller sums this across the ranks that hold
    different parameters (or shards) before taking the square root.
    """
    total = 0.0
    for p in params:
        g = p.grad
        if g is None:
            continue
        xp = array_module(g)
        flat = g.astype(xp.float64, copy=False).reshape(-1)
        total = total + xp.dot(flat, flat)  # stays on the device until the single float()
    return float(total)


def clip_grad_norm(params: Iterable, max_norm: float, *, norm_sq: float | None = None) -> float:
    """Global-norm clipping (Pascanu et al. 2013): rescale all gradients together.

        ‖g‖ = √(Σ_p ‖g_p‖²);   if ‖g‖ > c:  g_p ← g_p · c / (‖g‖ + 10⁻⁶)   for every p

    One scale for all parameters keeps the update direction. ``norm_sq`` is the global sum of
    squares when the caller has already reduced :func:`grad_norm_sq` across ranks; otherwise
    the local parameters are the whole model. ``max_norm ≤ 0`` disables clipping. A non-finite
    norm leaves the gradients untouched (scaling would only spread the NaN/inf); the caller
    sees it in the return value.

    Returns:
        The norm before clipping.
    """
    params = list(params)
    if norm_sq is None:
        norm_sq = grad_norm_sq(params)
    norm = math.sqrt(norm_sq) if norm_sq >= 0 else float("nan")
    scale_to_max_norm(params, norm, max_norm)
    return norm


def scale_to_max_norm(params: Iterable, norm: float, max_norm: float) -> None:
    """The step of :func:`clip_grad_norm` once the global ``norm`` is known: if it is finite
    and above ``max_norm > 0``, g_p ← g_p · max_norm / (norm + 10⁻⁶) for every p."""
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = float(max_norm) / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad *= scale
