import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax as lx
from lnjax.core.turns import pack, pack_turns
from lnjax.models import get_module
from lnjax.models.probe import TurnBatch, turn_features
from lnjax.engine.sequence import edit_sequence, init_carry, make_turn_fn, schedule

from fixtures import TARGETS as _TARGETS, random_examples as _examples, tiny_model

TARGETS = list(_TARGETS)


def _model(seed=0):
    return tiny_model(seed)


def test_pack_turns_sorts_longest_first_and_aligns_labels():
    ex = [([5, 6], [7]), ([1, 2, 3], [4, 9]), ([8], [3, 3, 3])]
    tb, order = pack_turns(ex, 2)
    assert tb.input_ids.shape == (2, 2, 4)
    assert order.tolist() == [[1, 0], [2, -1]]
    np.testing.assert_array_equal(tb.input_ids[0, 0], [1, 2, 3, 4])
    np.testing.assert_array_equal(tb.labels[0, 0], [-100, -100, 4, 9])
    np.testing.assert_array_equal(tb.labels[0, 1], [-100, 7, -100, -100])
    assert tb.attention_mask[1, 1].sum() == 0 and (tb.labels[1, 1] == -100).all()
    with pytest.raises(ValueError, match="example 0 has 4 tokens"):
        pack([([1, 2, 3], [4, 5])], length=3)


def test_probe_value_grads_equal_separate_minibatch_passes():
    model = _model()
    ex = _examples(25)
    tb, _ = pack_turns(ex, 25)
    turn = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), tb)
    probe = jax.jit(lambda p, b: turn_features(model.apply, p, TARGETS, b, minibatch_size=10))
    feats, loss, n_rows = probe(model.params, turn)
    n = int(n_rows)
    rows = {t: [] for t in TARGETS}
    for s in range(3):   # the reference: one forward/backward per mini-batch of 10
        mb = jax.tree_util.tree_map(lambda a: a[s * 10:(s + 1) * 10], turn)
        f, _, _ = probe(model.params, mb)
        m = np.asarray(f[TARGETS[0]].mask)
        for t in TARGETS:
            rows[t].append((np.asarray(f[t].keys)[m], np.asarray(f[t].value_grads)[m]))
    for t in TARGETS:
        keys = np.concatenate([k for k, _ in rows[t]])
        grads = np.concatenate([g for _, g in rows[t]])
        np.testing.assert_allclose(np.asarray(feats[t].keys)[:n], keys, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(feats[t].value_grads)[:n], grads, rtol=1e-5,
                                   atol=1e-5 * np.abs(grads).max())
    assert np.asarray(feats[TARGETS[0]].segment)[:n].max() == 2


def test_probe_features_reproduce_the_kernel_gradient():
    """With every real position supervised and one mini-batch, sum_i k_i g_iᵀ = dLoss/dW."""
    model = _model(1)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 61, (3, 7)).astype(np.int32)
    mask = np.ones((3, 7), np.int32)
    mask[1, 5:] = 0
    labels = np.where(mask == 1, rng.integers(1, 61, (3, 7)), -100).astype(np.int32)
    batch = TurnBatch(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels))
    feats, _, _ = jax.jit(lambda p, b: turn_features(model.apply, p, TARGETS, b, minibatch_size=3))(
        model.params, batch)

    def loss(kernel):
        p = lx.models.with_module_leaf(model.params, TARGETS[1], "kernel", kernel)
        logits = model.apply(p, batch.input_ids, batch.attention_mask)
        ce, sup = lx.models.probe.token_log_likelihood(logits, batch.labels)
        return jnp.sum(ce) / jnp.sum(sup)

    expected = jax.jit(jax.grad(loss))(get_module(model.params, TARGETS[1])["kernel"])
    f = feats[TARGETS[1]]
    got = np.asarray(f.keys).T @ (np.asarray(f.value_grads) * np.asarray(f.mask)[:, None])
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-4, atol=1e-7)


def test_scan_equals_python_loop_bit_for_bit():
    model = _model()
    tb, _ = pack_turns(_examples(60), 10)
    editor = lx.editors.stableedit(lr=0.05, alpha=1.0)
    res = edit_sequence(model, editor, tb, TARGETS, chunk=4, progress=False)
    turn = jax.jit(make_turn_fn(model.apply, editor, TARGETS, max_rows=res.diagnostics["rows"].max()))
    frozen, carry = init_carry(model.params, editor, TARGETS)
    for t in range(tb.input_ids.shape[0]):
        xs = (jax.tree_util.tree_map(lambda a: jnp.asarray(a[t]), tb), jnp.asarray(False), jnp.asarray(True))
        carry, _ = turn(carry, frozen, xs)
    for name in TARGETS:
        np.testing.assert_array_equal(np.asarray(carry.kernels[name]),
                                      np.asarray(get_module(res.params, name)["kernel"]))
    # the caller's parameters survive the donated run
    assert np.isfinite(np.asarray(get_module(model.params, TARGETS[0])["kernel"])).all()


def test_500_turns_compile_once():
    model = _model()
    def apply(params, ids, mask):
        return model.apply(params, ids, mask)

    counted = types.SimpleNamespace(params=model.params, apply=chex.assert_max_traces(apply, n=1))
    tb, _ = pack_turns(_examples(1000, seed=3), 2)
    assert tb.input_ids.shape[0] == 500
    res = edit_sequence(counted, lx.editors.ultraedit(lr=0.01), tb, TARGETS, chunk=50, progress=False)
    assert res.diagnostics["delta_norm"].shape == (500, 2)
    assert np.isfinite(res.diagnostics["delta_norm"]).all()
    chex.clear_trace_counter()


def test_padded_edits_and_rows_change_nothing():
    model = _model()
    ex = _examples(40, seed=5)
    tb, _ = pack_turns(ex, 10)
    wide, _ = pack_turns(ex, 10, length=tb.input_ids.shape[2] + 3)   # padded length
    editor = lx.editors.stableedit(lr=0.05, alpha=1.0)
    a = edit_sequence(model, editor, tb, TARGETS, chunk=3, progress=False)
    b = edit_sequence(model, editor, wide, TARGETS, chunk=3, progress=False, max_rows=200)
    for name in TARGETS:
        w = np.asarray(get_module(model.params, name)["kernel"])
        dx = np.asarray(get_module(a.params, name)["kernel"]) - w
        dy = np.asarray(get_module(b.params, name)["kernel"]) - w
        # the runs must edit (here ‖Δ‖ ≈ 3‖W‖) before their shifts can be compared, relative to the shift
        assert np.linalg.norm(dx) > 0.1 * np.linalg.norm(w)
        assert np.abs(dx - dy).max() < 2e-5 * np.abs(dx).max()   # measured 3e-6


def test_warmup_block_positions_and_flags():
    model = _model()
    tb, _ = pack_turns(_examples(80), 10)
    warm, _ = pack_turns(_examples(20, seed=9), 10, length=tb.input_ids.shape[2])
    for where, pos in [("start", 0), ("q1", 2), ("middle", 4), ("q3", 6), ("end", 7)]:
        _, flags, tt = schedule(tb, warm, where)
        assert flags.tolist() == [False] * pos + [True, True] + [False] * (8 - pos)
        assert tt.tolist() == list(range(pos)) + [-1, -1] + list(range(pos, 8))
    _, flags, _ = schedule(tb, warm, "none")
    assert not flags.any()
    res = edit_sequence(model, lx.editors.stableedit(lr=0.05), tb, TARGETS, warmup=warm, warmup_at="middle",
                        chunk=4, progress=False, track_accuracy=True)
    assert res.diagnostics["warmup"].sum() == 2 and res.diagnostics["accuracy"].shape == (10,)
    with pytest.raises(ValueError, match="warmup_at"):
        schedule(tb, warm, "late")


def test_unknown_target_path_is_reported():
    with pytest.raises(KeyError, match="model.layers.7"):
        edit_sequence(_model(), lx.editors.ultraedit(), pack_turns(_examples(4), 2)[0],
                      ["model.layers.7.mlp.down_proj"], progress=False)


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_probe_projecting_only_supervised_positions_equals_the_full_logits(positions):
    """``Model.apply`` splits (hidden states, vocabulary projection), so the probe projects only the supervised
    positions; an opaque ``apply`` gives every position's logits. Loss, keys and value gradients agree."""
    model = tiny_model()
    batch = pack(_examples(13, seed=3), 32)
    opaque = lambda p, i, a: model.apply(p, i, a)   # not a partial of the architecture: cannot be split
    assert lx.models.split_apply(model.apply) is not None and lx.models.split_apply(opaque) is None
    got = [jax.jit(lambda p, b, ap=ap: turn_features(ap, p, _TARGETS, b, minibatch_size=4, positions=positions))(
        model.params, batch) for ap in (model.apply, opaque)]
    (fa, la, na), (fb, lb, nb) = got
    assert int(na) == int(nb) > 0 and float(la) > 0
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    for t in _TARGETS:
        g = np.asarray(fb[t].value_grads)
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(np.asarray(fa[t].value_grads), g, rtol=1e-5, atol=1e-6 * np.abs(g).max())
        np.testing.assert_array_equal(np.asarray(fa[t].keys), np.asarray(fb[t].keys))
