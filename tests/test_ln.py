import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.core import ln
from reference_np import F32_EPS, RefStats


def _rows(rng, n, d, loc=1.5, scale=2.0):
    return (rng.normal(size=(n, d)) * scale + loc).astype(np.float32)


@pytest.mark.parametrize("variance,ddof", [("ddof1", 1), ("exact", 0)])
def test_update_matches_sequential_float64_merge(variance, ddof):
    rng = np.random.default_rng(0)
    d_in, d_out = 5, 3
    st = ln.init(d_in, d_out, track_scatter=True)
    ref = RefStats(d_in, d_out, ddof)
    for _ in range(20):
        z = _rows(rng, 30, d_in + d_out)
        mask = rng.random(30) > 0.25
        seg = np.sort(rng.integers(0, 4, 30)).astype(np.int32)
        st = ln.update(st, jnp.asarray(z), jnp.asarray(mask), jnp.asarray(seg), 4, variance)
        for s in range(4):
            ref.update(z[mask & (seg == s)].astype(np.float64))
    assert int(st.count) == ref.n
    np.testing.assert_allclose(np.asarray(ln.mean(st)), ref.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(st.m2 - st.m2_c), ref.m2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(st.scatter_v - st.scatter_v_c), ref.scatter_v, rtol=1e-5, atol=1e-4)
    z = _rows(rng, 7, d_in + d_out)
    np.testing.assert_allclose(np.asarray(ln.standardize(st, jnp.asarray(z))), ref.normalize(z.astype(np.float64)),
                               rtol=1e-5, atol=1e-5)


def test_one_row_segments_do_not_make_nan_in_ddof1():
    st = ln.update(ln.init(2, 2), jnp.ones((3, 4)), segment=jnp.arange(3), num_segments=3, variance="ddof1")
    assert np.all(np.isfinite(np.asarray(st.m2)))


def test_masked_rows_holding_nan_or_inf_leave_the_statistics_as_zeros_would():
    """A padding row may hold anything (a NaN from a failed probe): it must not reach any sum. Under jit, with the
    mask and segments traced, as the engine runs it."""
    rng = np.random.default_rng(4)
    z = _rows(rng, 12, 7)
    mask = np.ones(12, bool)
    mask[[2, 9]] = False
    seg = (np.arange(12) // 4).astype(np.int32)
    bad, clean = z.copy(), z.copy()
    bad[2, :] = np.nan
    bad[9, 3] = np.inf
    clean[[2, 9]] = 0.0
    upd = jax.jit(lambda st, z, m, s: ln.update(st, z, m, s, 3, "ddof1"))
    st0 = ln.update(ln.init(4, 3, True), jnp.asarray(_rows(rng, 5, 7)))
    a = upd(st0, jnp.asarray(bad), jnp.asarray(mask), jnp.asarray(seg))
    b = upd(st0, jnp.asarray(clean), jnp.asarray(mask), jnp.asarray(seg))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.all(np.isfinite(np.asarray(x)))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(a.count) == 5 + 10


def test_merge_equals_update_on_union():
    rng = np.random.default_rng(1)
    a_rows, b_rows = _rows(rng, 50, 6), _rows(rng, 70, 6, loc=-3.0)
    a = ln.update(ln.init(4, 2, True), jnp.asarray(a_rows))
    b = ln.update(ln.init(4, 2, True), jnp.asarray(b_rows))
    both = ln.update(ln.init(4, 2, True), jnp.asarray(np.concatenate([a_rows, b_rows])))
    m = ln.merge(a, b)
    assert int(m.count) == 120
    for x, y in [(ln.mean(m), ln.mean(both)), (m.m2 - m.m2_c, both.m2 - both.m2_c),
                 (m.scatter_v - m.scatter_v_c, both.scatter_v - both.scatter_v_c)]:
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-4)


def test_empty_batch_leaves_state_bit_identical():
    rng = np.random.default_rng(2)
    st = ln.update(ln.init(3, 2, True), jnp.asarray(_rows(rng, 10, 5)))
    st2 = ln.update(st, jnp.asarray(_rows(rng, 10, 5)), mask=jnp.zeros(10, bool))
    for x, y in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(st2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_million_rows_do_not_drift():
    """10^6 rows in 1,000-row batches: float32 statistics within 1e-5 relative of float64."""
    rng = np.random.default_rng(3)
    D, B, T = 8, 1000, 1000
    loc = np.linspace(-50, 300, D)
    scale = np.linspace(0.01, 20, D)
    data = (rng.normal(size=(T, B, D)) * scale + loc).astype(np.float32)

    @jax.jit
    def run(data):
        return jax.lax.scan(lambda s, z: (ln.update(s, z), None), ln.init(4, 4), data)[0]

    st = run(jnp.asarray(data))
    flat = data.reshape(-1, D).astype(np.float64)
    assert int(st.count) == T * B
    np.testing.assert_allclose(np.asarray(ln.mean(st)), flat.mean(0), rtol=1e-5)
    m2 = ((flat - flat.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(np.asarray(st.m2 - st.m2_c), m2, rtol=1e-5)
    std = np.sqrt(m2 / (T * B - 1 + F32_EPS))
    np.testing.assert_allclose(np.asarray(ln.std(st)), std, rtol=1e-5)


def test_whitening_matrix_is_inverse_sqrt_of_iw_estimate():
    rng = np.random.default_rng(4)
    A = rng.normal(size=(3, 3))
    g = (rng.normal(size=(400, 3)) @ A).astype(np.float32)
    z = np.concatenate([rng.normal(size=(400, 2)).astype(np.float32), g], axis=1)
    st = ln.update(ln.init(2, 3, True), jnp.asarray(z))
    assert bool(ln.can_whiten(st))
    W = np.asarray(ln.whitening_matrix(st, eps0=0.5))
    gc = g.astype(np.float64) - g.mean(0)
    sigma = (gc.T @ gc + 0.5 * np.eye(3)) / (400 - 3 - 1)
    np.testing.assert_allclose(W @ sigma @ W, np.eye(3), atol=1e-4)
    np.testing.assert_allclose(W, W.T, atol=1e-6)
    wg = np.asarray(ln.whiten(st, jnp.asarray(g), jnp.asarray(W)))
    np.testing.assert_allclose(wg, gc @ W, rtol=1e-4, atol=1e-4)


def test_cannot_whiten_before_enough_rows():
    st = ln.update(ln.init(2, 3, True), jnp.ones((4, 5)))
    assert not bool(ln.can_whiten(st))
    assert bool(ln.can_whiten(st, nu0=5.0))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"statistics expect \[rows, 5\]"):
        ln.update(ln.init(2, 3), jnp.ones((4, 6)))
    with pytest.raises(ValueError, match="cannot merge"):
        ln.merge(ln.init(2, 3), ln.init(3, 2))
    with pytest.raises(ValueError, match="track the value-gradient scatter"):
        ln.whitening_matrix(ln.init(2, 3))


def test_key_second_moment_matches_float64_over_masked_ragged_batches():
    rng = np.random.default_rng(5)
    d_in, d_out = 6, 3
    st = ln.init(d_in, d_out, track_key_scatter=True)
    kept = []
    for _ in range(12):
        z = _rows(rng, 25, d_in + d_out, loc=4.0)
        mask = rng.random(25) > 0.3
        seg = np.sort(rng.integers(0, 3, 25)).astype(np.int32)
        st = ln.update(st, jnp.asarray(z), jnp.asarray(mask), jnp.asarray(seg), 3, "exact")
        kept.append(z[mask, :d_in].astype(np.float64))
    k = np.concatenate(kept)
    np.testing.assert_allclose(np.asarray(ln.key_second_moment(st)), k.T @ k / len(k), rtol=1e-5, atol=1e-5)
    assert st.scatter_v is None
    with pytest.raises(ValueError, match="key scatter"):
        ln.key_second_moment(ln.init(d_in, d_out))
    # merging two halves tracks the key scatter too
    a = ln.update(ln.init(d_in, d_out, track_key_scatter=True), jnp.asarray(_rows(rng, 30, 9)))
    b = ln.update(ln.init(d_in, d_out, track_key_scatter=True), jnp.asarray(_rows(rng, 40, 9, loc=-2.0)))
    both = ln.merge(a, b)
    np.testing.assert_allclose(np.asarray(ln.key_second_moment(both)),
                               (int(a.count) * np.asarray(ln.key_second_moment(a))
                                + int(b.count) * np.asarray(ln.key_second_moment(b))) / 70, rtol=1e-5, atol=1e-5)
