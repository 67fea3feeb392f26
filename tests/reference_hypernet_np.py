"""An independent float64 NumPy transcription of the hypernetwork editors' net, shifts and meta-gradients
written from the formulas: forward and hand-written backward of the residual blocks,
the ridge shift in its primal form with the closed-form backward, MEND's outer-product shift, clipping and Adam.
"""

import numpy as np


def to64(p):
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


def forward(p, y, m):
    """Blocks y <- y + scale_m * clamp0(y A B + bias) + shift_m; returns (y, per-block caches)."""
    caches = []
    for b in range(p["A"].shape[0]):
        u = y @ p["A"][b]
        pre = u @ p["B"][b] + p["bias"][b]
        x = np.where(pre >= 0, pre, 0.0)
        caches.append((y, u, pre, x))
        y = y + p["scale"][b, m] * x + p["shift"][b, m]
    return y, caches


def backward(p, caches, m, dy):
    """Gradients of <dy, forward(y)> w.r.t. the block parameters (same shapes as p; lr/lamda zero)."""
    g = {k: np.zeros_like(v) for k, v in p.items()}
    for b in reversed(range(len(caches))):
        y, u, pre, x = caches[b]
        g["shift"][b, m] += dy.sum(0)
        g["scale"][b, m] += (dy * x).sum(0)
        dpre = dy * p["scale"][b, m] * (pre >= 0)
        g["bias"][b] += dpre.sum(0)
        g["B"][b] += u.T @ dpre
        du = dpre @ p["B"][b].T
        g["A"][b] += y.T @ du
        dy = dy + du @ p["A"][b].T
    return g


def pseudo(p, stats, K, G, m, normalize=True):
    z = np.concatenate([K, G], 1)
    y = stats.normalize(z) if normalize else z
    out, caches = forward(p, y, m)
    return out[:, :K.shape[1]], out[:, K.shape[1]:], caches


def ridge_shift(p, stats, K, G, m, normalize=True):
    kt, gt, _ = pseudo(p, stats, K, G, m, normalize)
    c = -p["lr"][m] * np.sum(K * kt, 1)
    D = c[:, None] * gt
    S = K.T @ K + np.exp(p["lamda"][m]) * np.eye(K.shape[1])
    return np.linalg.solve(S, K.T @ D)


def mend_shift(p, stats, K, G, m, normalize=True):
    kt, gt, _ = pseudo(p, stats, K, G, m, normalize)
    return -p["lr"][m] * kt.T @ gt


def ridge_meta_grad(p, stats, K, G, m, GW, normalize=True):
    """Closed-form gradient of L = <GW, ΔW(θ)> (ridge form): returns (grads like p, dL/dD, ΔW)."""
    kt, gt, caches = pseudo(p, stats, K, G, m, normalize)
    lr, lam = p["lr"][m], np.exp(p["lamda"][m])
    kk = np.sum(K * kt, 1)
    c = -lr * kk
    D = c[:, None] * gt
    S = K.T @ K + lam * np.eye(K.shape[1])
    dW = np.linalg.solve(S, K.T @ D)
    SinvGW = np.linalg.solve(S, GW)
    dD = K @ SinvGW
    dc = np.sum(dD * gt, 1)
    dgt = c[:, None] * dD
    dkt = (dc * -lr)[:, None] * K
    grads = backward(p, caches, m, np.concatenate([dkt, dgt], 1))
    grads["lr"][m] = np.sum(dc * -kk)
    grads["lamda"][m] = -lam * np.sum(SinvGW * dW)
    return grads, dD, dW


def mend_meta_grad(p, stats, K, G, m, GW, normalize=True):
    kt, gt, caches = pseudo(p, stats, K, G, m, normalize)
    lr = p["lr"][m]
    dkt = -lr * gt @ GW.T
    dgt = -lr * kt @ GW
    grads = backward(p, caches, m, np.concatenate([dkt, dgt], 1))
    grads["lr"][m] = -np.sum(GW * (kt.T @ gt))
    return grads, -lr * kt.T @ gt


def clip(tree, max_norm):
    norm = np.sqrt(sum(np.sum(v ** 2) for v in tree.values()))
    scale = max_norm / norm if norm > max_norm else 1.0
    return {k: v * scale for k, v in tree.items()}, norm


class Adam:
    def __init__(self, params, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params, grads):
        self.t += 1
        out = {}
        for k in params:
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * grads[k]
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * grads[k] ** 2
            mh = self.m[k] / (1 - self.b1 ** self.t)
            vh = self.v[k] / (1 - self.b2 ** self.t)
            out[k] = params[k] - self.lr * mh / (np.sqrt(vh) + self.eps)
        return out
