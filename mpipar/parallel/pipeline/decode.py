"""Inference through a pipeline: each stage runs its blocks, with its own KV cache, in turn.

Training keeps many microbatches in flight to fill the pipeline; generation has one batch of
sequences and must finish token i before it can choose token i + 1, so a decode step walks
the stages one after the other::

    stage 0       embed the new tokens (B, t) → its blocks → Send (B, t, d) ─┐
    stage 1       Recv ◄──────────────────────────────────────────────────────┘
                  its blocks → ... → last stage: ln_f, head → logits (B, t, V)
    last stage    Broadcast the next-token logits (B, V) to every stage

so one decode step costs p − 1 sends of B·d numbers and one broadcast of B·V, and while one
stage computes the others wait: a single sequence gains no speed from a pipeline, only the
memory of holding 1/p of the weights and of the KV cache (each stage caches its own layers).
Evaluation runs whole windows of text through the same walk, batch after batch; a stage that
has sent a batch on starts the next one, so consecutive batches overlap as in GPipe's forward.

The activation shape is known on both sides (the batch, the new positions, and under sequence
parallelism only T/t of them when the pass splits the sequence), so each message is one raw
buffer ``Send`` matched by a ``Recv`` into an array of that shape, through the pipeline group's
:class:`~mpipar.comm.Comm` (traced like every call).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpipar.autograd import Tensor
from mpipar.backend import get_xp
from mpipar.grid import ProcessGrid
from mpipar.kv_cache import KVCache
from mpipar.model import GPT

from .instructions import TAG_ACTIVATION


class PipelineInference:
    """This rank's stage of a pipeline (one model chunk), run forward only, in stage order."""

    def __init__(self, chunk: GPT, grid: ProcessGrid) -> None:
        self.chunk, self.comm = chunk, grid.pp_comm
        self.r, self.p = grid.pp_rank, grid.pp
        self.d_model = chunk.cfg.d_model
        self.dtype = np.dtype(chunk.cfg.dtype)

    @property
    def holds_head(self) -> bool:
        """Whether this stage computes the logits (the last one)."""
        return self.r == self.p - 1

    def forward(self, idx: Any, cache: KVCache | None = None) -> Any:
        """Logits (B, t, V) of token ids ``idx`` (B, t) on the last stage; None elsewhere.

        Stage 0 embeds ``idx``; every other stage receives the previous stage's output. A
        stage that is not the last sends its output on. Blocking calls suffice: each Send
        meets a Recv that its neighbour posts next.
        """
        b, t = idx.shape
        layout = self.chunk.layers.sequence_layout(t)
        if self.r == 0:
            inp = idx
        else:
            buf = get_xp().empty((b, layout.local_length, self.d_model), dtype=self.dtype)
            self.comm.recv(buf, self.r - 1, tag=TAG_ACTIVATION)
            inp = Tensor(buf)
        out = self.chunk(inp, seq_len=t, cache=cache).data
        if not self.holds_head:
            self.comm.send(get_xp().ascontiguousarray(out), self.r + 1, tag=TAG_ACTIVATION)
            return None
        return out

    def share(self, logits: Any, shape: tuple[int, ...]) -> Any:
        """The last stage's ``logits`` (of ``shape``) on every stage: a broadcast."""
        buf = logits if self.holds_head else get_xp().empty(shape, dtype=self.dtype)
        return self.comm.broadcast(get_xp().ascontiguousarray(buf), root=self.p - 1)


__all__ = ["PipelineInference"]
