"""Numerical faults around the non-finite-turn rule (``lnjax.core.protocol.reject_nonfinite``): a turn whose edits
are all padding, a target whose keys are all zero, α = 0 and a huge lr are each either rejected whole (state
unchanged, ``rejected`` counted) or handled as a zero shift with the statistics unchanged — and ``lnjax run``
counts them in results.json (``rejected_turns``, ``empty_turns`` per editor)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax as lx
from lnjax.app import cli
from lnjax.core.turns import IGNORE
from lnjax.engine.sequence import NonFiniteShift, edit_sequence
from lnjax.models import get_module

from fixtures import small_model_and_turns

TARGETS = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
LN_EDITORS = ("ultraedit", "stableedit", "no_normalization", "stableedit_algorithm1")


def _kernel(params, t=TARGETS[0]):
    return np.asarray(get_module(params, t)["kernel"])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _features(rng, n, zero_keys=False, d_in=6, d_out=4):
    keys = np.zeros((n, d_in), np.float32) if zero_keys else rng.normal(size=(n, d_in)).astype(np.float32)
    return lx.Features(keys=jnp.asarray(keys), value_grads=jnp.asarray(rng.normal(size=(n, d_out)), jnp.float32))


@pytest.mark.parametrize("name", ("ultraedit", "stableedit"))
def test_a_turn_of_padding_is_a_zero_shift_with_statistics_unchanged(name):
    model, tb = small_model_and_turns(3)
    labels = np.asarray(tb.labels).copy()
    labels[1] = IGNORE                       # turn 1: every edit is padding (no supervised position)
    padded = tb.replace(labels=labels)
    without = jax.tree_util.tree_map(lambda a: np.asarray(a)[[0, 2]], tb)
    ed = lx.editors.get(name)
    a = edit_sequence(model, ed, padded, TARGETS, chunk=3, progress=False)
    b = edit_sequence(model, ed, without, TARGETS, chunk=3, progress=False)
    assert a.diagnostics["rows"][1] == 0 and np.all(a.diagnostics["delta_norm"][1] == 0)
    assert a.diagnostics["rejected"].tolist() == [0, 0, 0]
    for t in TARGETS:  # the padding turn changed nothing: the same as a run without it
        np.testing.assert_array_equal(_kernel(a.params, t), _kernel(b.params, t))
    for x, y in zip(_leaves(a.editor_state.stats), _leaves(b.editor_state.stats)):
        np.testing.assert_array_equal(x, y)
    assert int(a.editor_state.turns) == int(b.editor_state.turns) + 1  # counted as a turn, applied as zero


@pytest.mark.parametrize("name", LN_EDITORS)
def test_all_zero_keys_give_that_target_a_zero_shift(name):
    rng = np.random.default_rng(1)
    ed = lx.editors.get(name)
    state = ed.init({"a": (6, 4), "b": (6, 4)})
    for _ in range(2):  # also after statistics exist
        deltas, state = ed.update({"a": _features(rng, 5, zero_keys=True), "b": _features(rng, 5)}, state)
        assert float(jnp.abs(deltas["a"]).max()) == 0.0 and float(jnp.abs(deltas["b"]).max()) > 0
        assert int(state.rejected) == 0 and all(np.isfinite(x).all() for x in _leaves(state))


@pytest.mark.parametrize("name", ("ultraedit", "stableedit", "no_normalization"))
def test_alpha_zero_is_exact_when_solvable_and_rejected_when_singular(name):
    rng = np.random.default_rng(2)
    ed = lx.editors.get(name, alpha=0.0)
    state = ed.init({"a": (6, 4)})
    deltas, ok = ed.update({"a": _features(rng, 5)}, state)          # 5 independent keys in 6 dims: solvable
    assert int(ok.rejected) == 0 and np.isfinite(np.asarray(deltas["a"])).all()
    assert float(jnp.abs(deltas["a"]).max()) > 0
    f = _features(rng, 5)
    f = lx.Features(keys=jnp.tile(f.keys[:1], (5, 1)), value_grads=f.value_grads)  # rank 1: singular without ridge
    deltas, bad = ed.update({"a": f}, state)
    assert int(bad.rejected) == 1 and int(bad.turns) == 0
    assert float(jnp.abs(deltas["a"]).max()) == 0.0
    for x, y in zip(_leaves(state.stats), _leaves(bad.stats)):  # statistics as before the turn
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        lx.editors.get(name, alpha=-1.0)


@pytest.mark.parametrize("lr", (1e30,))
def test_a_huge_lr_is_rejected_whole(lr):
    """lr = 1e30 gives finite entries (~1e30) whose squared norm overflows float32: rejected like an inf, since
    the weights it would leave could not be edited back."""
    model, tb = small_model_and_turns(3)
    ed = lx.editors.ultraedit(lr=lr)
    res = edit_sequence(model, ed, tb, TARGETS, chunk=2, progress=False)
    assert res.diagnostics["rejected"].tolist() == [1, 2, 3] and int(res.editor_state.turns) == 0
    for t in TARGETS:
        np.testing.assert_array_equal(_kernel(res.params, t), _kernel(model.params, t))
    with pytest.raises(NonFiniteShift, match="turn 0"):
        edit_sequence(model, ed, tb, TARGETS, chunk=2, progress=False, on_nonfinite="stop")


def test_run_counts_rejected_and_empty_turns_in_results(tmp_path):
    world_model = str(Path(__file__).resolve().parents[1] / "lnjax" / "assets" / "world_model")
    out = tmp_path / "out"
    assert cli.main(["run", "--model", world_model, "--editor", "ultraedit", "--lr", "1e30", "--alpha", "1", "--turns", "2",
                     "--edits-per-turn", "4", "--eval-every", "0", "--no-generation", "--quiet", "--out",
                     str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["editors"]["ultraedit"]
    assert m["rejected_turns"] == 2 and m["empty_turns"] == 0
    assert m["teacher_forced"] == res["unedited"]["teacher_forced"]  # nothing was applied
