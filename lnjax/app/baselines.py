"""The baseline editors that run the model (FT, MEMIT, AlphaEdit), built for a run with their statistics.

``make_editor(name, model, targets, ...)`` is what a run calls for ``ft``, ``memit`` and ``alphaedit``: it builds
the key statistics (MEMIT, AlphaEdit) once, cached on disk, and returns the editor with metadata for
``results.json`` (the statistics' corpus, whether it is an approximation of the published one, and its token
count). AlphaEdit's null-space dimensions are in its state (``null_dims``) once initialised.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Sequence

from lnjax import editors as editors_lib
from lnjax.io import builtin_models
from lnjax.app import hparams
from lnjax.editors import key_stats
from lnjax.io import stats_cache
from lnjax.world import world_model

MODEL_EDITORS = hparams.MODEL_BASELINES
WORLD_CORPUS = "world pretraining text: every fact in every wording"


def default_stats_dir() -> str:
    """Where key statistics are cached: ``$LNJAX_CACHE/key_stats`` (default ``~/.cache/lnjax/key_stats``)."""
    return os.path.join(builtin_models.cache_dir(), "key_stats")


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
        corpus = world_model.world_corpus(world)
        stats = stats_cache.cached_stats(model.apply, model.params, targets, corpus, stats_dir or default_stats_dir(),
                                       corpus_name=WORLD_CORPUS, log=log)
        meta = {"key_stats_corpus": WORLD_CORPUS, "key_stats_approximation": False}
    else:
        raise ValueError(f"{name} needs key statistics: a world (its pretraining text) or MEMIT-format .npz files")
    meta["key_stats_tokens"] = key_stats.tokens(stats)
    editor = editors_lib.get(name, apply=model.apply, stats=stats, **options)
    return editor, meta



def for_run(name: str, model, targets: Sequence[str], *, dataset: str, explicit_targets: bool, lr=None,
            options: Optional[dict] = None, log: Optional[Callable[[str], None]] = print, testbed: bool = False):
    """``(editor, targets, metadata)`` of baseline ``name`` in an ``lnjax run``. On the default testbed
    (``testbed``) it edits the run's targets (the memory) at ``hparams.FAIR_TESTBED_BASELINE_HPARAMS`` (MEMIT and
    AlphaEdit are refused there); elsewhere on the world dataset its world settings
    (``hparams.MODEL_BASELINE_WORLD_HPARAMS``) and, unless the run names its targets, its world targets. ``lr``
    (FT only) and ``options`` override. Off the world MEMIT and AlphaEdit need ``options["npz"]``
    ({target: MEMIT-format .npz})."""
    from lnjax.world import default_world
    if testbed and name in hparams.FAIR_TESTBED_UNSUPPORTED:
        raise ValueError(f"{name} does not run on the default testbed: the memory it would edit has 36,000-wide "
                         "keys, so its key second moment is a 36,000 x 36,000 matrix (5.2 GB) that it inverts (or "
                         "decomposes) every turn; run it on the dense world model (--model lnjax/assets/world_model)")
    on_world = dataset == "world"
    table = (hparams.FAIR_TESTBED_BASELINE_HPARAMS if testbed
             else hparams.MODEL_BASELINE_WORLD_HPARAMS if on_world else {})
    opts = {**table.get(name, {}), **(options or {})}
    npz = opts.pop("npz", None)
    if lr is not None and name == "ft":
        opts["lr"] = lr
    if on_world and not explicit_targets and not testbed:
        targets = hparams.MODEL_BASELINE_WORLD_TARGETS.get(name, targets)
    editor, meta = make_editor(name, model, targets, world=default_world() if on_world else None, npz=npz,
                               options=opts, log=log)
    return editor, tuple(targets), {**meta, "baseline_settings": dict(opts)}
