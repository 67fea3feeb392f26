"""Threads of the LAPACK kernels that JAX runs on the CPU.

On the CPU, JAX's Cholesky, triangular solve and eigendecomposition (the ridge solve and StableEdit's whitening)
call LAPACK from SciPy's bundled OpenBLAS. After each call, OpenBLAS's idle worker threads keep spinning for a
while and take the cores from the XLA program that follows: on 2 cores one edit turn of the embedded model
ran at 1.37× its forward+backward instead of ~1.1× (experiments/bench_engine.py, BUILD.md "Performance"). The
edit solves are small (rows of one turn), so one LAPACK thread costs them nothing measurable.
"""

from __future__ import annotations

import ctypes
import glob
import os

_SETTERS = ("scipy_openblas_set_num_threads", "openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_")


def limit_lapack_threads(n: int = 1) -> list[str]:
    """Set the thread count of SciPy's OpenBLAS (the LAPACK JAX calls on the CPU) to ``n``, in this process.

    Leaves NumPy's own BLAS alone. Returns the library files changed (empty when SciPy bundles no OpenBLAS,
    e.g. a SciPy built against another LAPACK, where nothing needs doing)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    try:
        import scipy
        import scipy.linalg.cython_lapack  # noqa: F401 -- loads the library before its threads are set
    except ImportError:
        return []
    here = os.path.dirname(scipy.__file__)
    changed = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(here), "scipy.libs", "*openblas*"))
                       + glob.glob(os.path.join(here, ".dylibs", "*openblas*"))):
        lib = ctypes.CDLL(path)  # the already loaded library (same handle), not a second copy
        setter = next((getattr(lib, s) for s in _SETTERS if hasattr(lib, s)), None)
        if setter is not None:
            setter(int(n))
            changed.append(path)
    return changed


def limit_lapack_threads_on_cpu(n: int = 1) -> list[str]:
    """``limit_lapack_threads(n)`` when JAX's default backend is the CPU (the only one that calls this LAPACK),
    else nothing; returns the library files changed. Initializes JAX's backends: call it after
    ``jax.distributed.initialize``."""
    import jax

    return limit_lapack_threads(n) if jax.default_backend() == "cpu" else []


__all__ = ["limit_lapack_threads", "limit_lapack_threads_on_cpu"]
