"""Edited modules and hyperparameters of the published runs (docs/method.md §8), per model and method.

    lx.presets.targets("llama3-8b", "stableedit")   # -> ["model.layers.11.mlp.down_proj", ...]
    lx.presets.get("qwen2.5-7b", "stableedit").lr   # -> 2e-6 (20K-edit runs)

``MODELS`` holds the published models' HF configs (architecture fields only), for shape-only work without the
weights, e.g. ``lx.models.abstract_params(lx.hf.config_from_hf(MODELS["llama3-8b"]))``.
"""

from __future__ import annotations

import dataclasses

from lnjax.app.hparams import published


@dataclasses.dataclass(frozen=True)
class Preset:
    """One published configuration: edited ``targets`` (HF module paths), ``lr``, ``alpha``, warm-up turns
    for a 20K-edit run, edits per turn."""

    model: str
    method: str
    targets: tuple
    lr: float
    alpha: float
    warmup_turns: int = 0
    edits_per_turn: int = 100


MODELS = {
    "gptj-6b": {"model_type": "gptj", "vocab_size": 50400, "n_embd": 4096, "n_layer": 28, "n_head": 16,
                "rotary_dim": 64, "n_positions": 2048, "layer_norm_epsilon": 1e-5,
                "activation_function": "gelu_new"},
    "mistral-7b-v0.3": {"model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096,
                        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
                        "rope_theta": 1000000.0, "sliding_window": None},
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
    "qwen2.5-7b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False},
}


def _paths(template: str, layers) -> tuple:
    return tuple(template.format(i) for i in layers)


_gptj = "transformer.h.{}.mlp.fc_out"
_down = "model.layers.{}.mlp.down_proj"
# (model, method) -> edited modules; lr, alpha and warm-up come from lnjax.app.hparams.published.
_PRESETS = {
    ("gptj-6b", "ultraedit"): _paths(_gptj, range(18, 27)),
    ("gptj-6b", "stableedit"): _paths(_gptj, list(range(7, 16)) + list(range(18, 26))),
    ("mistral-7b-v0.3", "ultraedit"): _paths(_down, (29, 30)),
    ("mistral-7b-v0.3", "stableedit"): _paths(_down, range(28, 32)),
    ("llama3-8b", "ultraedit"): _paths("model.layers.{}.mlp.gate_proj", range(11, 16))
                                 + _paths("model.layers.{}.mlp.up_proj", range(18, 25)),
    ("llama3-8b", "stableedit"): _paths(_down, (11, 12, 22, 23, 28, 29, 30)),
    ("qwen2.5-7b", "ultraedit"): _paths("model.layers.{}.mlp.gate_proj", range(18, 27))
                                  + _paths("model.layers.{}.mlp.up_proj", range(18, 27)),
    ("qwen2.5-7b", "stableedit"): _paths(_down, list(range(8, 15)) + list(range(18, 26))),
}


def get(model: str, method: str) -> Preset:
    """The published preset for ``model`` (a key of ``MODELS``) and ``method`` (``ultraedit``/``stableedit``)."""
    key = (model, method)
    if key not in _PRESETS:
        raise ValueError(f"no preset for {key}; known: {sorted(_PRESETS)}")
    lr, alpha, warmup_turns = published(model, method)
    return Preset(model=model, method=method, targets=_PRESETS[key], lr=lr, alpha=alpha, warmup_turns=warmup_turns)


def targets(model: str, method: str) -> list[str]:
    """The edited modules (HF paths) of the published ``method`` run on ``model``."""
    return list(get(model, method).targets)
