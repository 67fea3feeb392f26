"""One frozen configuration type for every supported decoder architecture."""

from __future__ import annotations

import dataclasses
from typing import Optional

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gptj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (HF names in comments where they differ).

    ``arch`` is one of ``ARCHITECTURES``; ``d_ff`` is ``intermediate_size`` / ``n_inner``; ``n_kv_heads`` is
    ``num_key_value_heads``; ``rotary_dim`` is GPT-J's partial rotary width; ``max_positions`` is GPT-2's learned
    position table size; ``rope_scaling`` is a hashable tuple of (key, value) pairs.
    """

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None
    rotary_dim: Optional[int] = None
    max_positions: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    activation: str = "silu"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; supported: {ARCHITECTURES}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def rope_scaling_dict(self) -> Optional[dict]:
        return None if self.rope_scaling is None else dict(self.rope_scaling)
