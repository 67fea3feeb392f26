"""An independent float64 NumPy transcription of docs/method.md §3-5 (UltraEdit / StableEdit), for parity tests.

Deliberately naive: statistics are merged one (mini-batch, module) at a time, exactly in the order the released
code does, and the ridge solve uses the primal form.
"""

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)


class RefStats:
    def __init__(self, d_in, d_out, ddof):
        self.d_in, self.d_out, self.ddof = d_in, d_out, ddof
        self.n = 0
        self.mean = np.zeros(d_in + d_out)
        self.m2 = np.zeros(d_in + d_out)
        self.scatter_v = np.zeros((d_out, d_out))
        self.kk = np.zeros((d_in, d_in))   # plain running sum of k kᵀ (for the key-metric extension)

    def update(self, x):
        m = x.shape[0]
        if m == 0:
            return
        self.kk = self.kk + x[:, :self.d_in].T @ x[:, :self.d_in]
        bm = x.mean(0)
        if self.ddof == 1 and m == 1:
            bvar = np.zeros_like(bm)  # the released code gives NaN here; lnjax documents 0
            bcov = np.zeros((self.d_out, self.d_out))
        else:
            bvar = x.var(0, ddof=self.ddof)
            xv = x[:, self.d_in:] - bm[self.d_in:]
            bcov = xv.T @ xv / (m - self.ddof)
        n_new = self.n + m
        d = bm - self.mean
        self.mean = self.mean + m * d / n_new
        self.m2 = self.m2 + m * bvar + self.n * m * d ** 2 / n_new
        dv = d[self.d_in:]
        self.scatter_v = self.scatter_v + m * bcov + self.n * m * np.outer(dv, dv) / n_new
        self.n = n_new

    def normalize(self, z):
        std = np.sqrt(self.m2 / (self.n - 1 + F32_EPS))
        return (z - self.mean) / (std + F32_EPS)


def ref_turn(stats, feats, order, lr, alpha, whiten, warmup=False, eps0=0.0, nu0=0.0, key_prior=None):
    """One turn. stats: group -> RefStats; feats: name -> (K, G, mask, segment, group) float64 arrays.

    ``order``: the target names in module order. With ``key_prior`` the ridge penalty is ``α tr(ΔWᵀ A ΔW)`` with
    ``A = Σkkᵀ/n + key_prior·mean(diag)·I`` over every key seen so far. Returns name -> ΔW (float64).
    """
    num_seg = max(int(f[3].max()) + 1 for f in feats.values())
    for s in range(num_seg):
        for name in order:
            K, G, mask, seg, group = feats[name]
            sel = mask & (seg == s)
            stats[group].update(np.concatenate([K[sel], G[sel]], axis=1))
    out = {}
    for name in order:
        K, G, mask, seg, group = feats[name]
        st = stats[group]
        K, G = K[mask], G[mask]
        z = st.normalize(np.concatenate([K, G], axis=1))
        k_hat, g_hat = z[:, :st.d_in], z[:, st.d_in:]
        if whiten and not warmup and st.n + nu0 > st.d_out + 1:
            sigma = (st.scatter_v + eps0 * np.eye(st.d_out)) / (st.n + nu0 - st.d_out - 1)
            lam, U = np.linalg.eigh(sigma)
            W = U @ np.diag(1.0 / np.sqrt(np.maximum(lam, 1e-6))) @ U.T
            g_hat = (G - st.mean[st.d_in:]) @ W
        V = -lr * np.sum(k_hat ** 2, axis=1, keepdims=True) * g_hat
        if key_prior is None:
            penalty = np.eye(K.shape[1])
        else:
            moment = st.kk / st.n
            penalty = moment + key_prior * np.mean(np.diag(moment)) * np.eye(st.d_in)
        out[name] = np.linalg.solve(K.T @ K + alpha * penalty, K.T @ V)
    return out
