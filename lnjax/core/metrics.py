"""Token accuracy, the one metric the scan engine computes inside the compiled loop (lnjax.eval builds the
protocol-named metrics on top of it)."""

from __future__ import annotations

from lnjax.core.turns import IGNORE


def token_accuracy(preds, labels, target=None):
    """Per example, the fraction of supervised positions (``labels != -100``) where ``preds`` equals ``target``
    (default: ``labels``) [...] (leading axes kept, last axis reduced). Works on NumPy arrays (float64 result)
    and on JAX arrays inside ``jit`` alike; an example without supervised positions scores 0."""
    sup = labels != IGNORE
    hits = ((preds == (labels if target is None else target)) & sup).sum(-1)
    return hits / sup.sum(-1).clip(1)
