"""The embedded default model: a small Llama-architecture decoder pretrained on the default world.

``default_model()`` loads the Orbax checkpoint shipped in ``lnjax/assets/world_model``; ``train`` (used by
``experiments/pretrain_world.py``) recreates it from scratch with optax.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .batching import pack
from .models import Model, ModelConfig, abstract_params, init_params
from .probe import IGNORE, token_log_likelihood
from .world import World, default_world

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets", "world_model")
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


def train(world: World, cfg: ModelConfig, *, epochs: int = 60, batch_size: int = 512, lr: float = 3e-3,
          seed: int = 0, log: Optional[Callable[[str], None]] = print, init: Optional[dict] = None,
          warmup_steps: int = 500, label_smoothing: float = 0.0) -> tuple[dict, dict]:
    """Pretrain ``cfg`` on every fact of ``world`` (each epoch: every fact once, in a random wording).

    Loss: token cross-entropy on the answer positions only (with ``label_smoothing`` ε: the target gets 1-ε, the
    rest spread over the vocabulary, which bounds how over-confident the model becomes). AdamW with warm-up and
    cosine decay; ``init`` continues from given parameters. Returns ``(params, report)`` where ``report`` has the final teacher-forced
    accuracy per wording.
    """
    per_template = fact_examples(world)
    length = max(len(p) + len(a) - 1 for ex in per_template for p, a in ex)
    packed = [pack(ex, length) for ex in per_template]
    n_facts = len(per_template[0])
    steps_per_epoch = -(-n_facts // batch_size)
    total = epochs * steps_per_epoch
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, total // 10), total, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.98, weight_decay=0.01))
    params = init if init is not None else init_params(cfg, jax.random.PRNGKey(seed), std=0.02)
    opt_state = opt.init(params)
    apply = Model(cfg, params).apply

    def loss_fn(p, ids, mask, labels):
        logits = apply(p, ids, mask)
        ce, sup = token_log_likelihood(logits, labels)
        if label_smoothing:
            uniform = -jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1)
            ce = jnp.where(sup, (1 - label_smoothing) * ce + label_smoothing * uniform, 0.0)
        return jnp.sum(ce) / jnp.maximum(jnp.sum(sup), 1)

    @jax.jit
    def step(p, s, ids, mask, labels):
        loss, g = jax.value_and_grad(loss_fn)(p, ids, mask, labels)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    rng = np.random.default_rng(seed)
    arrays = [np.stack([np.asarray(getattr(pk, f)) for pk in packed]) for f in ("input_ids", "attention_mask", "labels")]
    t0 = time.time()
    for epoch in range(epochs):
        order = rng.permutation(n_facts)
        wording = rng.integers(0, len(packed), n_facts)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            if len(idx) < batch_size:  # fixed shapes: top up the last batch from the start of the order
                idx = np.concatenate([idx, order[:batch_size - len(idx)]])
            w = wording[idx]
            ids, mask, labels = (a[w, idx] for a in arrays)
            params, opt_state, loss = step(params, opt_state, ids, mask, labels)
            losses.append(loss)
        if log:
            log(f"epoch {epoch + 1}/{epochs}  loss {float(np.mean(jax.device_get(losses))):.4f}  "
                f"{time.time() - t0:.0f}s")
    report = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "label_smoothing": label_smoothing,
              "train_seconds": time.time() - t0,
              "n_facts": n_facts, "accuracy_by_wording": [fact_accuracy(cfg, params, pk) for pk in packed]}
    return params, report


def fact_accuracy(cfg: ModelConfig, params, packed, batch_size: int = 2048) -> float:
    """Mean teacher-forced token accuracy (per fact, then averaged) over packed facts [F, L]."""
    apply = jax.jit(Model(cfg, params).apply)
    accs = []
    n = packed.input_ids.shape[0]
    for b in range(0, n, batch_size):
        sl = slice(b, b + batch_size)
        logits = apply(params, jnp.asarray(packed.input_ids[sl]), jnp.asarray(packed.attention_mask[sl]))
        labels = np.asarray(packed.labels[sl])
        sup = labels != IGNORE
        hit = (np.asarray(jnp.argmax(logits, -1)) == labels) & sup
        accs.append(hit.sum(1) / np.maximum(sup.sum(1), 1))
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
    abstract = abstract_params(cfg)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = ocp.load(os.path.join(os.path.abspath(directory), "params"), abstract)
    return Model(cfg, params)


def report(directory: str = ASSET_DIR) -> dict:
    """The training report saved next to a world model."""
    with open(os.path.join(directory, "report.json")) as f:
        return json.load(f)


def default_model() -> Model:
    """The shipped model pretrained on ``default_world()``."""
    return load(ASSET_DIR)


__all__ = ["ASSET_DIR", "DEFAULT_TARGETS", "default_config", "default_model", "default_world", "fact_accuracy",
           "fact_examples", "load", "report", "save", "train"]
