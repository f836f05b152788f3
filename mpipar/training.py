"""The training step: one object that owns the model, the data, the optimizer and the step.

A step in every layout (docs/design.md §5):

1. draw the global batch of the step (the same in every layout), keep this rank's
   data-parallel shard of rows and cut it into ``microbatches``;
2. forward and backward each microbatch, scaling its loss by 1/M so that gradients add up to
   the mean over the shard (a pipeline runs its schedule here instead of a plain loop);
3. finish the gradients: average over the data-parallel group (the mean over the shard
   averaged over the shards is the mean over the whole global batch);
4. clip by the global gradient norm, take the optimizer step with this step's learning rate.

Under mixed precision (``--precision fp16|bf16``, :mod:`mpipar.precision`) the model computes
in 16 bits and the optimizer updates fp32 master weights (:mod:`mpipar.master_weights`):
between steps 3 and 4 the gradients are unscaled into fp32 and, with fp16's loss scaling, the
ranks agree in one small all-reduce whether any of them overflowed; if one did, every rank
skips step 4 and the loss scale is halved.

The reported loss is the mean over the whole global batch, so it is the same number in every
layout (and, in float64, the same as the 1-process run to ~1e-10). Saving and loading the
state of a run is :mod:`mpipar.parallel.full_state`; the command line is ``train.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mpipar.autograd import no_grad
from mpipar.backend import get_xp, to_numpy
from mpipar.data import Dataset, eval_batches, get_batch, shard_rows, split_microbatches
from mpipar.grid import ProcessGrid
from mpipar.heap import keep_freed_memory
from mpipar.master_weights import MasterWeights, make_masters
from mpipar.model import GPT, GPTConfig, SerialLayers
from mpipar.nn import DropoutKey, Parameter, master_copy, unique_parameters
from mpipar.optim import SGD, AdamW, lr_at
from mpipar.parallel.full_state import full_state, load_full_state, owns
from mpipar.precision import LossScaler, overflow_anywhere, resolve_precision
from mpipar.profile import Profiler, region
from mpipar.sample import sample_tokens
from mpipar.trace import Tracer

# Periodic validation scores a fixed sample of the held-out split, this many tokens by default
# (rounded up to whole batches). On the built-in corpus the mean loss of 16,384 tokens lies
# within about ±0.05 nats of the whole split's (one standard deviation, measured over
# disjoint samples), 4× closer than 1,024 tokens; tiny, the preset of the tests, keeps a
# quick 1,024. `python -m mpipar.evaluate` scores the whole split.
EVAL_TOKENS = {"tiny": 1_024, "small": 16_384, "medium": 65_536}


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run that is not the model's shape (docs/design.md §2 flags)."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    optimizer: str = "adamw"
    momentum: float = 0.9
    beta1: float = 0.9  # AdamW's moment decays and ε
    beta2: float = 0.95
    eps: float = 1e-8
    precision: str = "fp32"  # compute precision: fp32, fp16 or bf16 (mpipar.precision)
    eval_every: int = 50
    eval_tokens: int = 1_024
    log_every: int = 10
    microbatches: int = 1
    ep: int = 1  # expert-parallel size: ranks of the dp group that share out the experts
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    bucket_mb: float = 1.0
    overlap: bool = True
    allreduce: str = "mpi"
    dp_strategy: str = "bucketed"
    sequence_parallel: bool = False
    recompute: str = "none"  # what each block keeps for backward (model.RECOMPUTE_MODES)
    teacher: str | None = None  # checkpoint directory of a teacher to distil from
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Builds this rank's part of the model and runs training steps in a given layout."""

    def __init__(self, cfg: GPTConfig, tc: TrainConfig, grid: ProcessGrid, data: Dataset,
                 tracer: Tracer) -> None:
        self.cfg, self.tc, self.grid, self.data, self.tracer = cfg, tc, grid, data, tracer
        keep_freed_memory()  # each step reuses the memory the last one freed (mpipar/heap.py)
        # With --profile the tracer is a Profiler: every part of a step is charged to a row.
        self.profiler = tracer if isinstance(tracer, Profiler) else None
        self.dtype = np.dtype(cfg.dtype)  # of the weights the optimizer updates (the masters)
        self.precision = resolve_precision(tc.precision, cfg.dtype)
        self.scaler = LossScaler() if self.precision.loss_scaling else None
        self.layers = self._make_layers()
        self.chunks: list[GPT] = self._make_chunks()
        self.params = unique_parameters(p for c in self.chunks for p in c.parameters())
        self.grad_sync = self._make_grad_sync()
        self.optimizer = self._make_optimizer()
        self.step = 0  # the next step to run
        self.pipeline = self._make_pipeline()
        self.gradient_steps = self._gradient_steps()
        self.distill = self._make_distillation()

    # -- construction (each parallelism plugs in here) --------------------------------------
    def _make_layers(self) -> SerialLayers:
        """The layers, in the compute dtype (that of the masters unless 16-bit); under
        expert parallelism with the experts' placement and token exchange; with --cp, holding
        the context-parallel group the model's embedding and attention use."""
        self.edp_comm = None
        if self.grid.tp == 1 and self.tc.ep > 1 and self.cfg.n_expert:
            from mpipar.parallel.expert_parallel import ExpertParallelDispatch, expert_groups

            ep_comm, self.edp_comm = expert_groups(self.grid.dp_comm, self.tc.ep)
            layers = SerialLayers(self.precision.compute,
                                  ExpertParallelDispatch(ep_comm, self.edp_comm))
        elif self.grid.tp == 1:
            layers = SerialLayers(self.precision.compute)
        else:
            from mpipar.parallel.tensor_parallel import TensorParallelLayers

            layers = TensorParallelLayers(self.grid.tp_comm, self.precision.compute,
                                          sequence_parallel=self.tc.sequence_parallel)
        if self.grid.cp > 1:
            from mpipar.parallel.context_parallel import ContextParallel

            layers.context = ContextParallel(self.grid.cp_comm)
        return layers

    def _make_chunks(self) -> list[GPT]:
        if self.grid.pp == 1:
            model = GPT(self.cfg, self.layers)
            model.initialize(self.tc.seed)
            chunks = [model]
        else:
            from mpipar.parallel.pipeline.stages import build_stage_chunks

            chunks = build_stage_chunks(self.cfg, self.layers, self.grid,
                                        self.tc.virtual_stages, self.tc.seed)
        for chunk in chunks:
            chunk.set_recompute(self.tc.recompute)
        return chunks

    def _make_grad_sync(self):
        """The gradient average over the ranks holding the same weights: the dp group, or
        dp × cp with context parallelism (each cp rank's gradient is that of its tokens)."""
        if self.grid.grad_size == 1:
            return None
        if self.tc.zero == 3:  # the parameters themselves are sharded: the blocks are wrapped
            from mpipar.parallel.zero3 import ShardedParameters

            replicated_sum = self.layers.sync_replicated_grads if self.grid.tp > 1 else None
            return ShardedParameters(self.chunks, self.grid.grad_comm, prefetch=self.tc.overlap,
                                     replicated_sum=replicated_sum)
        if self.edp_comm is not None:  # expert parallelism: experts averaged over edp
            from mpipar.parallel.expert_parallel import ExpertDataParallel

            return ExpertDataParallel(self.params, self.grid.dp_comm, self.edp_comm,
                                      self.tc.ep, strategy=self.tc.dp_strategy,
                                      bucket_mb=self.tc.bucket_mb, overlap=self.tc.overlap,
                                      allreduce=self.tc.allreduce)
        from mpipar.parallel.zero import make_grad_sync

        return make_grad_sync(self.params, self.grid.grad_comm, strategy=self.tc.dp_strategy,
                              bucket_mb=self.tc.bucket_mb, overlap=self.tc.overlap,
                              allreduce=self.tc.allreduce, zero=self.tc.zero)

    def _make_optimizer(self):
        """SGD or AdamW; sharded (ZeRO); over fp32 masters of 16-bit parameters."""
        tc = self.tc
        if tc.zero == 3 and self.grid.grad_size > 1:  # full precision only (train.py: no 16 bits)
            from mpipar.parallel.zero3 import Zero3AdamW

            return Zero3AdamW(self.params, self.grad_sync, lr=tc.lr,
                              weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2),
                              eps=tc.eps)
        masters = (make_masters(self.params, tc.seed, self.dtype) if self.precision.half
                   else None)
        if tc.zero and self.grid.grad_size > 1:
            from mpipar.parallel.zero import ZeroAdamW

            return ZeroAdamW(self.params, self.grad_sync, lr=tc.lr, weight_decay=tc.weight_decay,
                             betas=(tc.beta1, tc.beta2), eps=tc.eps, masters=masters)
        if masters is None:
            return self._update_rule(self.params)
        return MasterWeights(self.params, masters, self._update_rule(masters))

    def _update_rule(self, params: list[Parameter]):
        """SGD or AdamW over ``params`` (the model's, or their fp32 masters)."""
        tc = self.tc
        if tc.optimizer == "sgd":
            return SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        return AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                     weight_decay=tc.weight_decay, flat=True)

    def _make_pipeline(self):
        if self.grid.pp == 1:
            return None
        from mpipar.parallel.pipeline.executor import PipelineExecutor

        # ZeRO-3's gathered parameters live in buffers of its own: not activation memory.
        zero3 = self.grad_sync is not None and self.grad_sync.zero == 3
        buffers = self.grad_sync.parameter_buffers() if zero3 else []
        return PipelineExecutor(self.chunks, self.grid, self.tc, self.tracer,
                                parameter_memory=buffers)

    def _make_distillation(self):
        """The teacher and the mixed loss (`mpipar.distill`), with --teacher; else None."""
        tc = self.tc
        if tc.teacher is None:
            return None
        from mpipar.distill import Distillation, check_layout

        check_layout(self.grid.tp, self.grid.pp)
        return Distillation.from_checkpoint(tc.teacher, self.cfg, self.data.tokenizer,
                                            tc.distill_alpha, tc.distill_temperature)

    def _gradient_steps(self) -> list[Callable[[], None]]:
        """The gradient communication that completes backward, in the order it must run.

        * tp sum: under sequence parallelism, replicated parameters saw one piece of the
          sequence each, and their gradients are summed over tp;
        * tied sum: the embedding (first stage) and head (last stage) terms of dL/d(wte);
        * dp: the data-parallel average, or ZeRO's reduce-scatter of the averaged shards.

        All three are sums, so any order gives the same gradient, but two constraints fix it.
        Without ZeRO, data-parallel buckets launched during backward may still be in flight
        until ``finish`` waits for them, so the tp sum, which writes into those buffers, comes
        after; the tied sum may come first because a pipeline holds data-parallel
        communication back for its whole schedule. With ZeRO the reduce-scatter keeps only
        this rank's shard, so every other sum must come before it.
        """
        tp_sum = [self._sum_replicated_grads] if self.grid.tp > 1 else []
        tied_sum = [self.pipeline.sync_tied_grads] if self.pipeline is not None else []
        if self.grad_sync is None:
            return tp_sum + tied_sum
        if self.grad_sync.zero:
            return tp_sum + tied_sum + [self.grad_sync.finish]
        return tied_sum + [self.grad_sync.finish] + tp_sum

    def _sum_replicated_grads(self) -> None:
        self.layers.sync_replicated_grads(self.params)

    # -- one training step ------------------------------------------------------------------
    def dropout_keys(self, step: int) -> list[DropoutKey]:
        """The dropout key of each microbatch: which rows of the global batch it holds."""
        per_rank = self.tc.batch_size // self.grid.dp
        lo = self.grid.dp_rank * per_rank  # this rank's rows [lo, lo + per_rank)
        m = self.tc.microbatches
        per = per_rank // m
        return [DropoutKey(self.tc.seed, step, self.tc.batch_size,
                           slice(lo + k * per, lo + (k + 1) * per)) for k in range(m)]

    def microbatches(self, x: np.ndarray, y: np.ndarray) -> tuple[list, list]:
        """This rank's data-parallel shard of a batch, cut into microbatches (on the device);
        with context parallelism only this rank's chunks of each sequence."""
        xp = get_xp()
        xs = shard_rows(x, self.grid.dp_rank, self.grid.dp)
        ys = shard_rows(y, self.grid.dp_rank, self.grid.dp)
        if self.layers.context is not None:
            xs, ys = self.layers.context.shard(xs), self.layers.context.shard(ys)
        m = self.tc.microbatches
        return ([xp.asarray(a) for a in split_microbatches(xs, m)],
                [xp.asarray(a) for a in split_microbatches(ys, m)])

    def forward_backward(self, step: int, x: np.ndarray, y: np.ndarray) -> float:
        """Accumulate this rank's gradients for its shard; return its mean microbatch loss.

        The value is meaningful on ranks that compute the loss (the last pipeline stage).
        """
        xs, ys = self.microbatches(x, y)
        keys = self.dropout_keys(step)
        for layer in self.moe_layers:  # the aux loss enters backward with the LM loss's seed
            layer.reset_stats()
            layer.grad_seed = self.loss_scale / len(xs)
        if self.pipeline is not None:
            return self.pipeline.train_step(xs, ys, keys, self.grad_sync,
                                            loss_scale=self.loss_scale)
        model, m, total = self.chunks[0], len(xs), 0.0
        for k in range(m):
            if self.grad_sync is not None:
                # Gradient accumulation: communicate only once the last microbatch is in.
                self.grad_sync.set_sync(k == m - 1)
            with self.tracer.context(phase="forward", microbatch=k), \
                    self.tracer.span("forward", microbatch=k):
                if self.distill is None:
                    loss = model(xs[k], ys[k], keys[k])
                else:  # (1 − α)·CE + α·T²·KL against the teacher, on this rank's rows
                    loss = self.distill.loss(model, xs[k], ys[k], keys[k])
            with self.tracer.context(phase="backward", microbatch=k), \
                    self.tracer.span("backward", microbatch=k):
                (loss * (self.loss_scale / m)).backward()
            total += float(loss.data) / m
        return total

    @property
    def loss_scale(self) -> float:
        """What each microbatch's loss is multiplied by before backward: fp16's S, else 1."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def unscale_gradients(self) -> bool:
        """Mixed precision: the masters' fp32 gradients from the 16-bit ones, divided by the
        loss scale. Returns whether the step must be skipped: with fp16, whether any rank
        found an inf or NaN (one all-reduce over the world; the scale is updated). In fp32
        there is nothing to do: False."""
        if not self.precision.half:
            return False
        finite = self.optimizer.unscale(self.loss_scale, check=self.scaler is not None)
        if self.scaler is None:
            return False
        with self.tracer.context(phase="optimizer"):
            overflow = overflow_anywhere(not finite, self.grid.world)
        self.scaler.update(overflow)
        return overflow

    def finish_gradients(self) -> None:
        """Run the gradient communication of the step, in the order of `_gradient_steps`."""
        with self.tracer.context(phase="backward", microbatch=None):
            for finish in self.gradient_steps:
                finish()

    def global_grad_norm_sq(self) -> float:
        """Σ g² over the parameters of the whole model, each element counted once.

        Each rank sums the gradients it :func:`~mpipar.parallel.full_state.owns`; over the
        world that counts every tp shard and pp stage once, and every data-parallel element
        ``grad_replicas`` times (dp when replicas all hold it, 1 when ZeRO sharded it).
        """
        local = self.optimizer.grad_norm_sq(lambda p: owns(p, self.grid))
        if self.edp_comm is not None:  # an expert element has dp / ep replicas, not dp
            local += (self.tc.ep - 1) * self.optimizer.grad_norm_sq(
                lambda p: owns(p, self.grid) and p.data_replica is not None)
        if self.grid.world.size == 1:
            return local
        buf = np.array([local], dtype=np.float64)
        with self.tracer.context(phase="optimizer"):
            self.grid.world.allreduce(buf)
        replicas = self.grad_sync.grad_replicas if self.grad_sync is not None else 1
        return float(buf[0]) / replicas

    def train_step(self) -> dict[str, Any]:
        """Run step ``self.step``; return its metrics (the loss is the global-batch mean)."""
        step, tc = self.step, self.tc
        t0 = time.perf_counter()
        self.tracer.step = step
        scale = self.loss_scale
        with self.profiler.training_step() if self.profiler is not None else nullcontext():
            loss, norm, lr, skipped = self._run_step(step)
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = tc.batch_size * self.cfg.seq_len
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                  "step_time_s": dt, "tokens_per_s": tokens / dt}
        if self.scaler is not None:  # fp16: the scale this step's loss was multiplied by
            record.update(loss_scale=scale, skipped=skipped)
        if self.cfg.n_expert:
            record.update(self.moe_stats())
        return record

    @property
    def moe_layers(self) -> list:
        """This rank's mixture-of-experts layers (`mpipar.moe.MoE`), over all its chunks."""
        return [layer for chunk in self.chunks for layer in chunk.moe_layers()]

    def moe_stats(self) -> dict[str, Any]:
        """The step's ``aux_loss`` (Σ over layers of coef · mean over the global batch's
        sequences of aux_s; not part of ``loss``) and ``dropped_tokens`` (token-to-expert
        assignments that found their expert full, over all layers and the global batch).

        Each rank contributes its layers' sums over its microbatches: the aux loss as the mean
        over its rows divided by dp, the drops as counted (one 16-byte all-reduce).
        """
        m = self.tc.microbatches
        aux = sum(layer.aux_sum for layer in self.moe_layers) / m
        dropped = sum(layer.dropped_sum for layer in self.moe_layers)
        if self.grid.world.size == 1:
            return {"aux_loss": aux, "dropped_tokens": dropped}
        buf = np.array([aux / self.grid.dp if self.grid.tp_rank == 0 else 0.0,
                        dropped if self.grid.tp_rank == 0 else 0], dtype=np.float64)
        with self.tracer.context(phase="other"):
            self.grid.world.allreduce(buf)
        return {"aux_loss": float(buf[0]), "dropped_tokens": int(round(buf[1]))}

    def update(self, norm: float, lr: float, skipped: bool) -> None:
        """Clip and take the optimizer step, or skip it (an fp16 overflow on some rank)."""
        with self.tracer.context(phase="optimizer"):
            if skipped:
                self.optimizer.skip()
                return
            if self.tc.grad_clip > 0:
                with region(self.profiler, "clip"):
                    self.optimizer.clip(norm, self.tc.grad_clip)
            with region(self.profiler, self.tc.optimizer):
                self.optimizer.step(lr)

    def _overflow_expected(self) -> contextlib.AbstractContextManager:
        """fp16: numpy stays quiet about an overflow to inf, which the loss scaler handles."""
        if self.scaler is None:
            return contextlib.nullcontext()
        return np.errstate(over="ignore", invalid="ignore")

    def _run_step(self, step: int) -> tuple[float, float, float, bool]:
        """The parts of a step, in order; returns (global loss, gradient norm, lr, skipped)."""
        tc, profiler = self.tc, self.profiler
        with region(profiler, "batch"):
            x, y = get_batch(self.data.train, tc.batch_size, self.cfg.seq_len, tc.seed, step)
        with region(profiler, "zero grad"):
            self.zero_grad()
        with self._overflow_expected():
            local_loss = self.forward_backward(step, x, y)
            with region(profiler, "grad sync"):
                self.finish_gradients()
                skipped = self.unscale_gradients()
        with region(profiler, "grad norm"):
            # A skipped step has an infinite gradient somewhere: no norm (NaN), no update.
            norm = math.nan if skipped else math.sqrt(self.global_grad_norm_sq())
        lr = lr_at(step, max_lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                   min_lr_ratio=tc.min_lr_ratio)
        self.update(norm, lr, skipped)
        return self.reduce_loss(local_loss), norm, lr, skipped

    def zero_grad(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.zero_grad()
        else:
            self.optimizer.zero_grad()

    def reduce_loss(self, local: float) -> float:
        """The global-batch mean loss, known on every rank (one 8-byte all-reduce).

        Ranks that compute the loss (last stage, tensor-parallel rank 0) contribute their shard
        mean divided by dp · cp (every cp rank holds as many of the shard's tokens); everyone
        else contributes 0.
        """
        if self.grid.world.size == 1:
            return local
        computes = self.grid.is_last_stage and self.grid.tp_rank == 0
        buf = np.array([local / self.grid.grad_size if computes else 0.0], dtype=np.float64)
        with self.tracer.context(phase="other"):
            self.grid.world.allreduce(buf)
        return float(buf[0])

    # -- the state a checkpoint holds -----------------------------------------------------------
    def full_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(model_state, opt_state)`` as the 1-process run holds them (collective): the
        weights the optimizer updates, so float32 masters under mixed precision."""
        params = (self.optimizer.master_parameters() if self.precision.half else self.params)
        return full_state(params, self.optimizer, self.grid, self.dtype)

    def load_full_state(self, model_state: dict[str, np.ndarray],
                        opt_state: dict[str, np.ndarray]) -> None:
        """Load :meth:`full_state`'s output (from any layout and precision); no communication."""
        if not self.precision.half:
            load_full_state(self.params, self.optimizer, model_state, opt_state)
            return
        masters = [master_copy(p, self.dtype) for p in self.params]
        load_full_state(masters, self.optimizer, model_state, opt_state)
        self.optimizer.load_masters(masters)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint's ``meta.json`` adds for an exact resume: fp16's loss scaler."""
        return {} if self.scaler is None else {"loss_scaler": self.scaler.state_dict()}

    def load_checkpoint_meta(self, meta: dict[str, Any]) -> None:
        """The loss scaler of :meth:`checkpoint_meta`, if the checkpoint has one (a run that
        was not fp16 has none: the scaler then starts afresh)."""
        if self.scaler is not None and "loss_scaler" in meta:
            self.scaler.load_state_dict(meta["loss_scaler"])

    # -- evaluation and generation ----------------------------------------------------------
    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Evaluation mode (no dropout) and no autograd graph, for the duration of a block."""
        for chunk in self.chunks:
            chunk.eval()
        try:
            with no_grad():
                yield
        finally:
            for chunk in self.chunks:
                chunk.train()

    def evaluate(self) -> float:
        """Mean loss over the fixed validation sample (the same batches in every layout):
        ``eval_tokens`` tokens rounded up to whole batches of ``batch_size`` windows."""
        tc = self.tc
        per_batch = tc.batch_size * self.cfg.seq_len
        batches = eval_batches(self.data.val, -(-tc.eval_tokens // per_batch), tc.batch_size,
                               self.cfg.seq_len, tc.seed)
        total = 0.0
        with self._inference():
            for x, y in batches:
                xs, ys = self.microbatches(x, y)
                if self.pipeline is not None:
                    local = self.pipeline.forward_only(xs, ys)
                else:
                    local = sum(float(self.chunks[0](a, b).data)
                                for a, b in zip(xs, ys, strict=True)) / len(xs)
                total += self.reduce_loss(local)
        return total / len(batches)

    def generate(self, prompt: list[int], n: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0) -> list[int]:
        """Sample ``n`` tokens after ``prompt``; every rank returns the same tokens."""
        if self.pipeline is not None:
            logits_fn = self.pipeline.last_logits
        else:
            def logits_fn(idx):
                return to_numpy(self.chunks[0](get_xp().asarray(idx)).data[:, -1, :])
        with self._inference():
            return sample_tokens(logits_fn, prompt, n, self.cfg.seq_len,
                                 temperature=temperature, top_k=top_k, seed=seed)
