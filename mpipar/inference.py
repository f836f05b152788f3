"""A trained model laid out for inference on a tp × pp grid: load it, run it forward.

Generation (`mpipar.decoding`, ``python -m mpipar.generate``) and evaluation
(``python -m mpipar.evaluate``) both start here. :func:`load_for_inference` reads a checkpoint,
float or int8 (`mpipar.quantize`, dequantised as it is read), in the full 1-process shapes,
so the layout it was trained in does not matter. :class:`InferenceModel` builds this rank's
part of the model: the tensor-parallel shards of its layers (``--tp``) on its pipeline stage's
blocks (``--pp``), and cuts its shard out of the full arrays, as resuming a run does.

Its forward pass takes token ids and, for generation, a :class:`~mpipar.kv_cache.KVCache`:

* :meth:`InferenceModel.next_logits`: the logits of each row's last real token, (B, V), the
  same on every rank, so every rank can draw the same next token from the same stream;
* :meth:`InferenceModel.token_nll`: −log p(target) of every position, on the ranks that
  hold the head (evaluation sums them).

With pp > 1 a pass walks the stages in turn (`mpipar.parallel.pipeline.decode`). Under
sequence parallelism a pass splits the sequence only when tp divides its length (the layout's
own rule), so a decode step of one token runs unsplit and a prompt of 2·tp tokens split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpipar.autograd import no_grad
from mpipar.backend import get_xp, to_numpy
from mpipar.checkpoint import CheckpointError, check_state, load_checkpoint
from mpipar.data import CharTokenizer, DataError
from mpipar.grid import ProcessGrid
from mpipar.kv_cache import KVCache
from mpipar.model import GPT, GPTConfig, SerialLayers
from mpipar.parallel.pipeline.decode import PipelineInference
from mpipar.parallel.pipeline.stages import stage_bounds
from mpipar.quantize import dequantize, model_state_of, quantize_shard
from mpipar.resume import model_specs


@dataclass
class LoadedCheckpoint:
    """What inference needs from a checkpoint: the shape, the vocabulary, the full weights."""

    cfg: GPTConfig
    tokenizer: CharTokenizer
    state: dict[str, np.ndarray]  # parameter name → full (1-process shaped) float array
    meta: dict[str, Any]

    @property
    def quantized(self) -> bool:
        return "quantization" in self.meta


def load_for_inference(directory: str) -> LoadedCheckpoint:
    """Read a checkpoint (float or int8) and check it is a whole model (CheckpointError)."""
    arrays, meta = load_checkpoint(directory)
    try:
        cfg = GPTConfig(**meta["model"])
        tokenizer = CharTokenizer.from_chars(meta["tokenizer"])
    except (KeyError, TypeError, ValueError, DataError) as exc:
        raise CheckpointError(f"{directory}: meta.json does not describe a model ({exc})") \
            from exc
    state = model_state_of(arrays, meta, np.dtype(cfg.dtype))
    check_state(model_specs(cfg), state)
    return LoadedCheckpoint(cfg, tokenizer, state, meta)


def make_layers(cfg: GPTConfig, grid: ProcessGrid, sequence_parallel: bool) -> SerialLayers:
    """Serial layers, or the tensor-parallel ones over the grid's tp group."""
    dtype = np.dtype(cfg.dtype)
    if grid.tp == 1:
        return SerialLayers(dtype)
    from mpipar.parallel.tensor_parallel import TensorParallelLayers

    return TensorParallelLayers(grid.tp_comm, dtype, sequence_parallel=sequence_parallel)


class InferenceModel:
    """This rank's part of a model (its tp shard of its pipeline stage), forward only."""

    def __init__(self, cfg: GPTConfig, grid: ProcessGrid, *,
                 sequence_parallel: bool = False) -> None:
        self.cfg, self.grid = cfg, grid
        lo, hi = stage_bounds(cfg.n_layer, grid.pp)[grid.pp_rank]
        self.model = GPT(cfg, make_layers(cfg, grid, sequence_parallel), first_layer=lo,
                         last_layer=hi, pre=grid.is_first_stage, post=grid.is_last_stage)
        self.model.eval()
        self.pipeline = PipelineInference(self.model, grid) if grid.pp > 1 else None

    @property
    def holds_head(self) -> bool:
        """Whether this rank computes logits (every rank without a pipeline, else the last
        stage's)."""
        return self.grid.is_last_stage

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Set every parameter to its shard of the full arrays ``state`` (padding stays 0)."""
        xp = get_xp()
        for p in self.model.parameters():
            full = state[p.name]
            part = full if p.shard_index is None else full[p.shard_index]
            p.data[...] = 0
            p.data[p.local_index] = xp.asarray(part.astype(p.data.dtype, copy=False))

    def quantize_int8(self) -> None:
        """Round every matrix to its int8 grid, each rank its own shard (`quantize_shard`)."""
        xp = get_xp()
        for p in self.model.parameters():
            if p.ndim == 2:
                q, scale = quantize_shard(p, self.grid.tp_comm)
                p.data[p.local_index] = xp.asarray(dequantize(q, scale, p.data.dtype))

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache for ``batch`` sequences: this rank's heads of its stage's layers."""
        cfg = self.cfg
        attn = [block.attn for block in self.model.blocks]
        return KVCache(batch, cfg.seq_len, [a.layer for a in attn], attn[0].n_local_heads,
                       cfg.head_dim, np.dtype(cfg.dtype))

    def forward(self, idx: Any, cache: KVCache | None = None) -> Any:
        """Logits (B, t, V) of token ids (B, t) where the head is, else None (no graph)."""
        idx = get_xp().asarray(idx)
        with no_grad():
            if self.pipeline is not None:
                return self.pipeline.forward(idx, cache)
            return self.model(idx, cache=cache).data

    def next_logits(self, idx: Any, counts: Any, cache: KVCache | None = None) -> np.ndarray:
        """Logits (B, V) after the last real token of each row, on every rank.

        ``idx`` (B, t) holds ``counts[b]`` real tokens in row b, then padding. With a cache the
        tokens follow those it holds, and it advances by ``counts``.
        """
        counts = np.asarray(counts, dtype=np.int64)
        logits = self.forward(idx, cache)
        if cache is not None:
            cache.advance(counts)
        last = None
        if logits is not None:
            xp = get_xp()
            last = logits[xp.arange(len(counts)), xp.asarray(counts - 1)]  # (B, V)
        if self.pipeline is not None:
            last = self.pipeline.share(last, (len(counts), self.cfg.vocab_size))
        return to_numpy(last)

    def token_nll(self, x: Any, y: Any) -> np.ndarray | None:
        """−log p(y[b, i] | x[b, ..i]) in float64, (B, T), where the head is; else None."""
        logits = self.forward(x)
        if logits is None:
            return None
        z = to_numpy(logits).astype(np.float64)  # (B, T, V)
        m = z.max(axis=-1, keepdims=True)
        lse = m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))
        return lse - np.take_along_axis(z, np.asarray(y)[..., None], axis=-1)[..., 0]


__all__ = ["InferenceModel", "LoadedCheckpoint", "load_for_inference", "make_layers"]
