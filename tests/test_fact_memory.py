"""The fact-keyed memory (``ModelConfig.memory_code="cosine"``, ``memory_anchor``, ``memory_winner``) against a
float64 NumPy reference, its refusals, and the default testbed of ``lnjax run`` (``lnjax.world.memory_testbed``): it
computes what its base model does, and every fact reads a slot of its own at each answer position."""

import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.app import hparams
from lnjax.world import memory_testbed
from lnjax.world import world_model
from lnjax.models import ModelConfig
from lnjax.models.layers import anchored, memory_read
from lnjax.models.probe import turn_features
from lnjax.core.turns import pack
from lnjax.world import default_world

from fixtures import random_memory


def test_anchored_reads_at_the_latest_anchor_for_offsets_positions():
    ids = jnp.asarray([[5, 9, 6, 7, 8, 4, 6, 3], [6, 1, 1, 1, 1, 1, 1, 1]])
    source, hot = anchored(ids, 6, 3)
    np.testing.assert_array_equal(np.asarray(source), [[0, 0, 2, 2, 2, 2, 6, 6], [0, 0, 0, 0, 0, 0, 0, 0]])
    offset = np.where(np.asarray(hot).any(-1), np.asarray(hot).argmax(-1), -1)
    np.testing.assert_array_equal(offset, [[-1, -1, 0, 1, 2, -1, 0, 1], [0, 1, 2, -1, -1, -1, -1, -1]])
    assert anchored(ids, -1, 1) is None


def _reference(x, ids, mem, t, anchor, offsets, winner):
    """float64: whiten, read the input at the latest anchor, cosine against unit keys, relu(cos - t) / (1 - t),
    keep the best key (winner), one copy of the keys per offset from the anchor."""
    B, L, _ = x.shape
    keys = mem["key_proj"]["kernel"].shape[1]
    out = np.zeros((B, L, mem["value_proj"]["kernel"].shape[1]))
    for b in range(B):
        for i in range(L):
            a = max([p for p in range(i + 1) if ids[b, p] == anchor], default=None)
            if a is None or i - a >= offsets:
                continue
            u = x[b, a] @ mem["in_proj"]["kernel"] + mem["in_proj"]["bias"]
            cos = (u / np.linalg.norm(u)) @ mem["key_proj"]["kernel"]
            c = np.maximum(cos - t, 0) / (1 - t)
            if winner:
                c = np.where(cos >= cos.max(), c, 0.0)
            code = np.zeros(keys * offsets)
            code[(i - a) * keys:(i - a + 1) * keys] = c
            out[b, i] = code @ mem["value_proj"]["kernel"]
    return out


@pytest.mark.parametrize("winner", [False, True])
def test_anchored_cosine_read_matches_float64_reference(winner):
    rng = np.random.default_rng(0)
    d, keys, offsets, t = 8, 6, 3, 0.2
    mem = random_memory(rng, d, keys, offsets)
    ids = np.asarray([[2, 7, 3, 4, 5, 6, 7, 1], [7, 2, 2, 7, 2, 2, 2, 2]])
    x = rng.normal(size=(2, 8, d))
    want = _reference(x, ids, mem, t, 7, offsets, winner)
    got = memory_read(jnp.asarray(x, jnp.float32), {m: {n: jnp.asarray(a, jnp.float32) for n, a in p.items()}
                                                    for m, p in mem.items()},
                      t, "cosine", anchored(jnp.asarray(ids), 7, offsets), winner)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_config_refuses_inconsistent_memory_options():
    base = dict(arch="llama", vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                memory_layers=(1,), memory_slots=30, memory_threshold=0.5)
    for bad, match in [(dict(memory_code="dot"), "memory_code"),
                       (dict(memory_code="cosine", memory_threshold=1.5), r"\(-1, 1\)"),
                       (dict(memory_code="cosine", memory_anchor=3, memory_offsets=4), "divide"),
                       (dict(memory_anchor=3, memory_offsets=3), "cosine"),
                       (dict(memory_code="cosine", memory_anchor=40, memory_offsets=3), "anchor token"),
                       (dict(memory_winner=True), "memory_winner")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**{**base, **bad})
    ModelConfig(**{**base, "memory_threshold": 0.9}, memory_code="cosine", memory_anchor=3, memory_offsets=3,
                memory_winner=True)


def test_default_testbed_matches_its_base_and_gives_every_fact_its_own_slots():
    model = memory_testbed.default_testbed()
    base = world_model.load(memory_testbed.BASE_DIR)
    cfg = model.config
    assert (cfg.memory_layers, cfg.memory_code, cfg.memory_offsets, cfg.memory_winner) == ((3,), "cosine", 3, True)
    world = default_world()
    n = world.n_facts
    assert cfg.memory_slots == 3 * n
    sample = np.random.default_rng(0).choice(n, 150, replace=False)
    target = memory_testbed.DEFAULT_TARGETS[0]
    for pairs in world_model.fact_examples(world):
        batch = pack([pairs[i] for i in sample])
        np.testing.assert_allclose(np.asarray(model.apply(model.params, batch.input_ids, batch.attention_mask)),
                                   np.asarray(base.apply(base.params, batch.input_ids, batch.attention_mask)),
                                   rtol=1e-5, atol=1e-4)
        feats, _, rows = turn_features(model.apply, model.params, [target], batch)
        keys = np.asarray(feats[target].keys[:int(rows)])
        # answer row j of fact f fires slot j * n + f (its own fact, at its offset) and nothing else
        want = np.concatenate([np.arange(len(pairs[f][1])) * n + f for f in sample])
        assert ((keys > 0).sum(1) <= 1).all()
        assert np.mean(keys.argmax(1) == want) >= 0.95


def test_run_defaults_on_the_testbed_use_its_hyperparameters():
    got = hparams.resolve("ultraedit", dataset="world", turns=20)
    assert (got["lr"], got["alpha"]) == (hparams.FAIR_TESTBED_HPARAMS["ultraedit"]["lr"],
                                         hparams.FAIR_TESTBED_HPARAMS["ultraedit"]["alpha"])
    dense = hparams.resolve("ultraedit", dataset="world", turns=20, model=world_model.ASSET_DIR)
    assert dense["lr"] == hparams.WORLD_HPARAMS["ultraedit"]["lr"]
    assert hparams.TESTBED_HPARAMS["no_normalization"]["lr"] == hparams.TESTBED_HPARAMS["ultraedit"]["lr"]
