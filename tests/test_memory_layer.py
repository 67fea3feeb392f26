"""The memory-layer option (``ModelConfig.memory_layers``): the read against a float64 NumPy reference, the code
moments, an empty memory leaving the model unchanged, the probe's keys on ``memory.value_proj``, save/load, and
the refusals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.world import world_model
from lnjax.io.checkpoint import CheckpointError
from lnjax.models import Model, ModelConfig, init_params
from lnjax.models.layers import memory_read
from lnjax.models.llama import config_to_hf
from lnjax.models.probe import TurnBatch, turn_features


def _cfg(layers=(1,), slots=256, threshold=2.0):
    return ModelConfig(arch="llama", vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                       max_positions=16, memory_layers=layers, memory_slots=slots, memory_threshold=threshold)


def _reference_code(x, kernel, bias, t):
    """float64: z-score the slot scores per token, threshold at t, standardize with N(0,1) moments integrated
    numerically (not the closed form the library uses)."""
    s = x @ kernel + bias
    z = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-6)
    grid = np.linspace(t, t + 12, 200001)
    pdf = np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi)
    mean = np.trapezoid((grid - t) * pdf, grid)
    var = np.trapezoid((grid - t) ** 2 * pdf, grid) - mean ** 2
    return (np.maximum(z - t, 0) - mean) / math.sqrt(var)


def test_memory_read_matches_float64_reference_and_codes_are_standardized():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 16))
    mem = {"key_proj": {"kernel": rng.normal(size=(16, 4096)) / 4, "bias": rng.normal(size=(4096,)) * 0.1},
           "value_proj": {"kernel": rng.normal(size=(4096, 16))}}
    code = _reference_code(x, mem["key_proj"]["kernel"], mem["key_proj"]["bias"], 2.5)
    got = memory_read(jnp.asarray(x, jnp.float32), jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                                                         mem), 2.5)
    np.testing.assert_allclose(np.asarray(got), code @ mem["value_proj"]["kernel"], rtol=2e-3, atol=2e-3)
    big = _reference_code(rng.normal(size=(2000, 16)), rng.normal(size=(16, 2048)), np.zeros(2048), 2.5)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.05   # about unit variance, as documented
    assert 0.002 < (big > 0).mean() < 0.012                         # ~0.6% of slots fire at 2.5 std


def test_empty_memory_leaves_the_model_unchanged_and_probe_reads_its_code():
    cfg = _cfg()
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert set(params["model"]["layers"][1]["memory"]) == {"key_proj", "value_proj"}
    assert "memory" not in params["model"]["layers"][0]
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 40, (4, 9)))
    mask = jnp.ones_like(ids)
    plain_cfg = _cfg(layers=(), slots=0)
    plain = {"model": dict(params["model"], layers=[params["model"]["layers"][0],
                                                   {k: v for k, v in params["model"]["layers"][1].items()
                                                    if k != "memory"}]), "lm_head": params["lm_head"]}
    empty = jax.tree_util.tree_map(lambda a: a, params)
    empty["model"]["layers"][1]["memory"]["value_proj"]["kernel"] = jnp.zeros((256, 16))
    want = Model(plain_cfg, plain).apply(plain, ids, mask)
    np.testing.assert_allclose(np.asarray(Model(cfg, empty).apply(empty, ids, mask)), np.asarray(want),
                               rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(Model(cfg, params).apply(params, ids, mask) - want))) > 1e-5
    labels = jnp.where(jnp.arange(9) >= 6, ids, -100)
    target = "model.layers.1.memory.value_proj"
    feats, _, n = turn_features(Model(cfg, params).apply, params, [target], TurnBatch(ids, mask, labels))
    keys = np.asarray(feats[target].keys[: int(n)])
    assert keys.shape == (12, 256) and np.isfinite(keys).all()
    low = keys.min()
    assert ((keys > low + 1e-3).sum(1) < 256 * 0.2).all()   # a sparse code: most slots sit at the floor


def test_memory_model_saves_and_loads(tmp_path):
    cfg = _cfg(layers=[0, 1])
    assert cfg.memory_layers == (0, 1)
    params = init_params(cfg, jax.random.PRNGKey(2))
    world_model.save(str(tmp_path), cfg, params, {"note": "test"})
    back = world_model.load(str(tmp_path))
    assert back.config == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_memory_options_are_checked_and_refused_by_hf_export():
    with pytest.raises(CheckpointError, match="memory_layers"):
        config_to_hf(_cfg())
    with pytest.raises(ValueError, match="distinct blocks"):
        _cfg(layers=(2,))
    with pytest.raises(ValueError, match="memory_slots"):
        _cfg(slots=0)
    with pytest.raises(ValueError, match="Llama-family"):
        ModelConfig(arch="gpt2", vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=64, memory_layers=(0,),
                    memory_slots=8)
