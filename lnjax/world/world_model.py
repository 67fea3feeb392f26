"""The embedded default model: a small Llama-architecture decoder pretrained on the default world.

``default_model()`` loads the Orbax checkpoint shipped in ``lnjax/assets/world_model``;
``experiments/pretrain_world.py`` recreates it from scratch (the training loop lives there, not in the package).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lnjax.core.metrics import token_accuracy
from lnjax.core.turns import TurnBatch, pack
from lnjax.core.placement import local_sharding
from lnjax.models import Model, ModelConfig, abstract_params
from lnjax.world import World

# the shipped models live in lnjax/assets/ (package data), one level above this subpackage
ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "world_model")
DEFAULT_TARGETS = tuple(f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3))


def default_config(world: World) -> ModelConfig:
    """The default model's architecture for ``world``: 4 layers, d_model 128, GQA 4/2 heads, d_ff 1024."""
    return ModelConfig(arch="llama", vocab_size=len(world.vocab), d_model=128, n_layers=4, n_heads=4,
                       n_kv_heads=2, d_ff=1024, norm_eps=1e-5, rope_theta=10000.0, max_positions=64,
                       bos_token_id=1, eos_token_id=2)


def fact_examples(world: World, tok=None) -> list[list[tuple[list[int], list[int]]]]:
    """Tokenized (prompt_ids, answer_ids) of every fact in every wording: ``[template][fact]``."""
    tok = tok or world.tokenizer()
    facts = world.all_facts()
    out = []
    for t in range(len(world.relations[0].templates)):
        out.append([(tok.encode(world.prompt(s, r, t)), tok.encode(" " + world.answer(s, r), False))
                    for s, r in facts])
    return out


def fact_accuracy(cfg: ModelConfig, params, packed, batch_size: int = 2048) -> float:
    """Mean teacher-forced token accuracy (per fact, then averaged) over packed facts [F, L]."""
    apply = jax.jit(Model(cfg, params).apply)
    accs = []
    n = packed.input_ids.shape[0]
    for b in range(0, n, batch_size):
        sl = slice(b, b + batch_size)
        logits = apply(params, jnp.asarray(packed.input_ids[sl]), jnp.asarray(packed.attention_mask[sl]))
        accs.append(token_accuracy(np.asarray(jnp.argmax(logits, -1)), np.asarray(packed.labels[sl])))
    return float(np.concatenate(accs).mean())


def save(directory: str, cfg: ModelConfig, params, report: dict) -> None:
    """Write the model as an Orbax checkpoint (``params``) plus ``config.json`` and ``report.json``."""
    from orbax.checkpoint import v1 as ocp

    os.makedirs(directory, exist_ok=True)
    ocp.save(os.path.join(os.path.abspath(directory), "params"), params, overwrite=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({k: v for k, v in cfg.__dict__.items()}, f, indent=2)
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


def load(directory: str = ASSET_DIR) -> Model:
    """Load a model written by ``save`` (default: the shipped one)."""
    from orbax.checkpoint import v1 as ocp

    cfg_file = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file}: no world model here (train one with experiments/pretrain_world.py)")
    with open(cfg_file) as f:
        raw = json.load(f)
    if raw.get("rope_scaling") is not None:
        raw["rope_scaling"] = tuple(tuple(x) for x in raw["rope_scaling"])
    cfg = ModelConfig(**raw)
    # Restored onto this process's own device: the checkpoint records the device it was saved from (cpu:0), which
    # in a multi-process run belongs to process 0 only.
    local = local_sharding()
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
                                      abstract_params(cfg))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = ocp.load(os.path.join(os.path.abspath(directory), "params"), abstract)
    return Model(cfg, params)


def is_model_dir(path: str) -> bool:
    """Whether ``path`` holds a model written by ``save`` (an Orbax ``params`` directory and ``report.json``)."""
    return os.path.isdir(os.path.join(path, "params")) and os.path.exists(os.path.join(path, "report.json"))


def report(directory: str = ASSET_DIR) -> dict:
    """The training report saved next to a world model."""
    with open(os.path.join(directory, "report.json")) as f:
        return json.load(f)


def default_model() -> Model:
    """The shipped model pretrained on ``default_world()``."""
    return load(ASSET_DIR)


__all__ = ["ASSET_DIR", "DEFAULT_TARGETS", "default_config", "default_model", "fact_accuracy", "fact_examples",
           "is_model_dir", "load", "report", "save", "world_corpus"]


def world_corpus(world, tok=None) -> TurnBatch:
    """The world's pretraining text: every fact in every wording (prompt + answer), packed [n, L]."""
    examples = [ex for per_template in fact_examples(world, tok) for ex in per_template]
    return pack(examples)
