import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.core.solve import choose_method, ridge_dual, ridge_primal, ridge_shift


@pytest.mark.parametrize("n,d_in", [(20, 64), (90, 30)])
def test_dual_equals_primal_and_float64(n, d_in):
    rng = np.random.default_rng(0)
    K = rng.normal(size=(n, d_in)).astype(np.float32)
    V = rng.normal(size=(n, 7)).astype(np.float32)
    mask = rng.random(n) > 0.2
    p = np.asarray(ridge_primal(K, V, 1.5, mask))
    d = np.asarray(ridge_dual(K, V, 1.5, mask))
    Km, Vm = K[mask].astype(np.float64), V[mask].astype(np.float64)
    ref = np.linalg.solve(Km.T @ Km + 1.5 * np.eye(d_in), Km.T @ Vm)
    scale = np.abs(ref).max()
    assert np.abs(p - ref).max() / scale < 1e-5
    assert np.abs(d - ref).max() / scale < 1e-5
    assert np.abs(p - d).max() / scale < 1e-5


def test_masked_rows_equal_removed_rows_and_alpha_zero_dual():
    rng = np.random.default_rng(1)
    K = rng.normal(size=(10, 40)).astype(np.float32)
    V = rng.normal(size=(10, 3)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], bool)
    full = np.asarray(ridge_dual(K, V, 0.0, mask))
    kept = np.asarray(ridge_dual(K[mask], V[mask], 0.0))
    np.testing.assert_allclose(full, kept, rtol=1e-4, atol=1e-6)
    # alpha = 0 with N < d_in: the minimum-norm interpolant K ΔW = V.
    np.testing.assert_allclose(K[mask] @ full, V[mask], atol=1e-4)


def test_auto_method_and_errors():
    assert choose_method(100, 1000) == "dual" and choose_method(1000, 100) == "primal"
    with pytest.raises(ValueError, match="method"):
        ridge_shift(jnp.ones((2, 3)), jnp.ones((2, 1)), 1.0, method="cg")
    with pytest.raises(ValueError, match=r"\[N, d_in\]"):
        ridge_shift(jnp.ones((2, 3)), jnp.ones((3, 1)), 1.0)


@pytest.mark.parametrize("n,d_in", [(12, 40), (60, 20)])
def test_metric_ridge_equals_float64_in_both_forms(n, d_in):
    rng = np.random.default_rng(3)
    K = (rng.normal(size=(n, d_in)) + 1.0).astype(np.float32)
    V = rng.normal(size=(n, 5)).astype(np.float32)
    B = rng.normal(size=(3 * d_in, d_in))
    A = (B.T @ B / len(B) + 0.05 * np.eye(d_in)).astype(np.float32)
    mask = rng.random(n) > 0.2
    Km, Vm = K[mask].astype(np.float64), V[mask].astype(np.float64)
    ref = np.linalg.solve(Km.T @ Km + 2.0 * A.astype(np.float64), Km.T @ Vm)
    for method in ("primal", "dual"):
        got = np.asarray(ridge_shift(K, V, 2.0, mask, method, metric=A))
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4, method
    # the identity metric is the published ridge, bit for bit in the primal form
    np.testing.assert_array_equal(np.asarray(ridge_primal(K, V, 2.0, mask, np.eye(d_in, dtype=np.float32))),
                                  np.asarray(ridge_primal(K, V, 2.0, mask)))
    with pytest.raises(ValueError, match="metric"):
        ridge_shift(K, V, 2.0, mask, metric=np.eye(d_in + 1, dtype=np.float32))


@pytest.mark.parametrize("n,d_in", [(12, 40), (60, 20)])
def test_diagonal_metric_ridge_equals_float64_in_both_forms(n, d_in):
    rng = np.random.default_rng(4)
    K = (rng.normal(size=(n, d_in)) + 1.0).astype(np.float32)
    V = rng.normal(size=(n, 5)).astype(np.float32)
    a = rng.uniform(0.05, 3.0, size=d_in).astype(np.float32)
    mask = rng.random(n) > 0.2
    Km, Vm = K[mask].astype(np.float64), V[mask].astype(np.float64)
    ref = np.linalg.solve(Km.T @ Km + 2.0 * np.diag(a.astype(np.float64)), Km.T @ Vm)
    for method in ("primal", "dual"):
        got = np.asarray(ridge_shift(K, V, 2.0, mask, method, metric=a))
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4, method
    with pytest.raises(ValueError, match="diagonal"):
        ridge_shift(K, V, 2.0, mask, "dual", metric=a[:-1])
