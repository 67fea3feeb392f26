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


def test_turn_from_the_kept_residual_stream_equals_the_full_turn():
    """A turn whose probe starts from the unedited residual stream entering the lowest edited block
    (``EditTurn.stream``, as ``PreparedEdits.streamed_turns`` builds it from the unedited evaluation's kept states)
    gives the features, the shifts, the diagnostics' edit accuracy and the evaluation of the full forward pass,
    over a run of several turns with a warm-up turn; a target below the stream's block is refused."""
    import dataclasses
    from lnjax.eval.prepare import prepare_edits
    from lnjax.world import default_world
    from fixtures import TINY_3_LAYERS
    world = default_world()
    tok = world.tokenizer()
    model = tiny_model(cfg=dataclasses.replace(TINY_3_LAYERS, vocab_size=tok.vocab_size), std=0.4)
    targets = ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")
    job = prepare_edits(world.records("edit", 40, seed=2), tok, model, edits_per_turn=10,
                        warmup_records=world.records("train", 10, seed=2), targets=targets)
    assert job.eval_set.prefix is not None and job.eval_set.prefix.start == 1
    warm = job.warmup_turns(1)
    streamed, warm_streamed = job.streamed_turns(model, warm)
    assert streamed.stream.shape == (4, 10, job.length, 16) and warm_streamed.stream_start == 1
    one = jax.tree_util.tree_map(lambda a: a[1], streamed)
    fa, la, na = turn_features(model.apply, model.params, targets, one.edit, max_rows=40)
    fb, lb, nb = turn_features(model.apply, model.params, targets, one.edit, max_rows=40, stream=one.stream,
                               stream_start=1)
    assert int(na) == int(nb) > 0
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
    # the kept stream was computed in the evaluation's call shapes, not the turn's: float32 rounding apart, equal
    for t in targets:
        for name in ("keys", "value_grads"):
            a, b = np.asarray(getattr(fa[t], name)), np.asarray(getattr(fb[t], name))
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
    with pytest.raises(ValueError, match="never applied"):
        turn_features(model.apply, model.params, ("model.layers.0.mlp.down_proj",), one.edit, max_rows=40,
                      stream=one.stream, stream_start=1)
    editor = lx.editors.get("ultraedit", lr=1.0)
    kw = dict(minibatch_size=10, track_accuracy=True, progress=False)
    full = edit_sequence(model, editor, job.turns, targets, warmup=warm, **kw)
    fast = edit_sequence(model, editor, streamed, targets, warmup=warm_streamed, **kw)
    for t in targets:
        a, b = (np.asarray(get_module(r.params, t)["kernel"]) for r in (full, fast))
        assert np.abs(a - np.asarray(get_module(model.params, t)["kernel"])).max() > 1e-3  # the run edits
        # LN divides by the turn's feature spread, so the rounding above grows to ~4e-5 of the shift's size
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * np.abs(a).max())
    np.testing.assert_allclose(fast.diagnostics["accuracy"], full.diagnostics["accuracy"], atol=1e-6)
    # an evaluation set holding some of the edits only: the other rows' streams are computed, to the same values
    part = prepare_edits(world.records("edit", 40, seed=2), tok, model, edits_per_turn=10,
                         eval_records=np.arange(3, 40, 4), targets=targets)
    some, _ = part.streamed_turns(model)
    np.testing.assert_allclose(some.stream, streamed.stream, rtol=1e-5, atol=1e-5 * np.abs(streamed.stream).max())
    protocols = ("teacher_forced", "locality_vs_unedited")
    plain = lx.eval.EvalSet(job.eval_set.batches, job.eval_set.pairs)
    assert (lx.eval.evaluate(model.apply, fast.params, job.eval_set, job.base_loc, protocols)
            == lx.eval.evaluate(model.apply, fast.params, plain, job.base_loc, protocols))


def test_supervised_argmax_equals_the_full_logits_argmax():
    from lnjax.models.probe import supervised_argmax
    model = tiny_model()
    batch = pack(_examples(13, seed=4), 24)
    sup = np.asarray(batch.labels) != -100
    want = np.where(sup, np.asarray(jnp.argmax(model.apply(model.params, batch.input_ids, batch.attention_mask), -1)),
                    -1)
    for max_rows in (int(sup.sum()), int(sup.sum()) + 7):
        got = jax.jit(lambda p, b: supervised_argmax(model.apply, p, b, max_rows))(model.params, batch)
        np.testing.assert_array_equal(np.asarray(got), want)
    opaque = lambda p, i, a: model.apply(p, i, a)
    np.testing.assert_array_equal(np.asarray(supervised_argmax(opaque, model.params, batch, 5)), want)
