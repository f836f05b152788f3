"""Cutting the GPT into pipeline stages: which layers each rank (and each of its chunks) holds.

With p pipeline ranks and V chunks per rank the model is cut into S = p·V consecutive pieces,
the *virtual stages* 0 .. S−1 (see `instructions`): chunk c of rank r is virtual stage
s = c·p + r. Stage s holds the blocks [lo_s, hi_s) of `stage_bounds`; in addition

    virtual stage 0      holds the embedding (wte, wpe): it turns token ids into activations;
    virtual stage S − 1  holds ln_f, the head and the loss: it turns activations into the loss.

For p = 2, V = 2 and 8 blocks::

    rank 0: chunk 0 = stage 0 (embedding, blocks 0–1)   chunk 1 = stage 2 (blocks 4–5)
    rank 1: chunk 0 = stage 1 (blocks 2–3)              chunk 1 = stage 3 (blocks 6–7, head)

The head is tied to the embedding (logits = h·wteᵀ), so ``wte.weight`` exists twice: on the
first and on the last stage. Both copies start from the same seed-determined value; each gets
its own share of the gradient (dL/dW = embedding part + head part), the two shares are summed
over the embedding group every step (`PipelineExecutor.sync_tied_grads`), and so both copies
take identical optimizer steps and stay equal, like the single matrix of the 1-process model.
"""

from __future__ import annotations

from typing import Protocol

from mpipar.model import GPT, GPTConfig, SerialLayers
from mpipar.parallel.ring import chunk_bounds


class PipelinePosition(Protocol):
    """What stage building needs to know about this rank (a `ProcessGrid` has it)."""

    pp: int
    pp_rank: int


def stage_bounds(n_layer: int, num_stages: int) -> list[tuple[int, int]]:
    """The blocks [lo, hi) of each of `num_stages` stages, as even as possible.

    Every stage gets ⌊L/S⌋ blocks and the first L mod S stages one more. Extra blocks go to
    the early stages because the last stage also computes the head and the loss (a
    (tokens × d) · (d × vocab) matmul and a softmax), the first only an embedding lookup.
    """
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    if n_layer < num_stages:
        raise ValueError(
            f"{n_layer} layers cannot fill {num_stages} stages: every stage needs a layer"
        )
    return chunk_bounds(n_layer, num_stages)  # the even split the ring uses for its chunks


def build_stage_chunks(cfg: GPTConfig, layers: SerialLayers, grid: PipelinePosition,
                       virtual_stages: int, seed: int) -> list[GPT]:
    """This rank's model chunks, chunk c = virtual stage c·pp + pp_rank, initialised from `seed`.

    Each chunk is an ordinary `GPT` that builds only its blocks (named by their global index,
    ``blocks.5.attn...``) and, on the first and last virtual stage, the embedding or the
    head. Parameters are drawn from the stream of ``(seed, name)``, so every chunk starts with
    exactly the values the 1-process model has under the same names.
    """
    p, r, v = grid.pp, grid.pp_rank, virtual_stages
    num_stages = p * v
    bounds = stage_bounds(cfg.n_layer, num_stages)
    chunks = []
    for c in range(v):
        s = c * p + r
        lo, hi = bounds[s]
        chunk = GPT(cfg, layers, first_layer=lo, last_layer=hi, pre=s == 0,
                    post=s == num_stages - 1)
        chunk.initialize(seed)
        chunks.append(chunk)
    return chunks


def describe_stages(n_layer: int, p: int, v: int = 1) -> str:
    """One line per rank saying which virtual stages and blocks its chunks hold."""
    bounds = stage_bounds(n_layer, p * v)
    lines = []
    for r in range(p):
        parts = []
        for c in range(v):
            s = c * p + r
            lo, hi = bounds[s]
            holds = ["embedding"] if s == 0 else []
            holds.append(f"blocks {lo}–{hi - 1}" if hi - lo > 1 else f"block {lo}")
            holds += ["head, loss"] if s == p * v - 1 else []
            parts.append(f"chunk {c} = stage {s} ({', '.join(holds)})")
        lines.append(f"rank {r}: " + "   ".join(parts))
    return "\n".join(lines)
