"""The shape of a GPT the planner reasons about, and the published shapes it knows.

A `ModelShape` is the five numbers that fix a GPT-2 style model's memory and FLOPs: layers L,
width h, heads a, context s and vocabulary V. mpipar's own presets (`mpipar.model.PRESETS`)
come with the vocabulary of the built-in corpus; the published shapes are those of the papers
the planner's tests check against:

* GPT-3 (Brown et al. 2020, Table 2.1): 175B is L = 96, h = 12288, a = 96, s = 2048;
  125M ("GPT-3 Small") is L = 12, h = 768, a = 12, s = 2048; V = 50257 (GPT-2's BPE);
* LLaMA-style 7B (Touvron et al. 2023): L = 32, h = 4096, a = 32, s = 2048, V = 32000 (the
  planner's GPT has a 4h GELU MLP, so "7b" here is the GPT with those numbers, 6.7B);
* Megatron-LM (Narayanan et al. 2021, Table 1): the GPT models of 1.7B to 1T parameters,
  V = 51200, s = 2048.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mpipar.data import CharTokenizer, default_corpus
from mpipar.model import PRESETS, GPTConfig, flops_per_token, matmul_params


@dataclass(frozen=True)
class ModelShape:
    """n_layer L, d_model h, n_head a, seq_len s, vocab_size V."""

    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head {self.n_head} does not divide d_model {self.d_model}")

    def config(self) -> GPTConfig:
        """The `mpipar.model.GPTConfig` of this shape (float32, no dropout)."""
        return GPTConfig(vocab_size=self.vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                         d_model=self.d_model, seq_len=self.seq_len)

    def flops_per_token(self) -> int:
        """Training FLOPs per token, 6·Ψ_matmul + 6·L·s·h (`mpipar.model.flops_per_token`)."""
        return flops_per_token(self.config())

    def matmul_params(self) -> int:
        """Parameters in a matrix product per token: 12·L·h² + V·h."""
        return matmul_params(self.config())

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# Published shapes; Megatron's Table 1 rows are named by their parameter count.
PUBLISHED: dict[str, ModelShape] = {
    "gpt3-125m": ModelShape(12, 768, 12, 2048, 50257),
    "gpt3-175b": ModelShape(96, 12288, 96, 2048, 50257),
    "7b": ModelShape(32, 4096, 32, 2048, 32000),
    "megatron-1.7b": ModelShape(24, 2304, 24, 2048, 51200),
    "megatron-18.4b": ModelShape(40, 6144, 48, 2048, 51200),
    "megatron-145.6b": ModelShape(80, 12288, 96, 2048, 51200),
    "megatron-1t": ModelShape(128, 25600, 160, 2048, 51200),
}

# Megatron-LM 2021, Table 1: (model, GPUs, global batch B) of the rows the tests use.
MEGATRON_TABLE1: dict[str, tuple[int, int]] = {
    "megatron-1.7b": (32, 512),
    "megatron-18.4b": (256, 1024),
    "megatron-145.6b": (1536, 2304),
    "megatron-1t": (3072, 3072),
}


def default_vocab_size() -> int:
    """The vocabulary of the built-in corpus (its distinct characters)."""
    return len(CharTokenizer.from_text(default_corpus()[0]).chars)


def from_preset(name: str, vocab_size: int | None = None) -> ModelShape:
    """An mpipar preset's shape, with the built-in corpus's vocabulary unless given."""
    p = PRESETS[name]
    return ModelShape(p["n_layer"], p["d_model"], p["n_head"], p["seq_len"],
                      vocab_size or default_vocab_size())


def resolve_shape(name: str) -> ModelShape:
    """A preset (tiny, small, medium) or a published shape, by name."""
    if name in PRESETS:
        return from_preset(name)
    if name in PUBLISHED:
        return PUBLISHED[name]
    known = ", ".join([*PRESETS, *PUBLISHED])
    raise ValueError(f"unknown model {name!r}; choose one of {known}")


__all__ = ["MEGATRON_TABLE1", "ModelShape", "PUBLISHED", "default_vocab_size", "from_preset",
           "resolve_shape"]
