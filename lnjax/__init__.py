"""lnjax: lifelong (sequential) model editing with Lifelong Normalization, in JAX.

    import lnjax as lx
    ed = lx.editors.stableedit(lr=1e-6, alpha=10.0)
    state = ed.init({"model.layers.29.mlp.down_proj": (14336, 4096)})
    deltas, state = ed.update({"model.layers.29.mlp.down_proj": lx.Features(keys=K, value_grads=G)}, state)

Submodules and the names below are imported on first use (``import lnjax`` itself loads nothing heavy); the
README lists what every module holds and docs/method.md the maths.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("baselines", "batching", "checkpoint", "cli", "cpu_threads", "data", "editors", "engine", "eval",
               "features", "ft", "hf", "hf_layout", "hparams", "hypernet", "key_stats", "ln", "locate",
               "memory_testbed", "meta", "models", "plots", "presets", "probe", "protocol", "report", "run",
               "sequence", "sharding", "solve", "world", "world_model")
_NAMES = {"Editor": "editors", "EditorState": "editors", "Features": "features", "TurnBatch": "batching",
          "EditTurn": "batching", "SequenceResult": "sequence", "edit_sequence": "sequence"}

__all__ = sorted(_SUBMODULES + tuple(_NAMES)) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lnjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
