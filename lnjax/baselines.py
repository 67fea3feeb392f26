"""The baseline editors that run the model (FT, MEMIT, AlphaEdit), built for a run with their statistics.

``make_editor(name, model, targets, ...)`` is what a run calls for ``ft``, ``memit`` and ``alphaedit``: it builds
the key statistics (MEMIT, AlphaEdit) once, cached on disk, and returns the editor with metadata for
``results.json`` (the statistics' corpus, whether it is an approximation of the published one, and its token
count). AlphaEdit's null-space dimensions are in its state (``null_dims``) once initialised.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Sequence

from . import editors as editors_lib
from . import key_stats

MODEL_EDITORS = ("ft", "memit", "alphaedit")

# Settings on the embedded world where the published values are tied to model scale (BASELINES.md §10.1): its
# residual stream has norm ~3000 at the edited position, so Adam's per-coordinate v_lr of 0.5 cannot move z in 25
# steps (v_lr 20); and the model looks facts up at the question mark after the subject
# (fact_token="prompt_last"). MEMIT keeps the published λ = 15000 (over 2,000 edits it keeps locality 0.85 where
# λ = 100 destroys the model), AlphaEdit the published absolute threshold, FT the recommended defaults (FT-M,
# ε = 5e-5). Measured in experiments/locate_baselines.py (experiments/REPORT.md §7).
WORLD_HPARAMS = {
    "ft": {},
    "memit": {"fact_token": "prompt_last", "v_lr": 20.0},
    "alphaedit": {"fact_token": "prompt_last", "v_lr": 20.0},
}
# MEMIT's z is taken at the last edited block; on the 4-block world model that must not be the last block, whose
# output at the question mark reaches only the first answer token.
WORLD_TARGETS = {"memit": ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"),
                 "alphaedit": ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")}
WORLD_CORPUS = "world pretraining text: every fact in every wording"


def default_stats_dir() -> str:
    """Where key statistics are cached: ``$LNJAX_CACHE/key_stats`` (default ``~/.cache/lnjax/key_stats``)."""
    return os.path.join(os.environ.get("LNJAX_CACHE", os.path.expanduser("~/.cache/lnjax")), "key_stats")


def make_editor(name: str, model, targets: Sequence[str], *, world=None, npz: Optional[Mapping[str, str]] = None,
                stats_dir: Optional[str] = None, options: Optional[dict] = None,
                log: Optional[Callable[[str], None]] = print):
    """``(editor, metadata)`` for ``name`` in ``MODEL_EDITORS`` on ``model`` (``.apply``, ``.params``).

    MEMIT and AlphaEdit take their statistics from ``npz`` ({target: MEMIT-format .npz path}) when given, else
    from ``world``'s pretraining corpus (computed once, cached in ``stats_dir``); without either they raise.
    ``options`` override the editor's keyword settings.
    """
    if name not in MODEL_EDITORS:
        raise ValueError(f"{name!r} is not one of the model-running baselines {MODEL_EDITORS}")
    options = dict(options or {})
    if name == "ft":
        return editors_lib.get("ft", apply=model.apply, **options), {}
    targets = tuple(targets)
    if npz is not None:
        missing = [t for t in targets if t not in npz]
        if missing:
            raise ValueError(f"{name}: no .npz statistics given for target(s) {missing}")
        stats = {t: key_stats.read_memit_npz(npz[t]) for t in targets}
        meta = {"key_stats_corpus": {t: npz[t] for t in targets}, "key_stats_approximation": True}
    elif world is not None:
        corpus = key_stats.world_corpus(world)
        stats = key_stats.cached_stats(model.apply, model.params, targets, corpus, stats_dir or default_stats_dir(),
                                       corpus_name=WORLD_CORPUS, log=log)
        meta = {"key_stats_corpus": WORLD_CORPUS, "key_stats_approximation": False}
    else:
        raise ValueError(f"{name} needs key statistics: a world (its pretraining text) or MEMIT-format .npz files")
    meta["key_stats_tokens"] = key_stats.tokens(stats)
    editor = editors_lib.get(name, apply=model.apply, stats=stats, **options)
    return editor, meta

