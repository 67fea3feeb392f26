"""The tiny models the tests share (one definition each; the same configs and seeds the tests always used).

- ``TINY``: a 2-layer Llama (GQA, 61 tokens, d_model 16, d_ff 24) edited at both down_projs (``TARGETS``);
  ``TINY_3_LAYERS``: the same with a third layer above the edited ones (MEMIT/AlphaEdit read layer outputs there).
- ``tiny_model(seed, std, cfg)``: ``TINY`` (or ``cfg``) with ``init_params`` at ``PRNGKey(seed)``.
- ``random_examples(n, seed)``: ``n`` random (prompt, answer) id pairs over ``TINY``'s vocabulary.
- ``world_config(vocab_size)``: a 2-layer Llama over a world's vocabulary (d_model 32, d_ff 48, bos 1, eos 2).
"""

import dataclasses

import jax
import numpy as np

from lnjax.models import Model, ModelConfig, init_params

TINY = ModelConfig(arch="llama", vocab_size=61, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24)
TINY_3_LAYERS = dataclasses.replace(TINY, n_layers=3)
TARGETS = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


def tiny_model(seed: int = 0, std: float = 0.2, cfg: ModelConfig = TINY) -> Model:
    return Model(cfg, init_params(cfg, jax.random.PRNGKey(seed), std=std))


def random_examples(n: int, seed: int = 0) -> list:
    """``n`` (prompt ids [2..5], answer ids [1..3]) pairs drawn from ``TINY``'s vocabulary (ids 1..60)."""
    rng = np.random.default_rng(seed)
    return [(list(rng.integers(1, 61, rng.integers(2, 6))), list(rng.integers(1, 61, rng.integers(1, 4))))
            for _ in range(n)]


def world_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_ff=48, bos_token_id=1, eos_token_id=2)
