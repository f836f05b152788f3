"""Reverse-mode automatic differentiation: ``Tensor``, ``Function`` and ``backward``.

A ``Tensor`` wraps an array (``.data``) and, after ``backward``, its gradient (``.grad``).
Every differentiable operation is a ``Function`` with two static methods::

    forward(ctx, *arrays, **options)  -> array       y = f(x1, x2, ...)
    backward(ctx, grad)               -> tuple       (dL/dx1, dL/dx2, ...) given dL/dy

``Function.apply`` runs ``forward`` on the raw arrays and, when gradients are wanted, links the
output tensor to its inputs. ``Tensor.backward`` walks that graph in reverse topological order
and applies the chain rule, dL/dx = sum over uses of x of (dL/dy · dy/dx): a tensor used twice
receives the sum of both contributions (gradient accumulation), exactly as micrograd's ``+=``.

Leaves created with ``requires_grad=True`` (parameters) keep their gradient in ``.grad`` and
add to it on later backward passes (so gradients of several microbatches accumulate until the
optimizer zeroes them). Hooks registered with ``register_grad_hook`` run the moment a leaf's
gradient for the current backward pass is final; data parallelism uses them to start
communicating a bucket of gradients while the rest of the backward pass is still running.

Inside ``defer_weight_grads(store)`` a backward pass computes only the gradients that flow to
activations (zero-bubble pipelines' "B"): for every edge from an op to a parameter it keeps
the op, its context and dL/d(output) in ``store`` (a `WeightGradients`), and
``store.run()`` later computes and accumulates the parameter gradients ("W"). For a Linear
y = x Wᵀ + b that is dx = dy W now, dW = dyᵀ x and db = Σ dy later.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mpipar.backend import array_module, get_xp


class _GradMode:
    enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Within this block operations record no graph (evaluation, sampling, optimizer steps)."""
    previous = _GradMode.enabled
    _GradMode.enabled = False
    try:
        yield
    finally:
        _GradMode.enabled = previous


@contextlib.contextmanager
def enable_grad() -> Iterator[None]:
    """Within this block operations record a graph again, even inside ``no_grad``."""
    previous = _GradMode.enabled
    _GradMode.enabled = True
    try:
        yield
    finally:
        _GradMode.enabled = previous


def is_grad_enabled() -> bool:
    return _GradMode.enabled


class _Deferral:
    """The `WeightGradients` that backward passes hand their parameter edges to, or None."""

    current: WeightGradients | None = None


@contextlib.contextmanager
def defer_weight_grads(store: WeightGradients) -> Iterator[None]:
    """Backward passes within this block leave every parameter gradient to ``store.run()``."""
    previous, _Deferral.current = _Deferral.current, store
    try:
        yield
    finally:
        _Deferral.current = previous


class _OpTimer:
    """The profiler that times every Function (`mpipar.profile.Profiler`), or None.

    Off, each forward and backward pays one attribute check; on, the timer runs the op:
    ``timer.forward(fn, ctx, args, kwargs)`` and ``timer.backward(fn, ctx, grad)``.
    """

    current: Any = None


def set_op_timer(timer: Any) -> Any:
    """Install ``timer`` (None: none) around every op's forward and backward; return the
    one it replaces."""
    previous, _OpTimer.current = _OpTimer.current, timer
    return previous


class Context:
    """What ``forward`` leaves for ``backward``: saved arrays and any other attributes."""

    __slots__ = ("saved", "needs_input_grad", "__dict__")

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.saved: tuple = ()
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *arrays: Any) -> None:
        self.saved = arrays


class Tensor:
    """An array with an optional gradient and a link to the Function that produced it.

    ``is_parameter`` (a class attribute) is True for `mpipar.nn.Parameter`: the leaves whose
    gradients `defer_weight_grads` leaves for later.
    """

    is_parameter = False

    __slots__ = ("data", "grad", "requires_grad", "name", "_fn", "_ctx", "_parents", "_hooks",
                 "__weakref__")

    def __init__(self, data: Any, requires_grad: bool = False, name: str = "") -> None:
        if isinstance(data, Tensor):
            data = data.data
        if not hasattr(data, "shape"):
            data = get_xp().asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.name = name
        self._fn: type[Function] | None = None
        self._ctx: Context | None = None
        self._parents: tuple[Tensor | None, ...] = ()
        self._hooks: list[Callable[[Tensor], None]] = []

    # -- basic properties -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._fn is None

    @property
    def fn(self) -> type[Function] | None:
        """The Function that produced this tensor (None for a leaf)."""
        return self._fn

    @property
    def parents(self) -> tuple[Tensor, ...]:
        """The tensors this one was computed from (empty for a leaf, and once backward has
        freed the graph behind it)."""
        return self._parents

    def item(self) -> float:
        return float(self.data)

    def numpy(self):
        from mpipar.backend import to_numpy

        return to_numpy(self.data)

    def detach(self) -> Tensor:
        """The same array, cut from the graph."""
        return Tensor(self.data)

    def register_grad_hook(self, hook: Callable[[Tensor], None]) -> None:
        """Call ``hook(tensor)`` each time this leaf's gradient of a backward pass is final."""
        self._hooks.append(hook)

    def __repr__(self) -> str:
        label = f", name={self.name!r}" if self.name else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{label})"

    # -- operators (each is a Function in mpipar.ops) --------------------------------------
    def __add__(self, other):
        return ops.add(self, other)

    def __radd__(self, other):
        return ops.add(other, self)

    def __sub__(self, other):
        return ops.sub(self, other)

    def __rsub__(self, other):
        return ops.sub(other, self)

    def __mul__(self, other):
        return ops.mul(self, other)

    def __rmul__(self, other):
        return ops.mul(other, self)

    def __truediv__(self, other):
        return ops.div(self, other)

    def __rtruediv__(self, other):
        return ops.div(other, self)

    def __neg__(self):
        return ops.neg(self)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __getitem__(self, index):
        return ops.getitem(self, index)

    def sum(self, axis=None, keepdims: bool = False):
        return ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return ops.mean(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return ops.reshape(self, shape)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], tuple | list):
            axes = tuple(axes[0])
        return ops.transpose(self, axes or None)

    @property
    def T(self):
        return ops.transpose(self, None)

    def exp(self):
        return ops.exp(self)

    def log(self):
        return ops.log(self)

    def tanh(self):
        return ops.tanh(self)

    # -- backward ---------------------------------------------------------------------------
    def backward(self, grad: Any = None) -> None:
        """Accumulate dL/dx into ``.grad`` of every leaf that requires a gradient.

        ``grad`` is dL/d(self); it defaults to 1 for a scalar (a loss). Pipeline stages pass
        the gradient received from the next stage here.
        """
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a scalar; this tensor has shape "
                    f"{self.shape}"
                )
            grad = array_module(self.data).ones_like(self.data)
        elif isinstance(grad, Tensor):
            grad = grad.data
        if tuple(grad.shape) != tuple(self.data.shape):
            raise RuntimeError(f"backward() got a gradient of shape {tuple(grad.shape)} for a "
                               f"tensor of shape {self.shape}")
        run_backward(self, grad)


class Function:
    """A differentiable operation: subclasses define ``forward`` and ``backward``.

    Arguments of ``apply`` that are Tensors are differentiable inputs (their arrays are passed
    to ``forward``); every other argument is passed through unchanged as an option.
    ``backward`` returns one gradient per Tensor input, in order (``None`` where
    ``ctx.needs_input_grad`` is False or the input is not differentiable).

    ``defers_weight_grads``: whether `defer_weight_grads` may postpone this op's gradient for
    its parameter inputs (calling ``backward`` a second time with ``needs_input_grad`` true for
    them alone). False for an op that stores its parameters' gradients itself (`Checkpoint`).
    """

    defers_weight_grads = True

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple:
        raise NotImplementedError

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Tensor:
        tensors = tuple(a for a in args if isinstance(a, Tensor))
        raw = [a.data if isinstance(a, Tensor) else a for a in args]
        needs = tuple(t.requires_grad for t in tensors)
        track = _GradMode.enabled and any(needs)
        ctx = Context(needs)
        timer = _OpTimer.current
        out = Tensor(cls.forward(ctx, *raw, **kwargs) if timer is None
                     else timer.forward(cls, ctx, raw, kwargs))
        if track:
            out.requires_grad = True
            out._fn = cls
            out._ctx = ctx
            out._parents = tensors
        return out


def topological_order(root: Tensor) -> list[Tensor]:
    """Tensors reachable from ``root`` that need a gradient, inputs before outputs."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:  # iterative post-order DFS: deep graphs must not hit the recursion limit
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        # Parents are pushed last-first so that the first input (the activation coming from
        # upstream) is explored first: a layer's weights then sit right before the layer in
        # the order, so in reverse their gradients are final (and hooks fire) as soon as the
        # layer's backward has run, not at the very end of the pass.
        for parent in reversed(node._parents):
            if parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


# ---- activation recomputation ------------------------------------------------------------------


class Checkpoint(Function):
    """Keep a function's input instead of its graph, and run it again during backward.

    forward:  y = f(x), computed under `no_grad`, so that nothing f computes is kept: the
              context holds x alone (Chen et al. 2016, "Training deep nets with sublinear
              memory cost").
    backward: y = f(x) again, this time recording its graph from a fresh leaf x, and
              dL/dy backpropagated through it. The parameters f uses are leaves of that
              inner graph: their gradients accumulate into ``.grad`` and their hooks fire
              there, exactly as in a pass without recomputation. dL/dx goes on outward.

    The tensor inputs after x are f's parameters. They are inputs only so that the output
    needs a gradient whenever one of them does (and a reader of the graph sees them);
    ``backward`` returns None for them, since their gradients have already been stored. So a
    parameter used inside f must not also be used outside it in the same graph. Under
    `defer_weight_grads` the inner pass defers their gradients like any other, so this op's
    own parameter edges are never deferred (``defers_weight_grads`` False).

    The second run computes the same numbers as the first, bit for bit: the same operations
    on the same input array, and f must draw any randomness from a key it is given (dropout
    masks from (seed, step, site)), never from a stream that advances.
    """

    defers_weight_grads = False

    @staticmethod
    def forward(ctx, x, *params, fn):
        with no_grad():
            y = fn(Tensor(x))
        ctx.save_for_backward(x)
        ctx.fn = fn
        return y.data

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        leaf = Tensor(x, requires_grad=ctx.needs_input_grad[0])
        with enable_grad():
            y = ctx.fn(leaf)
        run_backward(y, g)
        return (leaf.grad, *(None for _ in ctx.needs_input_grad[1:]))


def checkpoint(fn: Callable[[Tensor], Tensor], x: Tensor, params: Iterable[Tensor]) -> Tensor:
    """``fn(x)``, keeping only x for backward and recomputing the rest then (`Checkpoint`).

    ``params`` are the parameters ``fn`` uses. Outside a graph (``no_grad``) this is plain
    ``fn(x)``.
    """
    if not _GradMode.enabled:
        return fn(x)
    return Checkpoint.apply(x, *params, fn=fn)


# ---- what backward keeps ----------------------------------------------------------------------


def memory_root(a: Any) -> Any:
    """The array that owns the memory ``a`` lives in: its ``base`` for a view, else ``a``.

    Two arrays share memory exactly when their roots are the same object, so memory is
    counted, or told apart, by ``id(memory_root(a))``.
    """
    base = getattr(a, "base", None)
    return base if base is not None else a


def saved_arrays(root: Tensor) -> list[Any]:
    """Every array the graph behind ``root`` keeps for backward, each block of memory once.

    That is what each node's ``Context`` holds: the ``save_for_backward`` arrays and any
    array attribute (an index, a mask). Each is returned as its `memory_root`, so a view
    and its base count once, with the base's size. Leaves (parameters, inputs) are not
    included unless a Function saved them.
    """
    blocks: dict[int, Any] = {}
    visited: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        ctx = node._ctx
        if ctx is not None:
            for a in (*ctx.saved, *vars(ctx).values()):
                if hasattr(a, "nbytes"):
                    owner = memory_root(a)
                    blocks.setdefault(id(owner), owner)
        stack.extend(node._parents)
    return list(blocks.values())


def graph_nbytes(root: Tensor, exclude: Iterable[Any] = ()) -> int:
    """Bytes the graph behind ``root`` keeps alive for backward (`saved_arrays`), leaving
    out memory shared with any ``exclude`` array (e.g. the parameters, which exist anyway)."""
    skip = {id(memory_root(a)) for a in exclude}
    return sum(int(a.nbytes) for a in saved_arrays(root) if id(a) not in skip)


# ---- the backward pass --------------------------------------------------------------------


def _memory_id(a: Any) -> int:
    return id(memory_root(a))


def run_backward(root: Tensor, grad: Any) -> None:
    """Apply the chain rule from ``root`` (with dL/droot = ``grad``) back to the leaves.

    Intermediate gradients live in a dict only until their node has been processed, so memory
    holds at most the gradients of the current "frontier". An array that a Function returned
    may alias another returned array (``add`` hands the same gradient to both inputs), so an
    array is copied before it would be modified in place if its memory was handed out before.
    """
    if not root.requires_grad:
        raise RuntimeError("backward() on a tensor that does not require a gradient")
    grads: dict[int, list] = {id(root): [grad, False]}  # id -> [array, owned by us?]
    # Memory already stored as some leaf's .grad in this pass (and the caller's own array).
    leaf_memory: set[int] = {_memory_id(grad)}
    timer = _OpTimer.current
    deferral = _Deferral.current

    def accumulate(tensor: Tensor, g: Any) -> None:
        slot = grads.get(id(tensor))
        if slot is None:
            grads[id(tensor)] = [g, False]
        elif slot[1]:
            slot[0] += g
        else:  # first accumulation: make an array of our own, then add in place from now on
            slot[0] = slot[0] + g
            slot[1] = True

    for node in reversed(topological_order(root)):
        slot = grads.pop(id(node), None)
        if slot is None:
            continue
        g = slot[0]
        if node._fn is not None and node._ctx is None:
            raise RuntimeError("backward through a graph that was already freed by an earlier "
                               "backward() (each forward pass supports one backward pass)")
        if node._fn is None:  # a leaf: store and announce its gradient
            if node.grad is None:
                if not (slot[1] or _shares_nothing(g, leaf_memory, grads)):
                    g = g.copy()
                node.grad = g
                leaf_memory.add(_memory_id(g))
            else:
                node.grad += g
            for hook in node._hooks:
                hook(node)
            continue
        ctx = node._ctx
        later = deferral.keep(node, g, leaf_memory) if deferral is not None else ()
        if later and not any(ctx.needs_input_grad):  # only parameter edges: all of it later
            node._ctx, node._parents = None, ()
            continue
        input_grads = (node._fn.backward(ctx, g) if timer is None
                       else timer.backward(node._fn, ctx, g))
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        for i, (parent, pg) in enumerate(zip(node._parents, input_grads, strict=True)):
            if later and later[i]:
                continue
            if pg is not None and parent.requires_grad:
                if pg.shape != parent.data.shape:
                    raise RuntimeError(
                        f"{node._fn.__name__}.backward returned a gradient of shape {pg.shape} "
                        f"for an input of shape {parent.data.shape}"
                    )
                accumulate(parent, pg)
        # The graph below this node is no longer needed for this pass; free saved arrays
        # early so that activations do not outlive their use.
        node._ctx = None
        node._parents = ()


# ---- the weight-gradient half of a split backward ------------------------------------------


class WeightGradients:
    """Parameter gradients a backward pass under `defer_weight_grads` left for later.

    For each op with parameter inputs, ``keep`` notes (op, ctx, dL/dy, inputs, which are
    parameters) and lets the pass compute only the other inputs' gradients: it sets
    ``ctx.needs_input_grad`` false for the parameters, so ops that honour it (Linear, LayerNorm,
    matmul, ...) skip that work. ``run`` calls each op's ``backward`` again with only the
    parameters needing a gradient, sums a parameter's contributions in the order the pass
    met them, and adds the sum to ``.grad`` and runs its hooks, as `run_backward` would have.
    Kept until ``run``: each such op's context (for a Linear its input x and W) and dL/dy.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[type[Function], Context, Any, tuple, tuple[bool, ...]]] = []

    def __len__(self) -> int:
        return len(self.pending)

    def keep(self, node: Tensor, g: Any, taken: set[int]) -> tuple[bool, ...]:
        """Note ``node``'s parameter edges for ``run``; return which inputs they are (empty
        when none). ``taken``: memory ids a leaf must not adopt as its ``.grad`` (``g`` joins).
        """
        fn, ctx = node._fn, node._ctx
        assert fn is not None and ctx is not None
        later = tuple(fn.defers_weight_grads and t.is_parameter and need
                      for t, need in zip(node._parents, ctx.needs_input_grad, strict=True))
        if not any(later):
            return ()
        self.pending.append((fn, ctx, g, node._parents, later))
        taken.add(_memory_id(g))
        ctx.needs_input_grad = tuple(need and not w
                                     for need, w in zip(ctx.needs_input_grad, later, strict=True))
        return later

    def run(self) -> None:
        """dL/dθ for every kept parameter edge, accumulated into ``θ.grad`` (then hooks)."""
        timer = _OpTimer.current
        sums: dict[int, list] = {}  # id(param) -> [param, gradient, owned by us?]
        for fn, ctx, g, params, later in self.pending:
            ctx.needs_input_grad = later
            grads = fn.backward(ctx, g) if timer is None else timer.backward(fn, ctx, g)
            grads = grads if isinstance(grads, tuple) else (grads,)
            for param, pg, deferred in zip(params, grads, later, strict=True):
                if not deferred or pg is None:
                    continue
                if pg.shape != param.data.shape:
                    raise RuntimeError(f"{fn.__name__}.backward returned a gradient of shape "
                                       f"{pg.shape} for a parameter of shape {param.shape}")
                slot = sums.setdefault(id(param), [param, None, False])
                if slot[1] is None:
                    slot[1] = pg
                elif slot[2]:
                    slot[1] += pg
                else:
                    slot[1], slot[2] = slot[1] + pg, True
        self.pending.clear()
        for param, g, owned in sums.values():
            if param.grad is None:
                param.grad = g if owned else g.copy()
            else:
                param.grad += g
            for hook in param._hooks:
                hook(param)

    def saved_arrays(self) -> list[Any]:
        """Every array kept for ``run``: the kept contexts' arrays and output gradients, each
        block of memory once (as its `memory_root`), like `saved_arrays` of a graph."""
        blocks: dict[int, Any] = {}
        for _, ctx, g, _, _ in self.pending:
            for a in (*ctx.saved, *vars(ctx).values(), g):
                if hasattr(a, "nbytes"):
                    owner = memory_root(a)
                    blocks.setdefault(id(owner), owner)
        return list(blocks.values())


def _shares_nothing(g: Any, leaf_memory: set[int], grads: dict[int, list]) -> bool:
    """True when neither a pending gradient nor a stored leaf gradient shares ``g``'s memory."""
    r = _memory_id(g)
    return r not in leaf_memory and not any(_memory_id(s[0]) == r for s in grads.values())


from mpipar import ops  # noqa: E402  (ops needs Tensor and Function defined above)
