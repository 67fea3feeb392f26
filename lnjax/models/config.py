"""One frozen configuration type for every supported decoder architecture, and the HF ``config.json`` fields
every architecture shares (each architecture's own mapping sits next to its model: ``llama.py``, ``gpt2.py``,
``gptj.py``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from lnjax.core.errors import CheckpointError
from .layers import ACTIVATIONS

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gptj")
# the architectures whose forward (models/llama.py) applies the lnjax-only options mlp_topk and memory_layers
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# how a memory layer turns slot scores into its sparse code (layers.memory_read)
MEMORY_CODES = ("zscore", "cosine")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (HF names in comments where they differ).

    ``arch`` is one of ``ARCHITECTURES``; ``d_ff`` is ``intermediate_size`` / ``n_inner``; ``n_kv_heads`` is
    ``num_key_value_heads``; ``rotary_dim`` is GPT-J's partial rotary width; ``max_positions`` is GPT-2's learned
    position table size; ``rope_scaling`` is a hashable tuple of (key, value) pairs. ``mlp_topk`` > 0 (an lnjax
    option with no HF counterpart) keeps only the ``mlp_topk`` largest-magnitude MLP activations per token: a
    sparse, wide key code at every ``down_proj`` (the sparse-memory testbed of experiments/REPORT.md §8).
    ``memory_layers`` (also lnjax-only) gives those blocks a key-value memory of ``memory_slots`` slots read in
    parallel to their MLP (``layers.memory_read``: a slot fires when its score exceeds the token's mean score by
    ``memory_threshold`` standard deviations), so ``model.layers.{i}.memory.value_proj`` has a sparse key code.
    ``memory_code="cosine"`` reads the memory by cosine instead: the input is whitened by the memory's ``in_proj``,
    a slot fires when the cosine with its key exceeds ``memory_threshold`` (in (-1, 1)). ``memory_anchor`` (a
    token id, cosine code only) reads the memory at every position with the input at the latest anchor token at
    or before it (e.g. a question's ``?``), and gives each of the ``memory_offsets`` positions from the anchor on
    its own copy of the slots (``memory_slots`` = keys × offsets): an answer's every token has a slot of its own.
    ``memory_winner`` (cosine code only) keeps only the best-matching key per token (a hard nearest-key read).
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
    mlp_topk: int = 0
    memory_layers: tuple = ()
    memory_slots: int = 0
    memory_threshold: float = 2.5
    memory_code: str = "zscore"
    memory_anchor: int = -1
    memory_offsets: int = 1
    memory_winner: bool = False

    def __post_init__(self):
        object.__setattr__(self, "memory_layers", tuple(int(i) for i in self.memory_layers))
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; supported: {ARCHITECTURES}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if not 0 <= self.mlp_topk <= self.d_ff:
            raise ValueError(f"mlp_topk={self.mlp_topk} must lie in [0, d_ff={self.d_ff}]")
        for option in ("mlp_topk", "memory_layers"):
            if getattr(self, option) and self.arch not in LLAMA_FAMILY:
                raise ValueError(f"{option} is implemented for the Llama-family forward only, not {self.arch!r}")
        self._check_memory()

    def _check_memory(self):
        if not self.memory_layers:
            return
        bad = [i for i in self.memory_layers if not 0 <= i < self.n_layers]
        if bad or len(set(self.memory_layers)) != len(self.memory_layers):
            raise ValueError(f"memory_layers={self.memory_layers} must be distinct blocks in [0, {self.n_layers})")
        if self.memory_slots <= 0:
            raise ValueError(f"memory_layers={self.memory_layers} need memory_slots > 0, got {self.memory_slots}")
        if self.memory_code not in MEMORY_CODES:
            raise ValueError(f"memory_code={self.memory_code!r} is not one of {MEMORY_CODES}")
        if self.memory_code == "cosine" and not -1.0 < self.memory_threshold < 1.0:
            raise ValueError(f"memory_code='cosine' needs memory_threshold in (-1, 1), got {self.memory_threshold}")
        if self.memory_offsets < 1 or self.memory_slots % self.memory_offsets:
            raise ValueError(f"memory_offsets={self.memory_offsets} must be >= 1 and divide "
                             f"memory_slots={self.memory_slots}")
        if self.memory_winner and self.memory_code != "cosine":
            raise ValueError("memory_winner=True needs memory_code='cosine'")
        if (self.memory_anchor >= 0 or self.memory_offsets > 1) and not (
                self.memory_code == "cosine" and 0 <= self.memory_anchor < self.vocab_size):
            raise ValueError(f"memory_anchor={self.memory_anchor} / memory_offsets={self.memory_offsets} need "
                             f"memory_code='cosine' and an anchor token id in [0, {self.vocab_size})")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def rope_scaling_dict(self) -> Optional[dict]:
        return None if self.rope_scaling is None else dict(self.rope_scaling)


def refuse(where: str, option: str, value: Any, why: str) -> None:
    """Raise CheckpointError for an HF config option lnjax does not implement (never silently ignored)."""
    raise CheckpointError(f"{where}: unsupported config option {option}={value!r} ({why})")


def hf_activation(hf: dict, key: str, where: str, default: str) -> str:
    """The activation named by HF config field ``key`` (``default`` when absent), refused when unknown."""
    act = hf.get(key) or default
    if act not in ACTIVATIONS:
        refuse(where, key, act, f"supported: {sorted(ACTIVATIONS)}")
    return act


def hf_common(hf: dict) -> dict:
    """The ModelConfig fields every architecture reads alike: vocabulary size and BOS/EOS ids (the first EOS when
    a list is given)."""
    eos = hf.get("eos_token_id")
    return dict(vocab_size=int(hf["vocab_size"]), bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos)


def hf_common_out(cfg: ModelConfig, dtype: str) -> dict:
    """The HF config fields every architecture writes alike; CheckpointError for a config HF cannot express
    (``mlp_topk``, ``memory_layers``)."""
    if cfg.mlp_topk:
        refuse("config_to_hf", "mlp_topk", cfg.mlp_topk, "a sparse MLP code has no transformers counterpart")
    if cfg.memory_layers:
        refuse("config_to_hf", "memory_layers", cfg.memory_layers, "a memory layer has no transformers counterpart")
    return {"vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "torch_dtype": dtype, "tie_word_embeddings": cfg.tie_embeddings}
