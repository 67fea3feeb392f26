"""lnjax: lifelong (sequential) model editing with Lifelong Normalization, in JAX.

    import lnjax as lx
    ed = lx.editors.stableedit(lr=1e-6, alpha=10.0)
    state = ed.init({"model.layers.29.mlp.down_proj": (14336, 4096)})
    deltas, state = ed.update({"model.layers.29.mlp.down_proj": lx.Features(keys=K, value_grads=G)}, state)

The package is drawn in layers, each a subpackage that imports only the ones before it (tests/test_layers.py
holds the table):

    core     the method's maths and contracts: LN statistics, ridge solves, Features, the Editor protocol, turns
    models   pure decoders (Llama/Mistral/Qwen2, GPT-2, GPT-J) and the probe (keys, value gradients)
    editors  the registry and every editor family: lifelong normalization, FT, MEMIT/AlphaEdit, hypernetworks
    io       HF safetensors, GGUF, built-in models, Orbax checkpoints, the cache root
    engine   the compiled scan over turns, edit_sequence (the host loop with hooks), sharding, meta-training
    data     readers of the field's edit files, tokenization, the real-fact set
    eval     protocol-named metrics
    world    the synthetic world, its shipped models and testbeds
    app      lnjax run / train-editor, tuned tables, presets of the published runs, reports and plots

The names below are the public face; subpackages load on first use (``import lnjax`` itself loads nothing heavy).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = ("core", "models", "editors", "io", "engine", "data", "eval", "world", "app")
# Short names for the modules users reach for most (``lx.hf.load``, ``lx.presets.targets``, ...).
_ALIASES = {"hf": "io.hf", "presets": "app.presets", "hparams": "app.hparams"}
_NAMES = {"Editor": "core.protocol", "EditorState": "core.protocol", "Features": "core.features",
          "TurnBatch": "core.turns", "EditTurn": "core.turns", "SequenceResult": "engine.sequence",
          "SequenceOptions": "engine.sequence",
          "edit_sequence": "engine.sequence", "prepare_edits": "eval.prepare", "PreparedEdits": "eval.prepare"}

__all__ = sorted(_SUBPACKAGES + tuple(_ALIASES) + tuple(_NAMES)) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _ALIASES:
        return importlib.import_module(f".{_ALIASES[name]}", __name__)
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lnjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
