"""World models grown with key-value memories (``ModelConfig.memory_layers``): testbeds whose edited module,
``model.layers.{i}.memory.value_proj``, sees a wide, sparse, high-rank key code — and the default testbed of
``lnjax run``.

A grown memory starts empty (``value_proj`` = 0, so the grown model computes exactly what the base model does).
Its input is centred and whitened on the prompts of the world's ``train`` pool (never the edit or locality
pools). Two kinds of slots (experiments/REPORT.md §8 has the measured effect of each):

- ``slot_keys="random"``: random slot directions read by z-score (a slot fires ``threshold`` standard deviations
  above the token's mean score);
- ``slot_keys="facts"``: one slot per fact of the world — the pretraining corpus, never an edit's new target —
  keyed by the mean direction of the fact's whitened first-answer-row input over ``key_wordings`` (all of its
  wordings, or only wording 0 in the fair testbed) and read by cosine.
  With an ``anchor`` token (the question mark) the memory is read, at each of the ``offsets`` answer positions
  after it, with the input at the anchor, one copy of the slots per position; with ``winner`` only the
  best-matching fact's slot fires.

The default testbed (``default_testbed``) is the shipped world model finished without label smoothing
(``lnjax/assets/world_model_unsmoothed``: 14 more epochs, so that it holds its facts with margins an edit can be
measured against) with an anchored, winner-take-all fact memory at block 3: every fact of the world reads slots of
its own, which is the regime the LN editors assume (a turn's writes reach almost no fact it does not edit). It is
built once (about 1.5 minutes on two CPU cores) into ``$LNJAX_CACHE/world_memory`` (default ``~/.cache/lnjax``) and
loaded from there afterwards. Its keys average every wording, including the paraphrases generalization is scored
on, so on it GS is the memory's routing rate — decided by construction (a unit test, not evidence).
``FAIR_SETTINGS`` (what ``lnjax run`` uses, issue 23) builds keys and whitening from wording 0 only
(``lnjax.world.fair``): the paraphrases and every locality probe are then in wordings the memory never saw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lnjax.io import builtin_models
from lnjax import data
from lnjax.world import world_model
from lnjax.core.turns import IGNORE, pack
from lnjax.models import Model
from lnjax.models.probe import turn_features
from lnjax.world import World, default_world

BASE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "world_model_unsmoothed")
# The default testbed: a fact memory at block 3 of the unsmoothed world model, read at the question mark for the
# three answer positions after it (the world's answers have at most three tokens), winner-take-all, firing
# above cosine 0.9. Chosen from the single-turn and 20-turn sweeps of experiments/REPORT.md §8.
DEFAULT_SETTINGS = {"layers": (3,), "slot_keys": "facts", "anchor": "?", "offsets": 3, "winner": True,
                    "threshold": 0.9, "ridge": 1e-3, "seed": 0}
# The fair testbed (issue 23, lnjax.world.fair): the same memory with slot keys and whitening built from wording 0
# alone (the wording edits are written in); the other two wordings are only scored. The default of ``lnjax run``.
FAIR_SETTINGS = {**DEFAULT_SETTINGS, "key_wordings": [0]}
DEFAULT_TARGETS = tuple(f"model.layers.{i}.memory.value_proj" for i in DEFAULT_SETTINGS["layers"])


def supervised_keys(model: Model, targets, pairs) -> tuple[dict, np.ndarray]:
    """Keys [rows, d_in] (float64) per target at the supervised positions of ``pairs`` ((prompt_ids, answer_ids)
    each), and which rows [rows] bool are the first answer position of their example."""
    batch = pack(pairs)
    feats, _, n = turn_features(model.apply, model.params, targets, batch)
    n = int(n)
    labels = np.asarray(batch.labels)
    first = np.concatenate([[True] + [False] * (int((row != IGNORE).sum()) - 1) for row in labels])
    return {t: np.asarray(feats[t].keys[:n], np.float64) for t in targets}, first[:n]


def whitening(x: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [d], W [d, d])`` with ``W = (C + ridge·λ_max I)^(-1/2)`` for the covariance C of rows x [n, d];
    ``ridge`` < 0 gives ``W = I`` (centring only)."""
    mean = x.mean(0)
    if ridge < 0:
        return mean, np.eye(x.shape[1])
    ev, u = np.linalg.eigh(np.cov(x.T))
    return mean, (u / np.sqrt(ev + ridge * ev.max())) @ u.T


def empty_memories(cfg, params: dict, seed: int) -> dict:
    """``params`` with an empty memory (random slot directions, zero values) at each of ``cfg.memory_layers``."""
    params = jax.tree_util.tree_map(lambda a: a, params)
    d, slots, keys = cfg.d_model, cfg.memory_slots, cfg.memory_slots // cfg.memory_offsets
    for i, k in zip(cfg.memory_layers, jax.random.split(jax.random.PRNGKey(seed), len(cfg.memory_layers))):
        params["model"]["layers"][i]["memory"] = {
            "key_proj": {"kernel": jax.random.normal(k, (d, keys)) / d ** 0.5, "bias": jnp.zeros((keys,))},
            "value_proj": {"kernel": jnp.zeros((slots, d))}}
        if cfg.memory_code == "cosine":
            params["model"]["layers"][i]["memory"]["in_proj"] = {"kernel": jnp.eye(d), "bias": jnp.zeros((d,))}
    return params


def memory_inputs(model: Model, layers: tuple, pairs: list, chunk: int = 2000) -> tuple[dict, np.ndarray]:
    """Inputs [rows, d] of a memory at each block of ``layers`` (dict by ``key_proj`` target name) at the
    supervised positions of ``pairs``, and which rows are first answer rows."""
    # An empty memory adds nothing to the residual stream, so its input is the same with 8 slots as with many:
    # read it on a small one, which keeps this pass's memory independent of the slots.
    small = dataclasses.replace(model.config, memory_layers=layers, memory_slots=8, memory_code="zscore",
                                memory_threshold=2.5, memory_anchor=-1, memory_offsets=1, memory_winner=False)
    small_model = Model(small, empty_memories(small, model.params, 0))
    targets = [f"model.layers.{i}.memory.key_proj" for i in layers]
    parts = [supervised_keys(small_model, targets, pairs[i:i + chunk]) for i in range(0, len(pairs), chunk)]
    return ({t: np.concatenate([k[t] for k, _ in parts]) for t in targets},
            np.concatenate([first for _, first in parts]))


def fact_slot_keys(model: Model, layers: tuple, world: World, fits: dict, key_wordings="all") -> dict:
    """Unit slot keys [d, facts] per ``key_proj`` target: for each fact of ``world``, the mean direction of its
    whitened first-answer-row memory input over the wordings ``key_wordings`` (``fits[target] = (mean, W)``).

    ``key_wordings="all"`` (every wording; the construction before issue 23) builds the keys from the very
    paraphrases generalization is scored on, so GS measures the memory's routing: decided by construction, a
    unit test, not evidence. A tuple of wordings (``lnjax.world.fair.KEY_WORDINGS``: the wording edits are
    written in) leaves the other wordings unseen by the memory."""
    from lnjax.world.fair import key_examples
    examples = world_model.fact_examples(world) if key_wordings == "all" else key_examples(world, key_wordings)
    inputs = [memory_inputs(model, layers, pairs) for pairs in examples]
    out = {}
    for t, (mean, w) in fits.items():
        total = 0.0
        for keys, first in inputs:
            u = (keys[t][first] - mean) @ w
            total = total + u / np.linalg.norm(u, axis=1, keepdims=True)
        out[t] = (total / np.linalg.norm(total, axis=1, keepdims=True)).T
    return out


def grown_config(model: Model, world: World, layers: tuple, slots: int, threshold: float, slot_keys: str = "random",
                 anchor: str = "", offsets: int = 1, winner: bool = False):
    """The ``ModelConfig`` of ``model`` grown as ``grow`` describes (ValueError for an inconsistent request)."""
    if slot_keys not in ("random", "facts"):
        raise ValueError(f"slot_keys must be 'random' or 'facts', got {slot_keys!r}")
    if (anchor or winner) and slot_keys != "facts":
        raise ValueError("an anchor or a winner-take-all read needs slot_keys='facts'")
    if anchor and anchor not in world.vocab:
        raise ValueError(f"the anchor {anchor!r} is not a token of the world's vocabulary")
    offsets = offsets if anchor else 1
    return dataclasses.replace(
        model.config, memory_layers=tuple(layers), memory_threshold=threshold, memory_winner=winner,
        memory_slots=world.n_facts * offsets if slot_keys == "facts" else slots,
        memory_code="cosine" if slot_keys == "facts" else "zscore",
        memory_anchor=world.vocab[anchor] if anchor else -1, memory_offsets=offsets)


def grow(model: Model, layers: tuple, slots: int, threshold: float, ridge: float, seed: int = 0,
         slot_keys: str = "random", anchor: str = "", offsets: int = 1, winner: bool = False,
         key_wordings="all") -> Model:
    """``model`` with an empty memory at each block of ``layers`` (module docstring): ``slots`` random slots read
    by z-score, or (``slot_keys="facts"``) one slot per fact of the world (times ``offsets`` with an ``anchor``)
    read by cosine above ``threshold``; inputs whitened with ``ridge`` (``whitening``) fitted on the train pool's
    prompts — in ``key_wordings`` only when those are given (``fact_slot_keys``), so that no scored wording
    reaches the memory."""
    world = default_world()
    cfg = grown_config(model, world, layers, slots, threshold, slot_keys, anchor, offsets, winner)
    if key_wordings == "all":
        recs = data.tokenize(data.records_from_dicts("zsre", world.records("train", len(world.all_facts("train"))),
                                                     "world"), world.tokenizer())
        fit_pairs = [r.edit for r in recs] + [r.paraphrase for r in recs]
    else:
        from lnjax.world.fair import key_examples
        train = np.isin(world.all_facts()[:, 0], world.pools["train"])
        fit_pairs = [p for pairs in key_examples(world, key_wordings) for p, keep in zip(pairs, train) if keep]
    keys, _ = memory_inputs(model, cfg.memory_layers, fit_pairs)
    fits = {t: whitening(k, ridge) for t, k in keys.items()}
    params = empty_memories(cfg, model.params, seed)
    slot_dirs = fact_slot_keys(model, cfg.memory_layers, world, fits, key_wordings) if slot_keys == "facts" else {}
    for i, t in zip(cfg.memory_layers, keys):
        (mean, w), memory = fits[t], params["model"]["layers"][i]["memory"]
        if slot_keys == "facts":
            memory["in_proj"] = {"kernel": jnp.asarray(w, jnp.float32), "bias": -jnp.asarray(mean @ w, jnp.float32)}
            memory["key_proj"] = {"kernel": jnp.asarray(slot_dirs[t], jnp.float32),
                                  "bias": jnp.zeros((slot_dirs[t].shape[1],), jnp.float32)}
        else:
            kernel = jnp.asarray(w, jnp.float32) @ memory["key_proj"]["kernel"]
            memory["key_proj"] = {"kernel": kernel, "bias": -jnp.asarray(mean, jnp.float32) @ kernel}
    return Model(cfg, params)


def cache_dir() -> str:
    """Where the default testbed is kept: ``$LNJAX_CACHE/world_memory`` (default ``~/.cache/lnjax``)."""
    return os.path.join(builtin_models.cache_dir(), "world_memory")


def _fingerprint(settings: dict) -> str:
    # The cached testbed is valid for these settings grown from this shipped model.
    with open(os.path.join(BASE_DIR, "report.json"), "rb") as f:
        base = f.read()
    return hashlib.sha256(base + json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def default_testbed(log: Callable[[str], None] = print, settings: Optional[dict] = None) -> Model:
    """A testbed grown with ``settings`` (default ``DEFAULT_SETTINGS``; ``FAIR_SETTINGS`` is the fair one of
    ``lnjax run``): loaded from ``cache_dir()``, built there first when missing."""
    s = DEFAULT_SETTINGS if settings is None else settings
    directory = os.path.join(cache_dir(), _fingerprint(s))
    if world_model.is_model_dir(directory):
        return world_model.load(directory)
    log(f"building the testbed once (the unsmoothed world model with a fact memory at block 3, about a minute) "
        f"into {directory}")
    wordings = tuple(s["key_wordings"]) if "key_wordings" in s else "all"
    model = grow(world_model.load(BASE_DIR), s["layers"], 0, s["threshold"], s["ridge"], s["seed"], s["slot_keys"],
                 s["anchor"], s["offsets"], s["winner"], wordings)
    tmp = directory + f".tmp{os.getpid()}"
    world_model.save(tmp, model.config, model.params, {"grown_from": "lnjax/assets/world_model_unsmoothed", **s})
    try:
        os.replace(tmp, directory)
    except OSError:  # another process built it meanwhile: keep theirs
        if not world_model.is_model_dir(directory):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model  # what was saved (the builds are deterministic, so a concurrent build saved the same)


__all__ = ["BASE_DIR", "DEFAULT_SETTINGS", "DEFAULT_TARGETS", "FAIR_SETTINGS", "cache_dir", "default_testbed",
           "empty_memories", "fact_slot_keys", "grow", "grown_config", "memory_inputs", "supervised_keys", "whitening"]
