"""The matrix-products-only ZCA whitening (``ln.inverse_sqrt_newton_schulz``, ``stableedit(whitening=
"newton_schulz")``) against the eigendecomposition, in float64 and in the float32 the editor runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from lnjax import editors
from lnjax.core import ln


def _covariance(d, n, decay, seed=0):
    """A sample covariance of ``n`` rows in ``d`` dims whose population spectrum falls as ``i ** -decay``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = rng.normal(size=(n, d)) * (np.arange(1, d + 1) ** (-decay / 2)) @ q.T
    return x.T @ x / n


def _reference(sigma, floor, clamp):
    w, v = np.linalg.eigh(sigma)
    w = np.maximum(w, floor) if clamp else w + floor
    return (v / np.sqrt(w)) @ v.T


@pytest.mark.parametrize("d,n,decay", [(64, 400, 0.0), (96, 100, 1.0), (128, 140, 2.0)])
def test_newton_schulz_equals_eigh_in_float64(d, n, decay):
    """Well-conditioned (condition number 5), n ~ d (5e4) and ill-conditioned (9e5, two eigenvalues under the
    floor) covariances: the iteration equals the eigendecomposition's (Σ + floor·I)^{-1/2} to 1e-9
    relative, and the published clamp to the stated bound."""
    sigma = _covariance(d, n, decay)
    floor = 1e-6
    with jax.enable_x64(True):
        z, k = jax.jit(ln.inverse_sqrt_newton_schulz, static_argnums=(1, 2))(
            jnp.asarray(sigma + floor * np.eye(d)), 1e-12, 200)
        z = np.asarray(z)
    ref = _reference(sigma, floor, clamp=False)
    assert np.linalg.norm(z - ref) / np.linalg.norm(ref) < 1e-9 and int(k) < 200
    w = np.linalg.eigvalsh(sigma)
    bound = np.max(1 - np.sqrt(np.maximum(w, floor) / (w + floor)))   # whitening_matrix's docstring
    clamp = _reference(sigma, floor, clamp=True)
    assert np.max(np.abs(np.linalg.eigvalsh(z) - np.linalg.eigvalsh(clamp)) / np.linalg.eigvalsh(clamp)) \
        <= bound + 1e-9


def test_whitening_matrix_float32_methods_agree():
    """In float32, as StableEdit runs it: the two methods agree to 1e-4 relative (Frobenius) on a covariance
    whose eigenvalues lie well above the floor; the iteration stops on its tolerance."""
    d = 96
    x = np.random.default_rng(1).normal(size=(600, d)).astype(np.float32) * np.linspace(0.3, 3, d)
    stats = ln.update(ln.init(4, d, track_scatter=True), jnp.concatenate([jnp.zeros((600, 4)), x], 1))
    a = np.asarray(ln.whitening_matrix(stats, method="eigh"), np.float64)
    b = np.asarray(jax.jit(lambda s: ln.whitening_matrix(s, method="newton_schulz"))(stats), np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4
    with pytest.raises(ValueError, match="whitening method"):
        ln.whitening_matrix(stats, method="cholesky")


def test_stableedit_newton_schulz_shifts_match_eigh():
    d_in, d_out, rows = 8, 12, 40
    rng = np.random.default_rng(2)
    from lnjax.core.features import Features
    shifts = {}
    for method in ("eigh", "newton_schulz"):
        ed = editors.stableedit(lr=0.1, alpha=1.0, whitening=method)
        state = ed.init({"t": (d_in, d_out)})
        rng = np.random.default_rng(2)
        out = []
        for _ in range(3):
            f = {"t": Features(keys=jnp.asarray(rng.normal(size=(rows, d_in)), jnp.float32),
                               value_grads=jnp.asarray(rng.normal(size=(rows, d_out)), jnp.float32),
                               mask=jnp.ones((rows,), bool), segment=jnp.zeros((rows,), jnp.int32),
                               num_segments=1)}
            deltas, state = jax.jit(ed.update)(f, state)
            out.append(np.asarray(deltas["t"]))
        shifts[method] = out
    for a, b in zip(shifts["eigh"], shifts["newton_schulz"]):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * np.abs(a).max())
    with pytest.raises(ValueError, match="whitening must be one of"):
        editors.stableedit(whitening="qr")
