"""Closed-form ridge shifts ``ΔW = argmin ||K ΔW - V||² + α tr(ΔWᵀ A ΔW)`` with masked rows.

``A`` is the identity (the published ridge) unless a ``metric`` is given: an SPD ``(d_in, d_in)`` matrix (or a
positive ``(d_in,)`` vector, a diagonal one), e.g.
the keys' lifelong second moment, which makes the penalty the mean squared output change over the keys seen so far
(an lnjax extension, docs/method.md §13). Two algebraically equal forms (docs/method.md §4):
- primal ``(KᵀK + αA)⁻¹ KᵀV``: a ``d_in × d_in`` system;
- dual (Woodbury) ``A⁻¹Kᵀ (K A⁻¹ Kᵀ + αI)⁻¹ V``: an ``N × N`` system (plus, with a metric, one ``d_in × d_in``
  Cholesky factorisation), far cheaper when ``N << d_in``.
Masked rows are zeroed in ``K`` and ``V``; in the dual form their diagonal entry is set to 1 instead of ``α`` so
the system stays non-singular even with ``α = 0``, and their (zero) right-hand side contributes nothing.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

_HP = jax.lax.Precision.HIGHEST
METHODS = ("auto", "primal", "dual")


def _masked(K: jax.Array, V: jax.Array, mask: Optional[jax.Array]):
    K = K.astype(jnp.float32)
    V = V.astype(jnp.float32)
    if mask is None:
        return K, V, jnp.ones(K.shape[:1], jnp.float32)
    w = mask.astype(jnp.float32)
    return K * w[:, None], V * w[:, None], w


def ridge_primal(K: jax.Array, V: jax.Array, alpha: float, mask: Optional[jax.Array] = None,
                 metric: Optional[jax.Array] = None) -> jax.Array:
    """``(KᵀK + αA)⁻¹ KᵀV`` for K [N, d_in], V [N, d_out], A = ``metric`` (d_in, d_in), diag(``metric``) for a
    (d_in,) vector, or I → (d_in, d_out) float32. Needs ``α > 0``."""
    K, V, _ = _masked(K, V, mask)
    penalty = jnp.eye(K.shape[1], dtype=jnp.float32) if metric is None else metric.astype(jnp.float32)
    if penalty.ndim == 1:
        penalty = jnp.diag(penalty)
    gram = jnp.matmul(K.T, K, precision=_HP) + alpha * penalty
    rhs = jnp.matmul(K.T, V, precision=_HP)
    return cho_solve(cho_factor(gram, lower=True), rhs)


def ridge_dual(K: jax.Array, V: jax.Array, alpha: float, mask: Optional[jax.Array] = None,
               metric: Optional[jax.Array] = None) -> jax.Array:
    """``A⁻¹Kᵀ (K A⁻¹ Kᵀ + αI)⁻¹ V`` for K [N, d_in], V [N, d_out], A = ``metric`` (d_in, d_in), diag(``metric``)
    for a (d_in,) vector, or I → (d_in, d_out) float32."""
    K, V, w = _masked(K, V, mask)
    diag = alpha * w + (1.0 - w)
    # Kᵀ for the plain ridge; A⁻¹Kᵀ with a metric (the dual of the ridge in A's inner product).
    if metric is None:
        kt = K.T
    elif metric.ndim == 1:  # a diagonal metric: A⁻¹Kᵀ is a row scaling
        kt = K.T / metric.astype(jnp.float32)[:, None]
    else:
        kt = cho_solve(cho_factor(metric.astype(jnp.float32), lower=True), K.T)
    gram = jnp.matmul(K, kt, precision=_HP) + jnp.diag(diag)
    coef = cho_solve(cho_factor(gram, lower=True), V)
    return jnp.matmul(kt, coef, precision=_HP)


def choose_method(n_rows: int, d_in: int) -> str:
    """The cheaper form for static sizes: ``"dual"`` when ``n_rows < d_in``, else ``"primal"``."""
    return "dual" if n_rows < d_in else "primal"


def ridge_shift(K: jax.Array, V: jax.Array, alpha: float, mask: Optional[jax.Array] = None,
                method: str = "auto", metric: Optional[jax.Array] = None) -> jax.Array:
    """Ridge shift (d_in, d_out) float32 from keys K [N, d_in] and pseudo-values V [N, d_out], penalised in the
    metric ``metric`` (d_in, d_in) SPD, or the identity when None.

    ``method`` is ``"primal"``, ``"dual"`` or ``"auto"`` (picked from the static shapes by ``choose_method``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if K.ndim != 2 or V.ndim != 2 or K.shape[0] != V.shape[0]:
        raise ValueError(f"keys {tuple(K.shape)} and values {tuple(V.shape)} must be [N, d_in] and [N, d_out]")
    if method == "auto":
        method = choose_method(K.shape[0], K.shape[1])
    if metric is not None and metric.shape not in ((K.shape[1], K.shape[1]), (K.shape[1],)):
        raise ValueError(f"metric has shape {tuple(metric.shape)}, expected ({K.shape[1]}, {K.shape[1]}) or "
                         f"({K.shape[1]},) (diagonal)")
    return (ridge_dual if method == "dual" else ridge_primal)(K, V, alpha, mask, metric)
