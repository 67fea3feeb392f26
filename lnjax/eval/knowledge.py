"""What a model knows before editing: teacher-forced and greedy accuracy on the real-fact set's true answers
(``lnjax.data.facts``), by relation."""

from __future__ import annotations

from typing import Optional

import numpy as np

from lnjax import eval as eval_lib
from lnjax.data import tokenize
from lnjax.data import facts


def knowledge(apply, params, tok, split: str = "edit", n: Optional[int] = None, seed: int = 0,
              max_length: Optional[int] = None) -> dict:
    """What a model knows before editing, on the first ``n`` rows of ``split`` with their *true* answers.

    Returns ``{"by_relation": {relation: {"n", "teacher_forced", "greedy"}}, "overall": {...}, "known": [row
    indices whose true answer the model greedily generates on ``src``], "unknown": [the others]}``;
    ``teacher_forced`` is the mean answer-token argmax accuracy, ``greedy`` the exact-match rate.
    """
    rows = facts.build(seed)[split][:n]
    recs = [facts._to_record(r, i, split, truth=True) for i, r in enumerate(rows)]
    tk = tokenize(recs, tok, max_length)
    es = eval_lib.build_eval_set(tk)
    preds = eval_lib.predictions(apply, params, es.batches["edit"])
    labels = np.asarray(es.batches["edit"].labels)
    tf = eval_lib.token_accuracy(preds, labels)
    gen = eval_lib.exact_match(preds, labels)
    rel = np.asarray([r["relation"] for r in rows])
    by = {}
    for r in facts.RELATIONS:
        m = rel == r
        if m.any():
            by[r] = {"n": int(m.sum()), "teacher_forced": float(tf[m].mean()), "greedy": float(gen[m].mean())}
    return {"by_relation": by, "overall": {"n": len(rows), "teacher_forced": float(tf.mean()),
                                           "greedy": float(gen.mean())},
            "known": [int(i) for i in np.flatnonzero(gen == 1.0)],
            "unknown": [int(i) for i in np.flatnonzero(gen != 1.0)]}
