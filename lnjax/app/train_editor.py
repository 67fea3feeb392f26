"""Meta-trained editors for a run: ``lnjax train-editor`` and ``trained_editor`` (the hypernetworks of
``lnjax.editors.hypernet`` trained by ``lnjax.engine.meta`` on a training split -- the embedded world's, or
records the caller tokenized for its own model -- cached under the lnjax cache root and resumed when
interrupted)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, NamedTuple, Optional, Sequence

from lnjax import data as data_lib
from lnjax.core.options import fold
from lnjax.core.protocol import Editor
from lnjax.core.tree import frozen_and_kernels
from lnjax.core.turns import REFERENCE_MINIBATCH_SIZE
from lnjax.editors import hypernet as hn
from lnjax.engine.meta import (MetaConfig, TrainTurns, default_configs, fingerprint, load_trained, save_trained, train,
                               training_turns)
from lnjax.io import builtin_models, checkpoint
from lnjax.world import default_world
from lnjax.world.world_model import DEFAULT_TARGETS, default_model


def world_training_turns(n_edits: int, edits_per_turn: int, seed: int = 0) -> TrainTurns:
    """Turns of ``n_edits`` records of the embedded world's training split (disjoint from its edit split)."""
    w = default_world()
    records = data_lib.records_from_dicts("zsre", w.records("train", n_edits, seed=seed), "world:train")
    return training_turns(data_lib.tokenize(records, w.tokenizer()), edits_per_turn)


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """How ``trained_editor`` (and ``training_plan``) meta-train: ``n_train`` records (None: all of them) of
    ``records`` -- ``lnjax.data.TokenizedRecord``s tokenized for the model being edited, in the order given -- or,
    without ``records``, of the embedded world's training split drawn with ``seed`` (tokenized for the world's
    models only: another model needs its own ``records``), in turns of ``edits_per_turn``, mini-batches of
    ``minibatch_size``, ``options`` overriding ``default_configs`` fields by name (they may also carry ``n_train``,
    as ``lnjax run``'s editor options do), the cache under ``cache_dir`` (None: ``hypernets/`` under the lnjax
    cache root). Keyword arguments of those functions are folded into it (``lnjax.core.options.fold``)."""

    cache_dir: Optional[str] = None
    n_train: Optional[int] = None
    edits_per_turn: int = 100
    seed: int = 0
    minibatch_size: int = REFERENCE_MINIBATCH_SIZE
    options: Optional[dict] = None
    records: Optional[Sequence] = None


def trained_editor(name: str, model, targets: Sequence[str], training: Optional[TrainingOptions] = None, *,
                   reset_at_eval: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                   **overrides) -> Editor:
    """Registry editor ``name`` (``rledit``, ``malmen_no_normalization``, ...) for ``model``, meta-trained as
    ``training`` (``TrainingOptions``, or its fields as keyword arguments) says, unless a net trained with the same
    model, data and configs is cached in its cache directory (an interrupted training there resumes)."""
    plan = training_plan(name, model, targets, fold(TrainingOptions, training, overrides, "trained_editor"))
    final = os.path.join(plan.directory, "trained")
    if os.path.isdir(final):
        log(f"{name}: using the meta-trained hypernetwork in {final}")
        trained = load_trained(final, plan.net, plan.shapes)
    else:
        trained, report = train(model, targets, plan.turns, plan.net, plan.meta,
                                checkpoint_dir=os.path.join(plan.directory, "train"), resume=True, progress=progress,
                                log=log)
        save_trained(final, trained, report)
        # the resume states serve an interrupted meta-training only; kept, they grew the cache by 1-5 GB a network
        checkpoint.RunCheckpointer(os.path.join(plan.directory, "train")).drop_states()
    return hn.REGISTRY[name](trained, reset_at_eval=reset_at_eval, apply=model.apply,
                             minibatch_size=plan.meta.minibatch_size)


class TrainingPlan(NamedTuple):
    """What ``trained_editor`` trains and where: the configs, the training turns, the target shapes and the
    cache ``directory`` (``<cache_dir>/<name>-<fingerprint>``; ``train/`` holds the checkpoints and per-turn
    diagnostics, ``trained/`` the final net)."""

    net: hn.NetConfig
    meta: MetaConfig
    turns: TrainTurns
    shapes: dict
    directory: str


def training_plan(name: str, model, targets: Sequence[str], training: Optional[TrainingOptions] = None,
                  **overrides) -> TrainingPlan:
    """The ``TrainingPlan`` of ``trained_editor`` with the same ``training`` (no training, no file access)."""
    run = fold(TrainingOptions, training, overrides, "training_plan")
    options = dict(run.options or {})
    n_train = options.pop("n_train", run.n_train)
    net, meta = default_configs(name, **{"minibatch_size": run.minibatch_size, **options})
    if run.records is not None:
        records = list(run.records)[:n_train] if n_train is not None else list(run.records)
        if n_train is not None and len(records) < n_train:
            raise ValueError(f"{name}: n_train={n_train} but only {len(records)} training records were given")
        turns = training_turns(records, run.edits_per_turn)
    else:
        n = n_train if n_train is not None else len(default_world().all_facts("train"))
        turns = world_training_turns(n, run.edits_per_turn, run.seed)
    _, base = frozen_and_kernels(model.params, tuple(targets))
    key = hashlib.sha256(json.dumps(fingerprint(base, turns, net, meta), sort_keys=True).encode()).hexdigest()
    # the one cache root (lnjax.io.builtin_models.cache_dir), not a path relative to the working directory
    cache_dir = run.cache_dir or os.path.join(builtin_models.cache_dir(), "hypernets")
    return TrainingPlan(net, meta, turns, {t: tuple(k.shape) for t, k in base.items()},
                        os.path.join(os.path.abspath(cache_dir), f"{name}-{key[:16]}"))


def add_cli(sub) -> None:
    """Register ``lnjax train-editor`` on the CLI's subparsers ``sub``."""
    p = sub.add_parser("train-editor", help="meta-train hypernetwork editors on the embedded world (cached)",
                       description="Meta-train rledit/malmen/mend (or their *_no_normalization ablations) for the "
                                   "embedded world model on the world's training split, resumably, into the "
                                   "cache that `lnjax run --model lnjax/assets/world_model --editor ...` reads "
                                   "(the dense testbed of experiments/REPORT.md §10).")
    p.add_argument("editors", help=f"comma-separated, from {','.join(sorted(hn.REGISTRY))}")
    p.add_argument("--n-train", type=int, default=None, help="training records (default: the whole split)")
    p.add_argument("--edits-per-turn", type=int, default=100)
    p.add_argument("--minibatch-size", type=int, default=REFERENCE_MINIBATCH_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a NetConfig/MetaConfig field, e.g. --set meta_lr=1e-3 --set n_epochs=3")
    p.add_argument("--cache-dir", default=None, help="default: hypernets/ under the lnjax cache ($LNJAX_CACHE or ~/.cache/lnjax)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cli_main(args) -> int:
    """Run ``lnjax train-editor`` with parsed ``args``; returns the exit status."""
    import ast
    import sys

    options = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"lnjax train-editor: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    names = [n.strip() for n in args.editors.split(",") if n.strip()]
    unknown = [n for n in names if n not in hn.REGISTRY]
    if unknown:
        print(f"lnjax train-editor: unknown editor(s) {unknown}; known: {sorted(hn.REGISTRY)}", file=sys.stderr)
        return 2
    model = default_model()
    for name in names:
        trained_editor(name, model, DEFAULT_TARGETS, cache_dir=args.cache_dir, n_train=args.n_train,
                       edits_per_turn=args.edits_per_turn, seed=args.seed, minibatch_size=args.minibatch_size,
                       options=options, progress=not args.quiet)
    return 0
