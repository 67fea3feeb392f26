"""lnjax.core.cpu_threads: the thread count of SciPy's OpenBLAS (JAX's CPU LAPACK) is set, and solves still agree."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.core.cpu_threads import limit_lapack_threads, limit_lapack_threads_on_cpu
from lnjax.core.solve import ridge_dual


def _threads(path):
    lib = ctypes.CDLL(path)
    getter = next((getattr(lib, s) for s in ("scipy_openblas_get_num_threads", "openblas_get_num_threads")
                   if hasattr(lib, s)), None)
    if getter is None:
        pytest.skip(f"{path} exports no thread-count getter")
    return getter()


def test_sets_and_resets_the_thread_count():
    changed = limit_lapack_threads(2)
    if not changed:
        pytest.skip("this SciPy bundles no OpenBLAS: nothing to limit")
    assert all(_threads(p) == 2 for p in changed)
    assert limit_lapack_threads(1) == changed
    assert all(_threads(p) == 1 for p in changed)


def test_refuses_zero_threads():
    with pytest.raises(ValueError, match="n must be >= 1"):
        limit_lapack_threads(0)


def test_solve_is_unchanged_by_the_thread_count():
    rng = np.random.default_rng(0)
    K = jnp.asarray(rng.normal(size=(300, 512)).astype(np.float32))
    V = jnp.asarray(rng.normal(size=(300, 64)).astype(np.float32))
    solve = jax.jit(lambda K, V: ridge_dual(K, V, 1.0))
    limit_lapack_threads(2)
    a = np.asarray(solve(K, V))
    limit_lapack_threads(1)
    b = np.asarray(solve(K, V))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_on_cpu_variant_acts_on_the_cpu_backend_only():
    want = limit_lapack_threads(1) if jax.default_backend() == "cpu" else []
    assert limit_lapack_threads_on_cpu(1) == want
