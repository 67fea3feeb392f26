import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax as lx
from reference_np import RefStats, ref_turn

D_IN, D_OUT = 24, 10


def _turn(rng, names=("a", "b"), n=40, num_seg=4):
    seg = np.sort(rng.integers(0, num_seg, n)).astype(np.int32)   # ragged mini-batches
    mask = rng.random(n) > 0.2
    feats, ref = {}, {}
    for name in names:
        K = (rng.normal(size=(n, D_IN)) * 2 + 1).astype(np.float32)
        G = (rng.normal(size=(n, D_OUT)) * 0.5 - 0.3).astype(np.float32)
        feats[name] = lx.Features(keys=K, value_grads=G, mask=mask, segment=seg, num_segments=num_seg)
        ref[name] = (K.astype(np.float64), G.astype(np.float64), mask, seg, f"{D_IN}x{D_OUT}")
    return feats, ref


@pytest.mark.parametrize("kind", ["ultraedit", "stableedit"])
def test_parity_with_float64_reference_over_50_turns(kind):
    rng = np.random.default_rng(0)
    if kind == "ultraedit":
        ed, ddof, whiten, alpha = lx.editors.ultraedit(lr=1e-2, alpha=1.0), 1, False, 1.0
    else:
        ed, ddof, whiten, alpha = lx.editors.stableedit(lr=1e-2, alpha=10.0), 0, True, 10.0
    state = ed.init({"a": (D_IN, D_OUT), "b": (D_IN, D_OUT)})
    ref = {f"{D_IN}x{D_OUT}": RefStats(D_IN, D_OUT, ddof)}
    update = jax.jit(ed.update)
    worst = 0.0
    for _ in range(50):
        feats, rf = _turn(rng)
        deltas, state = update(feats, state)
        expected = ref_turn(ref, rf, ["a", "b"], 1e-2, alpha, whiten)
        for name in "ab":
            assert deltas[name].shape == (D_IN, D_OUT) and deltas[name].dtype == jnp.float32
            worst = max(worst, np.abs(np.asarray(deltas[name]) - expected[name]).max() / np.abs(expected[name]).max())
    assert worst < 1e-5
    assert int(state.stats[f"{D_IN}x{D_OUT}"].count) == ref[f"{D_IN}x{D_OUT}"].n
    assert int(state.turns) == 50 and int(state.rejected) == 0


@pytest.mark.parametrize("kind", ["ultraedit", "stableedit"])
def test_key_metric_extension_matches_float64_reference(kind):
    rng = np.random.default_rng(7)
    make = getattr(lx.editors, kind)
    alpha, ddof, whiten = (1.0, 1, False) if kind == "ultraedit" else (10.0, 0, True)
    ed = make(lr=1e-2, alpha=alpha, key_metric="second_moment", key_prior=0.05)
    state = ed.init({"a": (D_IN, D_OUT), "b": (D_IN, D_OUT)})
    ref = {f"{D_IN}x{D_OUT}": RefStats(D_IN, D_OUT, ddof)}
    update = jax.jit(ed.update)
    for _ in range(15):
        feats, rf = _turn(rng)
        deltas, state = update(feats, state)
        expected = ref_turn(ref, rf, ["a", "b"], 1e-2, alpha, whiten, key_prior=0.05)
        for name in "ab":
            err = np.abs(np.asarray(deltas[name]) - expected[name]).max() / np.abs(expected[name]).max()
            assert err < 1e-4, (name, err)
    # without LN the statistics are kept for the metric only: the values are the raw formula's
    feats, rf = _turn(rng, names=("a",), num_seg=1)
    K, G, mask, _, _ = rf["a"]
    d, st = lx.editors.no_normalization(lr=1e-3, alpha=2.0, key_metric="second_moment", key_prior=0.05).update(
        {"a": feats["a"]}, lx.editors.no_normalization(key_metric="second_moment").init({"a": (D_IN, D_OUT)}))
    Km, Gm = K[mask], G[mask]
    A = Km.T @ Km / len(Km)
    A = A + 0.05 * np.mean(np.diag(A)) * np.eye(D_IN)
    V = -1e-3 * np.sum(Km ** 2, 1, keepdims=True) * Gm
    expected = np.linalg.solve(Km.T @ Km + 2.0 * A, Km.T @ V)
    np.testing.assert_allclose(np.asarray(d["a"]), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    with pytest.raises(ValueError, match="key_metric"):
        lx.editors.ultraedit(key_metric="full")


def test_stableedit_warmup_is_diagonal_and_per_target_pooling():
    rng = np.random.default_rng(1)
    ed = lx.editors.stableedit(lr=1e-2, pooling="target")
    state = ed.init({"a": (D_IN, D_OUT), "b": (D_IN, D_OUT)})
    assert set(state.stats) == {"a", "b"}
    ref = {"a": RefStats(D_IN, D_OUT, 0), "b": RefStats(D_IN, D_OUT, 0)}
    for t in range(6):
        feats, rf = _turn(rng)
        rf = {n: v[:4] + (n,) for n, v in rf.items()}
        warm = t < 3
        deltas, state = ed.update(feats, state, warmup=warm)
        expected = ref_turn(ref, rf, ["a", "b"], 1e-2, 10.0, whiten=True, warmup=warm)
        for n in "ab":
            np.testing.assert_allclose(np.asarray(deltas[n]), expected[n], rtol=2e-4,
                                       atol=1e-5 * np.abs(expected[n]).max())


def test_ablation_formulas():
    rng = np.random.default_rng(2)
    feats, rf = _turn(rng, names=("a",), num_seg=1)
    K, G, mask, _, _ = rf["a"]
    Km, Gm = K[mask], G[mask]
    # no normalization: raw keys and gradients in the same formula
    d, _ = lx.editors.no_normalization(lr=1e-3, alpha=2.0).update(
        feats, lx.editors.no_normalization(lr=1e-3, alpha=2.0).init({"a": (D_IN, D_OUT)}))
    V = -1e-3 * np.sum(Km ** 2, 1, keepdims=True) * Gm
    exp = np.linalg.solve(Km.T @ Km + 2.0 * np.eye(D_IN), Km.T @ V)
    np.testing.assert_allclose(np.asarray(d["a"]), exp, rtol=1e-4, atol=1e-5 * np.abs(exp).max())
    # per-turn normalization: the second turn is normalized by its own statistics only
    ed = lx.editors.per_turn_normalization(lr=1e-3, alpha=2.0)
    state = ed.init({"a": (D_IN, D_OUT)})
    _, state = ed.update(feats, state)
    feats2, rf2 = _turn(rng, names=("a",), num_seg=1)
    d2, state = ed.update(feats2, state)
    fresh = {"a": RefStats(D_IN, D_OUT, 0)}
    exp2 = ref_turn(fresh, {"a": rf2["a"][:4] + ("a",)}, ["a"], 1e-3, 2.0, whiten=False)
    np.testing.assert_allclose(np.asarray(d2["a"]), exp2["a"], rtol=1e-4, atol=1e-5 * np.abs(exp2["a"]).max())
    assert int(state.stats[f"{D_IN}x{D_OUT}"].count) == int(rf2["a"][2].sum())


def test_padding_rows_change_nothing():
    rng = np.random.default_rng(3)
    ed = lx.editors.stableedit(lr=1e-2)
    feats, _ = _turn(rng, names=("a",), n=30)
    f = feats["a"]
    extra = 17
    padded = lx.Features(
        keys=np.concatenate([f.keys, rng.normal(size=(extra, D_IN)).astype(np.float32) * 1e3]),
        value_grads=np.concatenate([f.value_grads, rng.normal(size=(extra, D_OUT)).astype(np.float32)]),
        mask=np.concatenate([f.mask, np.zeros(extra, bool)]),
        segment=np.concatenate([f.segment, np.full(extra, 3, np.int32)]), num_segments=4)
    s0 = ed.init({"a": (D_IN, D_OUT)})
    d1, s1 = ed.update(feats, s0)
    d2, s2 = ed.update({"a": padded}, s0)
    scale = np.abs(np.asarray(d1["a"])).max()
    assert np.abs(np.asarray(d1["a"]) - np.asarray(d2["a"])).max() < 1e-5 * scale
    for x, y in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_bad_input_errors_name_the_target_and_leave_state_untouched():
    rng = np.random.default_rng(4)
    ed = lx.editors.ultraedit()
    state = ed.init({"a": (D_IN, D_OUT)})
    feats, _ = _turn(rng, names=("a",))
    with pytest.raises(ValueError, match="unknown target"):
        ed.update({**feats, "zz": feats["a"]}, state)
    with pytest.raises(ValueError, match="no features for target"):
        ed.update({}, state)
    bad = lx.Features(keys=np.ones((5, D_IN + 1), np.float32), value_grads=np.ones((5, D_OUT), np.float32))
    with pytest.raises(ValueError, match=r"target 'a': keys have width 25"):
        ed.update({"a": bad}, state)
    bad = lx.Features(keys=np.ones((5, D_IN), np.float32), value_grads=np.ones((6, D_OUT), np.float32))
    with pytest.raises(ValueError, match=r"target 'a': keys have 5 rows but value_grads have 6"):
        ed.update({"a": bad}, state)
    K = np.ones((5, D_IN), np.float32)
    K[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"target 'a': keys has 1 non-finite entries \(first at row 2\)"):
        ed.update({"a": lx.Features(keys=K, value_grads=np.ones((5, D_OUT), np.float32))}, state)
    assert int(state.stats[f"{D_IN}x{D_OUT}"].count) == 0
    with pytest.raises(ValueError, match="shape must be"):
        ed.init({"a": (3,)})


def test_non_finite_shift_under_jit_is_rejected():
    ed = lx.editors.ultraedit(lr=1e-2)
    state = ed.init({"a": (4, 3)})
    good = lx.Features(keys=jnp.ones((6, 4)) + jnp.arange(6.0)[:, None], value_grads=jnp.ones((6, 3)))
    _, state = jax.jit(ed.update)({"a": good}, state)
    bad = lx.Features(keys=jnp.full((6, 4), jnp.inf), value_grads=jnp.ones((6, 3)))
    deltas, after = jax.jit(ed.update)({"a": bad}, state)
    assert float(jnp.abs(deltas["a"]).max()) == 0.0
    assert int(after.rejected) == 1 and int(after.turns) == 1
    np.testing.assert_array_equal(np.asarray(after.stats["4x3"].m2), np.asarray(state.stats["4x3"].m2))


def test_editor_registry_and_config_validation():
    assert lx.editors.get("stableedit").config.whiten
    with pytest.raises(ValueError, match="unknown editor"):
        lx.editors.get("rome")
    with pytest.raises(ValueError, match="variance"):
        lx.editors.ultraedit(variance="ddof2")


def test_diagonal_key_metric_matches_float64_reference():
    rng = np.random.default_rng(8)
    feats, rf = _turn(rng, names=("a",), num_seg=1)
    K, G, mask, _, _ = rf["a"]
    ed = lx.editors.no_normalization(lr=1e-3, alpha=2.0, key_metric="diagonal", key_prior=0.05)
    state = ed.init({"a": (D_IN, D_OUT)})
    assert state.stats[f"{D_IN}x{D_OUT}"].scatter_k is None  # the diagonal needs no key scatter
    d, _ = ed.update({"a": feats["a"]}, state)
    Km, Gm = K[mask].astype(np.float64), G[mask].astype(np.float64)
    a = np.mean(Km ** 2, 0)  # E[k²] over the rows seen so far (this turn's)
    a = a + 0.05 * a.mean()
    V = -1e-3 * np.sum(Km ** 2, 1, keepdims=True) * Gm
    expected = np.linalg.solve(Km.T @ Km + 2.0 * np.diag(a), Km.T @ V)
    np.testing.assert_allclose(np.asarray(d["a"]), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
