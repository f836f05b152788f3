"""The training loop: one object that owns the model, the data, the optimizer and the step.

A step in every layout (DESIGN.md §5):

1. draw the global batch of the step (the same in every layout), keep this rank's
   data-parallel shard of rows and cut it into ``microbatches``;
2. forward and backward each microbatch, scaling its loss by 1/M so that gradients add up to
   the mean over the shard (a pipeline runs its schedule here instead of a plain loop);
3. finish the gradients: average over the data-parallel group (the mean over the shard
   averaged over the shards is the mean over the whole global batch);
4. clip by the global gradient norm, take the optimizer step with this step's learning rate.

The reported loss is the mean over the whole global batch, so it is the same number in every
layout (and, in float64, the same as the 1-process run to ~1e-10).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mpipar.autograd import no_grad
from mpipar.backend import get_xp, to_numpy
from mpipar.data import Dataset, eval_batches, get_batch, shard_rows, split_microbatches
from mpipar.grid import ProcessGrid
from mpipar.model import GPT, GPTConfig, SerialLayers
from mpipar.nn import DropoutKey, Parameter, unique_parameters
from mpipar.optim import SGD, AdamW, clip_grad_norm, grad_norm_sq, lr_at
from mpipar.trace import Tracer


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run that is not the model's shape (DESIGN.md §2 flags)."""

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
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    bucket_mb: float = 1.0
    overlap: bool = True
    allreduce: str = "mpi"
    dp_strategy: str = "bucketed"
    sequence_parallel: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_memory_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Trainer:
    """Builds this rank's part of the model and runs training steps in a given layout."""

    def __init__(self, cfg: GPTConfig, tc: TrainConfig, grid: ProcessGrid, data: Dataset,
                 tracer: Tracer) -> None:
        self.cfg, self.tc, self.grid, self.data, self.tracer = cfg, tc, grid, data, tracer
        self.dtype = np.dtype(cfg.dtype)
        self.layers = self._make_layers()
        self.chunks: list[GPT] = self._make_chunks()
        self.params = unique_parameters(p for c in self.chunks for p in c.parameters())
        self.grad_sync = self._make_grad_sync()
        self.optimizer = self._make_optimizer()
        self.step = 0  # the next step to run
        self.pipeline = self._make_pipeline()

    # -- construction (each parallelism plugs in here) --------------------------------------
    def _make_layers(self) -> SerialLayers:
        if self.grid.tp == 1:
            return SerialLayers(self.dtype)
        from mpipar.parallel.tensor_parallel import TensorParallelLayers

        return TensorParallelLayers(self.grid.tp_comm, self.dtype,
                                    sequence_parallel=self.tc.sequence_parallel)

    def _make_chunks(self) -> list[GPT]:
        if self.grid.pp == 1:
            model = GPT(self.cfg, self.layers)
            model.initialize(self.tc.seed)
            return [model]
        from mpipar.parallel.pipeline.stages import build_stage_chunks

        return build_stage_chunks(self.cfg, self.layers, self.grid, self.tc.virtual_stages,
                                  self.tc.seed)

    def _make_grad_sync(self):
        if self.grid.dp == 1:
            return None
        from mpipar.parallel.zero import make_grad_sync

        return make_grad_sync(self.params, self.grid.dp_comm, strategy=self.tc.dp_strategy,
                              bucket_mb=self.tc.bucket_mb, overlap=self.tc.overlap,
                              allreduce=self.tc.allreduce, zero=self.tc.zero)

    def _make_optimizer(self):
        tc = self.tc
        if tc.zero and self.grid.dp > 1:
            from mpipar.parallel.zero import ZeroAdamW

            return ZeroAdamW(self.params, self.grad_sync, lr=tc.lr, weight_decay=tc.weight_decay)
        if tc.optimizer == "sgd":
            return SGD(self.params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        return AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)

    def _make_pipeline(self):
        if self.grid.pp == 1:
            return None
        from mpipar.parallel.pipeline.executor import PipelineExecutor

        return PipelineExecutor(self.chunks, self.grid, self.tc, self.tracer)

    # -- one training step ------------------------------------------------------------------
    def local_rows(self) -> tuple[int, int]:
        """This rank's rows [lo, hi) of the global batch (its data-parallel shard)."""
        per = self.tc.batch_size // self.grid.dp
        return self.grid.dp_rank * per, (self.grid.dp_rank + 1) * per

    def dropout_keys(self, step: int) -> list[DropoutKey]:
        """The dropout key of each microbatch: which rows of the global batch it holds."""
        lo, hi = self.local_rows()
        m = self.tc.microbatches
        per = (hi - lo) // m
        return [DropoutKey(self.tc.seed, step, self.tc.batch_size,
                           slice(lo + k * per, lo + (k + 1) * per)) for k in range(m)]

    def microbatches(self, x: np.ndarray, y: np.ndarray) -> tuple[list, list]:
        xp = get_xp()
        xs = shard_rows(x, self.grid.dp_rank, self.grid.dp)
        ys = shard_rows(y, self.grid.dp_rank, self.grid.dp)
        m = self.tc.microbatches
        return ([xp.asarray(a) for a in split_microbatches(xs, m)],
                [xp.asarray(a) for a in split_microbatches(ys, m)])

    def forward_backward(self, step: int, x: np.ndarray, y: np.ndarray) -> float:
        """Accumulate this rank's gradients for its shard; return its mean microbatch loss.

        The value is meaningful on ranks that compute the loss (the last pipeline stage).
        """
        xs, ys = self.microbatches(x, y)
        keys = self.dropout_keys(step)
        if self.pipeline is not None:
            return self.pipeline.train_step(xs, ys, keys, self.grad_sync)
        model, m, total = self.chunks[0], len(xs), 0.0
        for k in range(m):
            if self.grad_sync is not None:
                # Gradient accumulation: communicate only once the last microbatch is in.
                self.grad_sync.set_sync(k == m - 1)
            with self.tracer.context(phase="forward", microbatch=k), \
                    self.tracer.span("forward", microbatch=k):
                loss = model(xs[k], ys[k], keys[k])
            with self.tracer.context(phase="backward", microbatch=k), \
                    self.tracer.span("backward", microbatch=k):
                (loss * (1.0 / m)).backward()
            total += float(loss.data) / m
        return total

    def finish_gradients(self) -> None:
        """Gradient communication that completes the backward pass of a step.

        The tensor-parallel sum of replicated gradients and the data-parallel average are both
        sums, so their order does not change the result, but without ZeRO data-parallel
        buckets may still be in flight (launched during backward) and must not be written to
        until ``finish`` has waited for them; with ZeRO the reduce-scatter keeps only a shard,
        so the tensor-parallel sum has to come first.
        """
        zero_sharded = self.grad_sync is not None and self.grad_sync.zero > 0
        with self.tracer.context(phase="backward", microbatch=None):
            if self.grid.tp > 1 and (self.grad_sync is None or zero_sharded):
                self.layers.sync_replicated_grads(self.params)
            if self.pipeline is not None:
                self.pipeline.sync_tied_grads()
            if self.grad_sync is not None:
                self.grad_sync.finish()
                if self.grid.tp > 1 and not zero_sharded:
                    self.layers.sync_replicated_grads(self.params)

    def global_grad_norm_sq(self) -> float:
        """Σ g² over the parameters of the whole model, each element counted once.

        A rank counts what it alone owns: its tensor-parallel shards, replicated parameters
        only on tensor-parallel rank 0, the tied embedding only on the first stage, and its
        ZeRO gradient shard (otherwise data-parallel replicas agree and are divided out).
        """
        if self.grid.world.size == 1:
            return grad_norm_sq(self.params)
        if self.tc.zero and self.grid.dp > 1:
            local = self.optimizer.grad_norm_sq(self.norm_owned)
            replicas = 1
        else:
            local = grad_norm_sq([p for p in self.params if self.norm_owned(p)])
            replicas = self.grid.dp
        buf = np.array([local], dtype=np.float64)
        with self.tracer.context(phase="optimizer"):
            self.grid.world.allreduce(buf)
        return float(buf[0]) / replicas

    def norm_owned(self, p: Parameter) -> bool:
        """Whether this rank counts ``p`` in the global gradient norm (see above)."""
        if p.replicated_in_tp and self.grid.tp_rank != 0:
            return False
        return not (p.name == "wte.weight" and self.grid.pp > 1 and not self.grid.is_first_stage)

    def train_step(self) -> dict[str, Any]:
        """Run step ``self.step``; return its metrics (the loss is the global-batch mean)."""
        step, tc = self.step, self.tc
        t0 = time.perf_counter()
        self.tracer.step = step
        x, y = get_batch(self.data.train, tc.batch_size, self.cfg.seq_len, tc.seed, step)
        self.zero_grad()
        local_loss = self.forward_backward(step, x, y)
        self.finish_gradients()
        norm = math.sqrt(self.global_grad_norm_sq())
        lr = lr_at(step, max_lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps,
                   min_lr_ratio=tc.min_lr_ratio)
        with self.tracer.context(phase="optimizer"):
            if tc.grad_clip > 0:
                self.clip(norm)
            self.optimizer.step(lr)
        loss = self.reduce_loss(local_loss)
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = tc.batch_size * self.cfg.seq_len
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                "step_time_s": dt, "tokens_per_s": tokens / dt}

    def zero_grad(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.zero_grad()
        else:
            for p in self.params:
                p.grad = None

    def clip(self, norm: float) -> None:
        """Scale every gradient by grad_clip/norm when the global norm exceeds grad_clip."""
        if self.tc.zero and self.grid.dp > 1:
            self.optimizer.clip(norm, self.tc.grad_clip)
        else:
            clip_grad_norm(self.params, self.tc.grad_clip, norm_sq=norm * norm)

    def reduce_loss(self, local: float) -> float:
        """The global-batch mean loss, known on every rank (one 8-byte all-reduce).

        Ranks that compute the loss (last stage, tensor-parallel rank 0) contribute their shard
        mean divided by dp; everyone else contributes 0.
        """
        if self.grid.world.size == 1:
            return local
        owns = self.grid.is_last_stage and self.grid.tp_rank == 0
        buf = np.array([local / self.grid.dp if owns else 0.0], dtype=np.float64)
        with self.tracer.context(phase="other"):
            self.grid.world.allreduce(buf)
        return float(buf[0])

    # -- evaluation and generation ----------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (the same batches in every layout)."""
        tc = self.tc
        batches = eval_batches(self.data.val, tc.eval_batches, tc.batch_size, self.cfg.seq_len,
                               tc.seed)
        total = 0.0
        for chunk in self.chunks:
            chunk.eval()
        with no_grad():
            for x, y in batches:
                xs, ys = self.microbatches(x, y)
                if self.pipeline is not None:
                    local = self.pipeline.forward_only(xs, ys)
                else:
                    local = sum(float(self.chunks[0](a, b).data) for a, b in zip(xs, ys,
                                                                                 strict=True))
                    local /= len(xs)
                total += self.reduce_loss(local)
        for chunk in self.chunks:
            chunk.train()
        return total / len(batches)

    def generate(self, prompt: list[int], n: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0) -> list[int]:
        """Sample ``n`` tokens after ``prompt``; every rank returns the same tokens."""
        from mpipar.sample import sample_tokens

        if self.pipeline is not None:
            logits_fn = self.pipeline.last_logits
        else:
            def logits_fn(idx):
                return to_numpy(self.chunks[0](get_xp().asarray(idx)).data[:, -1, :])
        for chunk in self.chunks:
            chunk.eval()
        with no_grad():
            out = sample_tokens(logits_fn, prompt, n, self.cfg.seq_len,
                                temperature=temperature, top_k=top_k, seed=seed)
        for chunk in self.chunks:
            chunk.train()
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The whole model's parameters and optimizer state, as the 1-process run holds them.

        Every rank calls this (it communicates); every rank gets the full arrays.
        """
        model = {}
        for p in self.params:
            model[p.name] = p
        opt_local = self.optimizer.state_dict()
        if self.grid.world.size == 1:
            return ({n: to_numpy(p.data).copy() for n, p in model.items()}, opt_local)
        names = gather_names(self.grid, sorted(model))
        full_model = {}
        for name in names:
            p = model.get(name)
            full_model[name] = self._assemble(name, p, None if p is None else p.data)
        full_opt = {}
        opt_names = gather_names(self.grid, sorted(opt_local))
        for key in opt_names:
            pname = key.split(".", 2)[2] if key.count(".") >= 2 else None
            p = model.get(pname) if pname else None
            full_opt[key] = self._assemble(key, p, opt_local.get(key))
        return full_model, full_opt

    def _assemble(self, name: str, p: Parameter | None, local: Any) -> np.ndarray:
        """All-reduce of zero-padded contributions: owners write their part of the full array.

        A first 8-integer all-reduce (max) agrees on the full shape and on whether the value is
        an integer (the optimizer's step count); then each owner writes its shard at its
        ``shard_index`` in a zero array and a sum all-reduce assembles the whole.
        """
        owner = local is not None and self._state_owner(p)
        head = np.zeros(8, dtype=np.int64)  # [ndim, is_int, dims...]
        if owner:
            full_shape = p.full_shape if p is not None else np.shape(local)
            head[0] = len(full_shape)
            head[1] = to_numpy(local).dtype.kind in "iu"
            head[2:2 + len(full_shape)] = full_shape
        self.grid.world.allreduce(head, op="max")
        full_shape = tuple(int(s) for s in head[2:2 + head[0]])
        buf = np.zeros(full_shape, dtype=np.int64 if head[1] else self.dtype)
        if owner:
            if p is None or p.shard_index is None:
                buf[...] = to_numpy(local)
            else:
                buf[p.shard_index] = to_numpy(local)[p.local_index]
        self.grid.world.allreduce(buf)
        return buf

    def _state_owner(self, p: Parameter | None) -> bool:
        """Whether this rank writes ``p``'s part into the assembled full state."""
        if self.grid.dp_rank != 0:
            return False
        if p is None:  # scalar optimizer state (the step count): one writer
            return self.grid.tp_rank == 0 and self.grid.is_first_stage
        if p.replicated_in_tp and self.grid.tp_rank != 0:
            return False
        return not (p.name == "wte.weight" and self.grid.pp > 1 and not self.grid.is_first_stage)

    def load_full_state(self, model_state: dict[str, np.ndarray],
                        opt_state: dict[str, np.ndarray]) -> None:
        """Load a full (1-process shaped) state: each rank keeps its own shard of it."""
        for p in self.params:
            full = model_state[p.name]
            part = full if p.shard_index is None else full[p.shard_index]
            p.data[p.local_index] = get_xp().asarray(part.astype(p.data.dtype, copy=False))
        local_opt = {}
        for key, value in opt_state.items():
            pname = key.split(".", 2)[2] if key.count(".") >= 2 else None
            p = next((q for q in self.params if q.name == pname), None) if pname else None
            if pname is not None and p is None:
                continue  # a parameter another rank holds
            if p is None or p.shard_index is None:
                local_opt[key] = value
            else:  # the optimizer state of a shard has the shard's (padded) local shape
                local = np.zeros(p.shape, dtype=value.dtype)
                local[p.local_index] = value[p.shard_index]
                local_opt[key] = local
        self.optimizer.load_state_dict(local_opt)

    def expected_model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shapes of every parameter of the 1-process model (for checking a checkpoint)."""
        full = GPT(self.cfg, SerialLayers(self.dtype))
        return {name: tuple(p.shape) for name, p in full.named_parameters()}


def gather_names(grid: ProcessGrid, names: list[str]) -> list[str]:
    """The sorted union of parameter names held anywhere (a small control message)."""
    everyone = grid.world.allgather_object(names)
    return sorted({n for names_r in everyone for n in names_r})


class MetricsWriter:
    """JSON lines on global rank 0 (DESIGN.md §3); a no-op elsewhere or without a path."""

    def __init__(self, path: str | None, active: bool) -> None:
        self._file = open(path, "w", encoding="utf-8") if path and active else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def format_progress(m: dict[str, Any], total_steps: int, elapsed: float) -> str:
    done = m["step"] + 1
    eta = elapsed / max(done, 1) * (total_steps - done)
    return (f"step {m['step']:5d}/{total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:8.0f} tok/s | "
            f"ETA {eta:5.0f}s")


ProgressFn = Callable[[str], None]
