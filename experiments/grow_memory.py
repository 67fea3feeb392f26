"""Grow a world model with sparse key-value memories (``ModelConfig.memory_layers``): a testbed whose edited
module, ``model.layers.{i}.memory.value_proj``, sees a wide, sparse, high-rank key code.

    python experiments/grow_memory.py --layers 2 --slots 8192 --threshold 3 --out runs/memory_wm
    python experiments/key_geometry.py --model runs/memory_wm --layers 2 --module memory.value_proj
    python experiments/tune_world.py --model runs/memory_wm --targets model.layers.2.memory.value_proj \\
        --grid "ultraedit=1e-2,3e-2,1e-1"

Each memory starts empty (``value_proj`` = 0, so the grown model computes exactly what the base model does) with
random slot directions. Its input is centred and whitened on the prompts of the world's ``train`` pool (never the
edit or locality pools): slot scores then respond to every direction in which facts differ, not only to the few
that dominate the residual stream, which is what makes the codes of different facts overlap less
(experiments/REPORT.md §8 has the measured effect of each step). Writes a world-model directory (``--out``).
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from key_geometry import supervised_keys  # noqa: E402
from lnjax import data, world_model  # noqa: E402
from lnjax.models import Model  # noqa: E402
from lnjax.world import default_world  # noqa: E402


def whitening(x: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [d], W [d, d])`` with ``W = (C + ridge·λ_max I)^(-1/2)`` for the covariance C of rows x [n, d];
    ``ridge`` < 0 gives ``W = I`` (centring only)."""
    mean = x.mean(0)
    if ridge < 0:
        return mean, np.eye(x.shape[1])
    ev, u = np.linalg.eigh(np.cov(x.T))
    return mean, (u / np.sqrt(ev + ridge * ev.max())) @ u.T


def _empty_memories(cfg, params: dict, seed: int) -> dict:
    """``params`` with an empty memory (random slot directions, zero values) at each of ``cfg.memory_layers``."""
    params = jax.tree_util.tree_map(lambda a: a, params)
    d, slots = cfg.d_model, cfg.memory_slots
    for i, k in zip(cfg.memory_layers, jax.random.split(jax.random.PRNGKey(seed), len(cfg.memory_layers))):
        params["model"]["layers"][i]["memory"] = {
            "key_proj": {"kernel": jax.random.normal(k, (d, slots)) / d ** 0.5, "bias": jnp.zeros((slots,))},
            "value_proj": {"kernel": jnp.zeros((slots, d))}}
    return params


def grow(model: Model, layers: tuple, slots: int, threshold: float, ridge: float, seed: int = 0) -> Model:
    """``model`` with an empty memory of ``slots`` slots at each block of ``layers``, its input centred and
    whitened (``whitening``) on the world's train-pool prompts at their supervised positions."""
    cfg = dataclasses.replace(model.config, memory_layers=layers, memory_slots=slots, memory_threshold=threshold)
    # Empty memories add nothing to the residual stream, so their inputs are the same with 8 slots as with
    # ``slots``: fit on the small model, which keeps the fitting pass's memory independent of ``slots``.
    small = dataclasses.replace(cfg, memory_slots=8)
    world = default_world()
    n_train = len(world.all_facts("train"))
    recs = data.tokenize(data.records_from_dicts("zsre", world.records("train", n_train), "world"),
                         world.tokenizer())
    targets = [f"model.layers.{i}.memory.key_proj" for i in layers]
    keys, _ = supervised_keys(Model(small, _empty_memories(small, model.params, seed)), targets,
                              [r.edit for r in recs] + [r.paraphrase for r in recs])
    params = _empty_memories(cfg, model.params, seed)
    for i, t in zip(layers, targets):
        mean, w = whitening(keys[t], ridge)
        kernel = jnp.asarray(w, jnp.float32) @ params["model"]["layers"][i]["memory"]["key_proj"]["kernel"]
        params["model"]["layers"][i]["memory"]["key_proj"] = {
            "kernel": kernel, "bias": -jnp.asarray(mean, jnp.float32) @ kernel}
    return Model(cfg, params)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="world-model directory to grow (default: the shipped one)")
    ap.add_argument("--layers", default="2", help="comma-separated blocks that get a memory")
    ap.add_argument("--slots", type=int, default=8192)
    ap.add_argument("--threshold", type=float, default=3.0, help="slots fire this many std above the token mean")
    ap.add_argument("--ridge", type=float, default=1e-3,
                    help="whitening ridge as a fraction of the top eigenvalue; negative: centre only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    base = world_model.load(args.base) if args.base else world_model.default_model()
    layers = tuple(int(x) for x in args.layers.split(","))
    grown = grow(base, layers, args.slots, args.threshold, args.ridge, args.seed)
    report = {"grown_from": args.base or "the shipped world model", "memory_layers": list(layers),
              "slots": args.slots, "threshold": args.threshold, "whitening_ridge": args.ridge, "seed": args.seed,
              "fitted_on": "train-pool prompts (src and rephrase), supervised positions"}
    world_model.save(args.out, grown.config, grown.params, report)
    print(f"wrote {args.out}: memory at blocks {list(layers)}, {args.slots} slots, threshold {args.threshold}")


if __name__ == "__main__":
    main()
