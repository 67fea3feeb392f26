"""Staged pretraining of a world model: an interrupted run resumed from its epoch checkpoints ends where one
uninterrupted run ends, bit for bit; other settings are refused."""

import os
import shutil

import jax
import numpy as np
import pytest

from lnjax.io import checkpoint
from lnjax.models import ModelConfig
from lnjax.world import World, WorldSpec

from fixtures import experiment_module


def _pretrain():
    return experiment_module("pretrain_world")


def test_resumed_pretraining_equals_one_run_and_refuses_other_settings(tmp_path):
    pw = _pretrain()
    world = World(WorldSpec(seed=3, n_subjects=24, n_answers=4))
    cfg = ModelConfig(arch="llama", vocab_size=len(world.vocab), d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      d_ff=32, max_positions=32, activation="relu")
    kw = dict(epochs=3, batch_size=16, lr=1e-2, warmup_steps=2, label_smoothing=0.1, log=None)
    straight, rep = pw.train(world, cfg, **kw)
    assert len(rep["loss_by_epoch"]) == 3
    ck = str(tmp_path / "ck")
    pw.train(world, cfg, **{**kw, "epochs": 3}, checkpoint_dir=ck)
    # keep only the first epoch, as if the run had been killed after it
    for name in ("epoch_0002", "epoch_0003"):
        shutil.rmtree(os.path.join(ck, name))
    resumed, rep2 = pw.train(world, cfg, **kw, checkpoint_dir=ck, resume=True)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rep2["loss_by_epoch"] == rep["loss_by_epoch"]
    with pytest.raises(checkpoint.ConfigMismatch, match="lr"):
        pw.train(world, cfg, **{**kw, "lr": 2e-2}, checkpoint_dir=ck, resume=True)


def test_memory_flags_build_a_memory_model_that_trains():
    pw = _pretrain()
    world = World(WorldSpec(seed=3, n_subjects=24, n_answers=4))
    args = pw.build_parser().parse_args(["--memory-layers", "0", "--memory-slots", "64", "--memory-threshold", "2",
                                         "--d-model", "16", "--layers", "1", "--d-ff", "32"])
    cfg = pw.architecture(args, world)
    assert (cfg.memory_layers, cfg.memory_slots, cfg.memory_threshold) == ((0,), 64, 2.0)
    assert (cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.vocab_size) == (16, 1, 32, len(world.vocab))
    cfg = ModelConfig(**{**cfg.__dict__, "n_heads": 2, "n_kv_heads": 1})
    params, rep = pw.train(world, cfg, epochs=2, batch_size=16, lr=1e-2, warmup_steps=2, log=None)
    value = np.asarray(params["model"]["layers"][0]["memory"]["value_proj"]["kernel"])
    assert value.shape == (64, 16) and np.all(np.isfinite(rep["loss_by_epoch"]))
    # trained with the model: the memory's values moved from their initialisation
    init = np.asarray(pw.init_params(cfg, jax.random.PRNGKey(0), std=0.02)["model"]["layers"][0]["memory"]
                      ["value_proj"]["kernel"])
    assert not np.allclose(value, init)
