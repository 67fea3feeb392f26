"""Learning rates, ridge strengths and warm-up lengths: the one place lnjax keeps them.

The editor factories take their defaults from ``EDITOR_DEFAULTS``, ``lnjax.presets`` its published values from
``published``, ``lnjax run`` its per-editor values from ``resolve`` and its ``--help`` text from ``help_text``.
Where the numbers come from is docs/method.md §8.
"""

from __future__ import annotations

from typing import Optional

# The editors' own defaults: the published setting for the 7-8B models (lr 1e-6; ridge α = 1 for UltraEdit and
# its ablations, α = 10 for StableEdit).
EDITOR_DEFAULTS = {
    "ultraedit": {"lr": 1e-6, "alpha": 1.0},
    "stableedit": {"lr": 1e-6, "alpha": 10.0},
    "stableedit_algorithm1": {"lr": 1e-6, "alpha": 10.0},
    "no_normalization": {"lr": 1e-6, "alpha": 1.0},
    "per_turn_normalization": {"lr": 1e-6, "alpha": 1.0},
}

# Published runs whose learning rate differs from the method's default: (model, method) -> lr.
PUBLISHED_LR = {("gptj-6b", "stableedit"): 2e-6, ("qwen2.5-7b", "stableedit"): 2e-6}
# Warm-up turns of the published 20K-edit runs (StableEdit draws them from the training split).
PUBLISHED_WARMUP_TURNS = {"stableedit": 20, "ultraedit": 0}

# Hyperparameters for the embedded world, from experiments/tune_world.py on seed-1 edits (20 turns of 100):
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


def defaults(editor: str) -> dict:
    """``{"lr", "alpha"}`` an editor factory uses when not given (ValueError for an unknown editor)."""
    if editor not in EDITOR_DEFAULTS:
        raise ValueError(f"unknown editor {editor!r}; known: {sorted(EDITOR_DEFAULTS)}")
    return dict(EDITOR_DEFAULTS[editor])


def published(model: str, method: str) -> tuple[float, float, int]:
    """``(lr, alpha, warmup_turns)`` of the published ``method`` run on ``model``."""
    base = defaults(method)
    return PUBLISHED_LR.get((model, method), base["lr"]), base["alpha"], PUBLISHED_WARMUP_TURNS.get(method, 0)


def uses_warmup(editor: str) -> bool:
    """Whether ``editor`` is a StableEdit variant (the methods with warm-up turns)."""
    return editor.startswith("stableedit")


def resolve(editor: str, *, dataset: str, turns: int, lr: Optional[float] = None, alpha: Optional[float] = None,
            warmup_turns: Optional[int] = None, model: Optional[str] = None) -> dict:
    """What a run of ``editor`` uses: ``lr`` and ``alpha`` (the given value, else the world's tuned value on the
    ``"world"`` dataset, else built-in ``model``'s (``lnjax.builtin_models``), else the editor's default) and
    ``warmup_turns`` (the given value, else ``turns // 10`` (at least 1) for StableEdit editors and 0 for the
    others)."""
    from .builtin_models import hparams as builtin_hparams
    tuned = WORLD_HPARAMS.get(editor, {}) if dataset == "world" else builtin_hparams(model, editor)
    base = {**defaults(editor), **tuned}
    warm = warmup_turns if warmup_turns is not None else (max(1, turns // 10) if uses_warmup(editor) else 0)
    return {"lr": base["lr"] if lr is None else lr, "alpha": base["alpha"] if alpha is None else alpha,
            "warmup_turns": warm}


def help_text(field: str) -> str:
    """The ``lnjax run --help`` text of ``--lr`` or ``--alpha``: the per-editor defaults, from the tables above."""
    world = ", ".join(f"{k} {v[field]:g}" for k, v in WORLD_HPARAMS.items())
    own = ", ".join(f"{k} {v[field]:g}" for k, v in EDITOR_DEFAULTS.items())
    what = "editor learning rate" if field == "lr" else "ridge strength"
    return f"{what} (default per editor; on --dataset world: {world}; otherwise: {own})"
