"""How large a step an LN-family editor takes, raw and normalized: the measured form of "LN sets the step's scale".

The LN editors' pseudo-value of a row is ``v = -lr · ‖k̂‖² · ĝ`` with the key ``k`` and value gradient ``g``
standardized by the lifelong statistics (``k̂``, ``ĝ``); the un-normalized solve uses ``-lr · ‖k‖² · g``.
``value_step_scale`` measures both on one turn, with the statistics the editor would use for it (the turn's rows
folded in first, fresh statistics for per-turn normalization), so a run can log how each scale drifts over turns.
StableEdit whitens ``ĝ`` further with the full covariance; the diagonal ``ĝ`` reported here is the part shared
by every LN editor.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from lnjax.core import ln
from lnjax.core.turns import EditTurn
from lnjax.models.probe import turn_features


def value_step_scale(apply: Callable, params, targets: Sequence[str], batch, lr: float,
                     stats: Optional[ln.LNStats] = None, per_turn: bool = False) -> dict:
    """Mean over the turn's rows (``batch``: one turn, TurnBatch [E, L] or EditTurn) of the first target's raw ``‖k‖²``,
    ``‖g‖`` and value ``lr‖k‖²‖g‖``; with ``stats`` (the editor's lifelong statistics before this turn) also the
    standardized ``‖k̂‖²``, ``‖ĝ‖``, ``lr‖k̂‖²‖ĝ‖`` and the rows the statistics have seen (``per_turn``: statistics
    of this turn alone, as per-turn normalization uses)."""
    turn = EditTurn.of(batch)
    feats, _, rows = turn_features(apply, params, list(targets), turn.edit, stream=turn.stream,
                                   stream_start=turn.stream_start)
    f = feats[targets[0]]
    n = int(rows)
    k = np.asarray(f.keys[:n], np.float64)
    g = np.asarray(f.value_grads[:n], np.float64)
    k2, gn = (k * k).sum(1), np.linalg.norm(g, axis=1)
    out = {"rows": n, "raw_k2": float(k2.mean()), "raw_g": float(gn.mean()), "raw_value": float(lr * (k2 * gn).mean())}
    if stats is not None:
        if per_turn:
            stats = ln.init(stats.d_in, stats.d_out)
        z = jnp.concatenate([f.keys, f.value_grads], 1)
        stats = ln.update(stats, z, f.mask, f.segment, f.num_segments)
        zh = np.asarray(ln.standardize(stats, z[:n]), np.float64)
        kh, gh = zh[:, :k.shape[1]], zh[:, k.shape[1]:]
        kh2, ghn = (kh * kh).sum(1), np.linalg.norm(gh, axis=1)
        out.update({"std_k2": float(kh2.mean()), "std_g": float(ghn.mean()),
                    "std_value": float(lr * (kh2 * ghn).mean()), "rows_seen": float(stats.count)})
    return out


__all__ = ["value_step_scale"]
