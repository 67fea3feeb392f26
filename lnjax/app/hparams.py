"""Tuned learning rates, ridge strengths and warm-up lengths: the one place lnjax keeps the tables.

The editors' own defaults live in their factories' signatures (``lnjax.editors``; ``EDITOR_DEFAULTS`` reads them
from there), ``lnjax.app.presets`` takes its published values from
``published``, ``lnjax run`` its per-editor values from ``resolve`` and its ``--help`` text from ``help_text``.
Where the numbers come from is docs/method.md §8.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

from lnjax import editors as _editors

LN_EDITORS = ("ultraedit", "stableedit", "stableedit_algorithm1", "no_normalization", "per_turn_normalization")


def _signature_defaults(name: str) -> dict:
    params = inspect.signature(_editors.REGISTRY[name]).parameters
    return {"lr": params["lr"].default, "alpha": params["alpha"].default}


# The editors' own defaults, read from the factories' signatures (their one home): the published setting for the
# 7-8B models (lr 1e-6; ridge α = 1 for UltraEdit and its ablations, α = 10 for StableEdit).
EDITOR_DEFAULTS = {name: _signature_defaults(name) for name in LN_EDITORS}

# Published runs whose learning rate differs from the method's default: (model, method) -> lr.
PUBLISHED_LR = {("gptj-6b", "stableedit"): 2e-6, ("qwen2.5-7b", "stableedit"): 2e-6}
# Warm-up turns of the published 20K-edit runs (StableEdit draws them from the training split).
PUBLISHED_WARMUP_TURNS = {"stableedit": 20, "ultraedit": 0}

# Hyperparameters for the shipped world model edited at its dense down_proj 1-3 (a world-model --model; the default
# before the fact-memory testbed), from experiments/tune_world.py on seed-1 edits (20 turns of 100):
# each editor at the learning rate where locality vs the unedited model falls to about 0.67, so the editors are
# compared at equal damage. On this world none of them writes the edits well: experiments/REPORT.md gives the
# frontier and the measured reason (the small model's keys have too low an effective dimension).
WORLD_HPARAMS = {
    "stableedit": {"lr": 3e-2, "alpha": 10.0},
    "stableedit_algorithm1": {"lr": 3e-2, "alpha": 10.0},
    "ultraedit": {"lr": 1e-2, "alpha": 1.0},
    "no_normalization": {"lr": 3.0, "alpha": 1.0},
    "per_turn_normalization": {"lr": 1e-2, "alpha": 1.0},
}

# The all-wordings testbed (lnjax.world.memory_testbed.DEFAULT_SETTINGS: keys from every wording, so GS is decided
# by construction; lnjax run's default before issue 23, kept for the studies run on it), from
# experiments/tune_world.py on seed-1 edits (20 turns of 100; REPORT.md §8, "A memory keyed by facts"). A turn's
# writes reach almost no fact it does not edit there, so there is no damage to compare the editors at: UltraEdit
# takes the smallest swept lr at which its edits are written (ES ≥ 0.9; 10 writes the same), StableEdit likewise
# (its whitened values are smaller: ES 0.32 / 0.60 / 0.82 / 0.93 at lr 3 / 10 / 30 / 100), and the ablations
# UltraEdit's lr — the normalization removed, nothing else changed, as in Fig. 1(a).
TESTBED_HPARAMS = {
    "stableedit": {"lr": 100.0, "alpha": 10.0},
    "stableedit_algorithm1": {"lr": 100.0, "alpha": 10.0},
    "ultraedit": {"lr": 3.0, "alpha": 1.0},
    "no_normalization": {"lr": 3.0, "alpha": 1.0},
    "per_turn_normalization": {"lr": 3.0, "alpha": 1.0},
}
# lnjax run's default: the fair testbed (lnjax.world.memory_testbed.FAIR_SETTINGS, keys from wording 0 only) under
# the fair protocol (lnjax.world.fair). Run name -> the registry editor it runs and its lr / alpha, chosen by
# experiments/tune_fair.py on the *tune* subjects only (never evaluated): the same budget for every editor (7 lrs
# half a decade apart around a centre fixed beforehand, one seed of 5 turns of 100 edits), the rule max mean(ES,
# GS, lowest locality over the random set and every family). Results and command:
# experiments/results/fair_protocol/tuning.json (`python experiments/tune_fair.py --turns 5 --out ...`).
# ``no_normalization`` is the same-lr ablation (UltraEdit's lr, the normalization removed: the papers' Fig. 1a);
# ``no_normalization_tuned`` the same un-normalized solve at its own tuned lr.
FAIR_TESTBED_HPARAMS = {
    "stableedit": {"editor": "stableedit", "lr": 316.22776601683796, "alpha": 10.0},
    "ultraedit": {"editor": "ultraedit", "lr": 9.486832980505138, "alpha": 1.0},
    "no_normalization": {"editor": "no_normalization", "lr": 9.486832980505138, "alpha": 1.0},
    "no_normalization_tuned": {"editor": "no_normalization", "lr": 1e8, "alpha": 1.0},
    "per_turn_normalization": {"editor": "per_turn_normalization", "lr": 30.0, "alpha": 1.0},
}
# How FAIR_TESTBED_HPARAMS was chosen, recorded in lnjax run's results metadata (``metadata.protocol.tuning``).
FAIR_TUNING = {
    "results": "experiments/results/fair_protocol/tuning.json",
    "command": "python experiments/tune_fair.py --turns 5 --out experiments/results/fair_protocol/tuning.json",
    "subjects": "the tune role of lnjax.world.fair.fair_split (disjoint from the evaluated subjects)",
    "budget": "7 lrs half a decade apart around a centre fixed before tuning, 1 seed of 5 turns of 100 edits, "
              "the same for every editor",
    "rule": "max mean(ES, GS, lowest locality over the random set and every family); ties to the smaller lr",
    "same_lr_ablation": "no_normalization takes UltraEdit's tuned lr (not tuned itself)",
    "ft": "FAIR_TESTBED_BASELINE_HPARAMS: three 7-point grids (21 points, more than the others' 7): around its "
          "published 5e-4, with and without "
          "the L-inf box (experiments/results/fair_protocol/tuning_ft.json: nothing written at any point), then "
          "without the box around 10, the lr whose Adam steps reach the memory's value scale "
          "(tuning_ft_scaled.json; python experiments/tune_fair.py --turns 5 --editors ft_unconstrained_scaled)",
    "hypernetworks": "FAIR_TESTBED_BASELINE_HPARAMS: the initial edit lr of meta-training (on the world's train "
                     "pool), one 7-point grid around 3 (experiments/results/fair_protocol/tuning_hypernets.json; "
                     "python experiments/tune_fair.py --editors rledit,malmen,mend --turns 5; MALMEN's grid one point "
                     "per process, tuning_malmen.json, tuning_mend.json): rledit and malmen at the grid's largest "
                     "point, mend inside it",
}
# Run names that are a registry editor at other settings (``registry_name``).
RUN_ALIASES = {name: v["editor"] for name, v in FAIR_TESTBED_HPARAMS.items() if v["editor"] != name}

# The baselines that run the model (lnjax.app.baselines: FT, MEMIT, AlphaEdit) on the embedded world, where a
# published value is tied to model scale: the world model's residual stream has norm ~3000 at
# the edited position, so Adam's per-coordinate v_lr of 0.5 cannot move z in 25 steps (v_lr 20), and it looks
# facts up at the question mark after the subject (fact_token="prompt_last"). Everything else is published: MEMIT's
# λ = 15000 (over 2,000 edits it keeps locality 0.85 where λ = 100 destroys the model), AlphaEdit's absolute
# null-space threshold, FT-M with ε = 5e-5. Measured in experiments/locate_baselines.py (REPORT.md §7).
MODEL_BASELINES = ("ft", "memit", "alphaedit")
# The meta-trained hypernetwork editors (lnjax.editors.hypernet): their edit lr and ridge are learned, not set here.
META_TRAINED = ("rledit", "malmen", "mend", "rledit_no_normalization", "malmen_no_normalization",
                "mend_no_normalization")
# FT on the default (fair) testbed, edited at the memory's value_proj like every other editor there: FT-M without
# the L-inf box (the published eps = 5e-5 box writes nothing at any lr of its grid: the memory's values start at
# zero and must reach the residual stream's scale), lr chosen on the tune subjects with 7-point grids like the LN
# editors', but three of them (21 points; experiments/tune_fair.py: tuning_ft.json, tuning_ft_scaled.json; the
# largest lr of the last grid). MEMIT and
# AlphaEdit have no row: the memory's 36,000-wide keys make their key second moment 36,000 x 36,000.
# The meta-trained hypernetworks' rows (``lnjax.app.run.meta_options``) hold the edit lr their meta-training starts
# from (NetConfig.lr; meta-training then learns it per module), tuned with one 7-point grid around 3 like the LN
# editors' (experiments/results/fair_protocol/tuning_hypernets.json, tuning_malmen.json, tuning_mend.json; RLEdit and
# MALMEN at the grid's largest point, MEND inside it). Their no-LN twins have no row (not tuned).
FAIR_TESTBED_BASELINE_HPARAMS = {
    "ft": {"lr": 316.22776601683796, "norm_constraint": None},
    "rledit": {"lr": 94.86832980505137},
    "malmen": {"lr": 94.86832980505137},
    "mend": {"lr": 9.486832980505138},
}
FAIR_TESTBED_UNSUPPORTED = ("memit", "alphaedit")
# The model-running baselines' settings on the embedded world (the paragraph above MODEL_BASELINES); a table of
# its own, not the LN editors' WORLD_HPARAMS.
MODEL_BASELINE_WORLD_HPARAMS = {
    "ft": {},
    "memit": {"fact_token": "prompt_last", "v_lr": 20.0},
    "alphaedit": {"fact_token": "prompt_last", "v_lr": 20.0},
}
# MEMIT's z is taken at the last edited block; on the 4-block world model that must not be the last block, whose
# output at the question mark reaches only the first answer token.
MODEL_BASELINE_WORLD_TARGETS = {"memit": ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"),
                                "alphaedit": ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")}


# lnjax run's defaults on the built-in real models (``lnjax.io.builtin_models``), on their default targets
# (SmolLM2: down_proj of layers 25-28). UltraEdit at the lr where the released UltraEdit code, one turn of 100
# city->country edits on these layers, keeps locality ~0.7; StableEdit's whitened keys have the same squared norm
# (~d_in) as UltraEdit's standardized ones, so the same lr gives the same value-step size. Not tuned for a score.
# No-LN at lr 3: the raw value step -lr‖k‖²g equals LN's standardized step at lr 1e-3 (measured ratio of the step
# scales on these layers ≈ 2.8e3, experiments/smollm2_study.py).
MODEL_HPARAMS = {
    "smollm2": {
        "ultraedit": {"lr": 1e-3, "alpha": 1.0},
        "stableedit": {"lr": 1e-3, "alpha": 10.0},
        "stableedit_algorithm1": {"lr": 1e-3, "alpha": 10.0},
        "no_normalization": {"lr": 3.0, "alpha": 1.0},
        "per_turn_normalization": {"lr": 1e-3, "alpha": 1.0},
    },
}


def defaults(editor: str) -> dict:
    """``{"lr", "alpha"}`` an editor factory uses when not given (ValueError for an unknown editor)."""
    if editor not in EDITOR_DEFAULTS:
        raise ValueError(f"unknown editor {editor!r}; known: {sorted(EDITOR_DEFAULTS)}")
    return dict(EDITOR_DEFAULTS[editor])


def published(model: str, method: str) -> tuple[float, float, int]:
    """``(lr, alpha, warmup_turns)`` of the published ``method`` run on ``model``."""
    base = defaults(method)
    return PUBLISHED_LR.get((model, method), base["lr"]), base["alpha"], PUBLISHED_WARMUP_TURNS.get(method, 0)


def registry_name(editor: str) -> str:
    """The registry editor a run name stands for (``no_normalization_tuned`` -> ``no_normalization``)."""
    return RUN_ALIASES.get(editor, editor)


def uses_warmup(editor: str) -> bool:
    """Whether ``editor`` is a StableEdit variant (the methods with warm-up turns)."""
    return editor.startswith("stableedit")


def tuned_table(model: Optional[str], dataset: str) -> tuple[Optional[str], dict]:
    """``(name, table)`` of the tuned table a run of ``model`` on ``dataset`` takes its lr and alpha from, or
    ``(None, {})`` where lnjax has tuned none. The combinations, stated once (a table belongs to a model *and* the
    data it was tuned on; one tuned for another model or dataset is never borrowed):

    - the default testbed (``model`` None) on ``"world"``: ``FAIR_TESTBED_HPARAMS``;
    - a world-model directory (``lnjax.world.world_model.is_model_dir``) on ``"world"``: ``WORLD_HPARAMS``;
    - a built-in model with a row in ``MODEL_HPARAMS`` on a real-text dataset (not ``"world"``): that row.
    """
    from lnjax.world import world_model
    if dataset == "world" and model is None:
        return "FAIR_TESTBED_HPARAMS", FAIR_TESTBED_HPARAMS
    if dataset == "world" and world_model.is_model_dir(model):
        return "WORLD_HPARAMS", WORLD_HPARAMS
    if dataset != "world" and model in MODEL_HPARAMS:
        return f"MODEL_HPARAMS[{model!r}]", MODEL_HPARAMS[model]
    return None, {}


def _untuned(editor: str, model: Optional[str], dataset: str, table: Optional[str]) -> None:
    """No tuned lr for ``editor`` on ``model`` x ``dataset`` and none given: refused for the models lnjax ships
    (the testbed, a world model, a built-in one: their scale is far from the published 7-8B setting, so its
    default would edit nothing), a warning for any other checkpoint (the published setting is its best guess)."""
    from lnjax.io import builtin_models
    from lnjax.world import world_model
    where = f"--model {model or '(the default testbed)'} on --dataset {dataset}"
    why = f"{table} has no {editor!r}" if table else "no table was tuned for that combination"
    if model is None or world_model.is_model_dir(model) or builtin_models.is_builtin(model):
        raise ValueError(f"no tuned learning rate for {editor!r} with {where} ({why}; see lnjax.app.hparams."
                         f"tuned_table); pass --lr (and --alpha)")
    default = defaults(registry_name(editor))
    warnings.warn(f"no tuned learning rate for {editor!r} with {where} ({why}): using the editor's published "
                  f"7-8B-model default lr {default['lr']:g}, alpha {default['alpha']:g}; pass --lr to choose",
                  UserWarning, stacklevel=3)


def resolve(editor: str, *, dataset: str, turns: int, lr: Optional[float] = None, alpha: Optional[float] = None,
            warmup_turns: Optional[int] = None, model: Optional[str] = None) -> dict:
    """What a run of ``editor`` uses: ``lr`` and ``alpha`` (the given value, else the value in the table
    ``tuned_table(model, dataset)`` names, else the editor's default) and ``warmup_turns`` (the given value, else
    ``turns // 10`` (at least 1) for StableEdit editors and 0 for the others). For the model-running baselines
    and the meta-trained editors ``lr`` and ``alpha`` stay as given (None: the editor's own settings; only FT
    takes an ``lr``; the hypernetworks learn theirs). Without ``lr`` and without a tuned one, a model lnjax
    ships is refused (ValueError) and any other checkpoint gets the editor's published default with a warning
    (``_untuned``)."""
    if editor in MODEL_BASELINES or editor in META_TRAINED:
        return {"lr": lr, "alpha": alpha, "warmup_turns": warmup_turns or 0}
    if editor in RUN_ALIASES and not (dataset == "world" and model is None):
        raise ValueError(f"{editor!r} is {RUN_ALIASES[editor]} at its lr tuned on the default testbed; elsewhere run "
                         f"{RUN_ALIASES[editor]} with --lr")
    table, tuned = tuned_table(model, dataset)
    own = tuned.get(editor, {})
    if lr is None and "lr" not in own:
        _untuned(editor, model, dataset, table)
    base = {**defaults(registry_name(editor)), **{k: own[k] for k in ("lr", "alpha") if k in own}}
    warm = warmup_turns if warmup_turns is not None else (max(1, turns // 10) if uses_warmup(editor) else 0)
    return {"lr": base["lr"] if lr is None else lr, "alpha": base["alpha"] if alpha is None else alpha,
            "warmup_turns": warm}


def help_text(field: str) -> str:
    """The ``lnjax run --help`` text of ``--lr`` or ``--alpha``: the per-editor defaults, from the tables above."""
    testbed = ", ".join(f"{k} {v[field]:g}" for k, v in FAIR_TESTBED_HPARAMS.items())
    world = ", ".join(f"{k} {v[field]:g}" for k, v in WORLD_HPARAMS.items())
    own = ", ".join(f"{k} {v[field]:g}" for k, v in EDITOR_DEFAULTS.items())
    what = "editor learning rate" if field == "lr" else "ridge strength"
    return (f"{what} (default per editor; on the default testbed: {testbed}; on a world-model --model: {world}; "
            f"otherwise: {own})")
