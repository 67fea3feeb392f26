"""The tiny models the tests share (one definition each; the same configs and seeds the tests always used).

- ``TINY``: a 2-layer Llama (GQA, 61 tokens, d_model 16, d_ff 24) edited at both down_projs (``TARGETS``);
  ``TINY_3_LAYERS``: the same with a third layer above the edited ones (MEMIT/AlphaEdit read layer outputs there).
- ``tiny_model(seed, std, cfg)``: ``TINY`` (or ``cfg``) with ``init_params`` at ``PRNGKey(seed)``.
- ``random_examples(n, seed)``: ``n`` random (prompt, answer) id pairs over ``TINY``'s vocabulary.
- ``world_config(vocab_size)``: a 2-layer Llama over a world's vocabulary (d_model 32, d_ff 48, bos 1, eos 2).
- ``SMALL`` / ``small_model_and_turns(n_turns)``: a 2-layer Llama over 41 tokens (MHA) and ``n_turns`` packed
  turns of 10 random edits (the checkpoint and numerical-fault tests' set-up).
- ``random_memory(rng, d, keys, offsets)``: the params of a fact-memory layer with unit-norm random keys.
- ``NoPunct(tok)``: a tokenizer wrapper that drops punctuation-only words (answers like '!!' tokenize to nothing).
"""

import dataclasses
import importlib.util
import pathlib

import jax
import numpy as np

from lnjax.core.turns import pack_turns
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


SMALL = ModelConfig(arch="llama", vocab_size=41, d_model=16, n_layers=2, n_heads=2, d_ff=24)


def small_model_and_turns(n_turns: int):
    """(``SMALL`` model at PRNGKey(0), std 0.3; ``TurnBatch`` of ``n_turns`` turns of 10 random edits)."""
    model = Model(SMALL, init_params(SMALL, jax.random.PRNGKey(0), std=0.3))
    rng = np.random.default_rng(0)
    ex = [(list(rng.integers(1, 41, rng.integers(2, 5))), list(rng.integers(1, 41, rng.integers(1, 3))))
          for _ in range(10 * n_turns)]
    return model, pack_turns(ex, 10)[0]


def random_memory(rng: np.random.Generator, d: int, keys: int, offsets: int) -> dict:
    """Float64 NumPy params of a memory layer: ``in_proj`` (d, d) + bias, unit-norm ``key_proj`` (d, keys) with a
    zero bias, ``value_proj`` (keys * offsets, d)."""
    k = rng.normal(size=(d, keys))
    return {"in_proj": {"kernel": rng.normal(size=(d, d)), "bias": rng.normal(size=(d,))},
            "key_proj": {"kernel": k / np.linalg.norm(k, axis=0), "bias": np.zeros(keys)},
            "value_proj": {"kernel": rng.normal(size=(keys * offsets, d))}}


class NoPunct:
    """A tokenizer that drops punctuation-only words, so an answer like '!!' tokenizes to nothing."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_special_tokens=True):
        kept = " ".join(w for w in text.split() if any(ch.isalnum() for ch in w))
        return self.tok.encode(kept, add_special_tokens) if kept or add_special_tokens else []


def experiment_module(name: str):
    """The script ``experiments/<name>.py`` imported as a module (its pure helpers are tested; the scripts
    themselves are experiments, not tests)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
