"""The disk cache of MEMIT/AlphaEdit key statistics (``lnjax.editors.key_stats``): one Orbax checkpoint per
(model parameters, target modules, corpus), named by their digest, so a corpus is streamed through a model once.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional, Sequence

import numpy as np

from lnjax.core.tree import digest, get_module
from lnjax.core.turns import TurnBatch
from lnjax.editors.key_stats import collect, init, tokens
from lnjax.io import checkpoint


def cache_key(params, targets: Sequence[str], corpus: TurnBatch) -> str:
    """Name of the cache entry for (model parameters, target layers, corpus)."""
    h = hashlib.sha256()
    h.update(digest(params).encode())
    h.update(repr(tuple(targets)).encode())
    h.update(digest((corpus.input_ids, corpus.attention_mask)).encode())
    return h.hexdigest()[:24]


def cached_stats(apply: Callable, params, targets: Sequence[str], corpus: TurnBatch, cache_dir: str, *,
                 corpus_name: str = "", batch_size: int = 256, log: Optional[Callable[[str], None]] = print
                 ) -> dict:
    """``collect`` once and cache in ``cache_dir/<key>`` (an Orbax checkpoint; key from ``cache_key``); later
    calls with the same model, targets and corpus load it. Metadata records the targets, the token count and
    ``corpus_name``."""
    targets = tuple(targets)
    path = os.path.join(cache_dir, cache_key(params, targets, corpus))
    like = {t: init(get_module(params, t)["kernel"].shape[0]) for t in targets}
    if os.path.isdir(path):
        try:
            stats = checkpoint.load(path, like)
            if log:
                log(f"key statistics loaded from {path} ({tokens(stats)} tokens)")
            return stats
        except checkpoint.CheckpointError as e:
            if log:
                log(f"key statistics cache {path} is not usable ({e}); recomputing")
    stats = collect(apply, params, targets, corpus, batch_size=batch_size, log=log)
    checkpoint.save(path, stats, {"targets": list(targets), "tokens": tokens(stats), "corpus": corpus_name,
                                  "sequences": int(np.asarray(corpus.input_ids).shape[0])})
    if log:
        log(f"key statistics of {len(targets)} module(s) over {tokens(stats)} tokens cached in {path}")
    return stats
