"""An independent float64 NumPy transcription of MEMIT's and AlphaEdit's shifts as their papers write them, in
the papers' (out, in) orientation: keys K are d_in × n, residuals R are d_out × n. Tests transpose the result to
lnjax's (in, out) kernel layout."""

import numpy as np


def memit_update(K, R, C, lam):
    """ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹, (d_out, d_in)."""
    K, R, C = (np.asarray(a, np.float64) for a in (K, R, C))
    return R @ K.T @ np.linalg.inv(lam * C + K @ K.T)


def alphaedit_update(K, R, P, cache_c, alpha):
    """The paper's form ΔW = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + α I)⁻¹, with K_p K_pᵀ = cache_c; (d_out, d_in)."""
    K, R, P, cache = (np.asarray(a, np.float64) for a in (K, R, P, cache_c))
    d = P.shape[0]
    return R @ K.T @ P @ np.linalg.inv(K @ K.T @ P + cache @ P + alpha * np.eye(d))


def projector(C, threshold):
    """U₀U₀ᵀ over the singular vectors of C with singular value below ``threshold`` (absolute)."""
    U, S, _ = np.linalg.svd(np.asarray(C, np.float64))
    U0 = U[:, S < threshold]
    return U0 @ U0.T, U0.shape[1]
