"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) and sequence parallelism
(Korthikanti et al. 2022).

``mappings``       the communication as autograd Functions: f, g, scatter/gather, and the
                   sequence-parallel all-gather / reduce-scatter
``layers``         ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding and
                   :class:`TensorParallelLayers`, the parallel ``layers`` object of the GPT
``cross_entropy``  vocab_parallel_cross_entropy: the loss without gathering the logits
"""

from mpipar.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mpipar.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayers,
    VocabParallelEmbedding,
)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "TensorParallelLayers",
           "VocabParallelEmbedding", "vocab_parallel_cross_entropy"]
