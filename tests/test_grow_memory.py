"""lnjax.world.memory_testbed (what experiments/memory_testbed.py runs): the grown model computes what the shipped one does
(empty memories), its memory input is centred and whitened on train-pool prompts, and it saves and loads as a
world model."""

import numpy as np

from lnjax import data
from lnjax.world import memory_testbed
from lnjax.world import world_model
from lnjax.world import default_world


def test_whitening_centres_and_whitens_float64():
    x = np.random.default_rng(0).normal(size=(4000, 6)) @ np.diag([5.0, 2, 1, 1, 0.5, 0.1]) + 3.0
    mean, w = memory_testbed.whitening(x, 0.0)
    y = (x - mean) @ w
    np.testing.assert_allclose(np.cov(y.T), np.eye(6), atol=1e-8)
    _, ident = memory_testbed.whitening(x, -1)
    np.testing.assert_array_equal(ident, np.eye(6))


def test_grown_model_matches_base_and_centres_its_memory_input(tmp_path):
    base = world_model.default_model()
    grown = memory_testbed.grow(base, (2,), 512, 3.0, 1e-3)
    assert grown.config.memory_layers == (2,) and grown.config.memory_slots == 512
    world = default_world()
    tok = world.tokenizer()
    prompts = [world.prompt(s, 0, 0) for s in world.pools["train"][:16]]
    ids = np.asarray([tok.encode(p) for p in prompts])
    mask = np.ones_like(ids)
    np.testing.assert_allclose(np.asarray(grown.apply(grown.params, ids, mask)),
                               np.asarray(base.apply(base.params, ids, mask)), rtol=1e-5, atol=1e-4)
    # centred on the train pool: the slot scores (whitened input times the random slot directions) of the memory's
    # input at the answer rows of the train-pool prompts the whitening was fitted on have mean 0, while the same
    # projection of the uncentred input does not
    recs = data.tokenize(data.records_from_dicts("zsre", world.records("train", len(world.all_facts("train"))),
                                                 "world"), tok)
    keys, _ = memory_testbed.memory_inputs(base, (2,), [r.edit for r in recs] + [r.paraphrase for r in recs])
    x = keys["model.layers.2.memory.key_proj"]
    proj = grown.params["model"]["layers"][2]["memory"]["key_proj"]
    kernel, bias = np.asarray(proj["kernel"], np.float64), np.asarray(proj["bias"], np.float64)
    scores = x @ kernel + bias
    spread = scores.std(0).mean()
    assert np.abs((x @ kernel).mean(0)).mean() > 0.1 * spread      # the raw input is far from centred
    assert np.abs(scores.mean(0)).max() < 1e-4 * spread
    world_model.save(str(tmp_path), grown.config, grown.params, {"test": True})
    back = world_model.load(str(tmp_path))
    assert back.config == grown.config
