"""The sparse MLP code option (``ModelConfig.mlp_topk``): the kept activations, the keys the probe reads, and the
refusal to export it as an HF config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.io.checkpoint import CheckpointError
from lnjax.models import Model, ModelConfig, init_params
from lnjax.models.layers import keep_topk
from lnjax.models.llama import config_to_hf
from lnjax.models.probe import TurnBatch, turn_features


def _cfg(k):
    return ModelConfig(arch="llama", vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                       max_positions=16, mlp_topk=k)


def test_keep_topk_keeps_the_k_largest_magnitudes():
    x = np.random.default_rng(0).normal(size=(3, 5, 64)).astype(np.float32)
    got = np.asarray(keep_topk(jnp.asarray(x), 7))
    for row, out in zip(x.reshape(-1, 64), got.reshape(-1, 64)):
        keep = np.argsort(-np.abs(row))[:7]
        want = np.zeros_like(row)
        want[keep] = row[keep]
        np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(np.asarray(keep_topk(jnp.asarray(x), 0)), x)


def test_probe_keys_have_at_most_k_nonzeros_and_dense_model_is_unchanged():
    params = init_params(_cfg(0), jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 40, (4, 9)))
    mask = jnp.ones_like(ids)
    labels = jnp.where(jnp.arange(9) >= 6, ids, -100)
    dense = Model(_cfg(0), params).apply(params, ids, mask)
    full = Model(_cfg(64), params).apply(params, ids, mask)
    np.testing.assert_allclose(np.asarray(full), np.asarray(dense), rtol=1e-6, atol=1e-6)
    sparse = Model(_cfg(5), params)
    assert float(jnp.max(jnp.abs(sparse.apply(params, ids, mask) - dense))) > 1e-4
    feats, _, n = turn_features(sparse.apply, params, ["model.layers.1.mlp.down_proj"],
                                TurnBatch(ids, mask, labels))
    keys = np.asarray(feats["model.layers.1.mlp.down_proj"].keys[: int(n)])
    assert keys.shape == (12, 64) and ((keys != 0).sum(1) <= 5).all() and ((keys != 0).sum(1) >= 1).all()


def test_sparse_code_is_refused_by_hf_export_and_checked():
    with pytest.raises(CheckpointError, match="mlp_topk"):
        config_to_hf(_cfg(4))
    with pytest.raises(ValueError, match="mlp_topk"):
        _cfg(65)
    with pytest.raises(ValueError, match="Llama-family"):
        ModelConfig(arch="gpt2", vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=64, mlp_topk=4)
