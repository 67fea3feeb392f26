"""Pretrain the embedded default model on the default world and write it to lnjax/assets/world_model.

    python experiments/pretrain_world.py --out /tmp/wm_stage1 --epochs 50 --lr 5e-3
    python experiments/pretrain_world.py --init-from /tmp/wm_stage1 --epochs 4 --lr 1e-3 --label-smoothing 0.3 \
        --warmup-steps 50                                # the shipped model (about 35 min on 2 CPU cores)
    python experiments/pretrain_world.py --epochs 2 --out /tmp/wm   # a quick, untrained-ish run

Staged pretraining (for architectures whose pretraining does not fit one sitting): ``--checkpoint-dir DIR`` saves
the parameters, the optimizer state, the data-order generator and the loss curve after every epoch (Orbax, via
``lnjax.io.checkpoint``), and ``--resume`` continues from the newest one there, to the same result as one
uninterrupted run; a checkpoint made with other settings is refused with the differences. The architecture is
``--d-model/--layers/--d-ff/--activation`` (default: the shipped model's), e.g. the wide-MLP testbed measured in
experiments/REPORT.md §8:

    python experiments/pretrain_world.py --layers 2 --d-ff 4096 --activation relu --batch-size 64 --lr 3e-3 \
        --label-smoothing 0.1 --epochs 20 --warmup-steps 200 --checkpoint-dir runs/wide_wm --out runs/wide_wm/model
    python experiments/pretrain_world.py ... --checkpoint-dir runs/wide_wm --resume     # continue after a stop
"""

import argparse
import dataclasses
import json
import os
import time
from typing import Callable, Optional


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lnjax.io import checkpoint as ckpt_lib  # noqa: E402
from lnjax.world import world_model as wm  # noqa: E402
from lnjax.core.turns import pack, probe_length  # noqa: E402
from lnjax.models import Model, ModelConfig, init_params  # noqa: E402
from lnjax.models.probe import token_log_likelihood  # noqa: E402
from lnjax.world import World, WorldSpec  # noqa: E402


def train(world: World, cfg: ModelConfig, *, epochs: int = 60, batch_size: int = 512, lr: float = 3e-3,
          seed: int = 0, log: Optional[Callable[[str], None]] = print, init: Optional[dict] = None,
          warmup_steps: int = 500, label_smoothing: float = 0.0, checkpoint_dir: Optional[str] = None,
          resume: bool = False) -> tuple[dict, dict]:
    """Pretrain ``cfg`` on every fact of ``world`` (each epoch: every fact once, in a random wording).

    Loss: token cross-entropy on the answer positions only (with ``label_smoothing`` ε: the target gets 1-ε, the
    rest spread over the vocabulary, which bounds how over-confident the model becomes). AdamW with warm-up and
    cosine decay; ``init`` continues from given parameters. With ``checkpoint_dir`` the training state is saved
    after every epoch and ``resume`` continues from the newest saved epoch (same result as an uninterrupted run).
    Returns ``(params, report)`` where ``report`` has the final teacher-forced accuracy per wording and the loss
    of every epoch.
    """
    packed = packed_facts(world)
    n_facts = packed[0].input_ids.shape[0]
    steps_per_epoch = -(-n_facts // batch_size)
    opt = optimizer(lr, epochs * steps_per_epoch, warmup_steps)
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
    arrays = [np.stack([np.asarray(getattr(pk, f)) for pk in packed])
              for f in ("input_ids", "attention_mask", "labels")]
    settings = {"config": {k: v for k, v in cfg.__dict__.items()}, "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "seed": seed, "warmup_steps": warmup_steps, "label_smoothing": label_smoothing,
                "world_spec": dict(world.spec.__dict__), "init": init is not None}
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the metadata
    first, curve = 0, []
    if checkpoint_dir and resume:
        got = _latest_epoch(checkpoint_dir, {"params": params, "opt_state": opt_state}, settings)
        if got is not None:
            first, tree, rng_state, curve = got
            params, opt_state = tree["params"], tree["opt_state"]
            rng.bit_generator.state = rng_state
            if log:
                log(f"resuming after epoch {first} of {epochs} from {checkpoint_dir}")
    t0 = time.time()
    for epoch in range(first, epochs):
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
        curve.append(float(np.mean(jax.device_get(losses))))
        if log:
            log(f"epoch {epoch + 1}/{epochs}  loss {curve[-1]:.4f}  {time.time() - t0:.0f}s")
        if checkpoint_dir:
            meta = {"epoch": epoch + 1, "settings": settings, "rng": rng.bit_generator.state, "curve": curve}
            ckpt_lib.save(os.path.join(checkpoint_dir, f"epoch_{epoch + 1:04d}"),
                          {"params": params, "opt_state": opt_state}, meta)
    report = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "label_smoothing": label_smoothing,
              "train_seconds": time.time() - t0, "loss_by_epoch": curve,
              "n_facts": n_facts, "accuracy_by_wording": [wm.fact_accuracy(cfg, params, pk) for pk in packed]}
    return params, report


def _latest_epoch(directory: str, like: dict, settings: dict):
    """``(epoch, {"params", "opt_state"}, generator state, loss curve)`` of the newest loadable epoch checkpoint in
    ``directory``, or None; a checkpoint made with other settings raises ``CheckpointError`` naming the
    differences, a damaged one falls back to the one before."""
    if not os.path.isdir(directory):
        return None
    for name in sorted((n for n in os.listdir(directory) if n.startswith("epoch_")), reverse=True):
        path = os.path.join(directory, name)
        try:
            meta = ckpt_lib.metadata(path)
            if meta.get("settings") != settings:
                diff = {k: (meta.get("settings", {}).get(k), v) for k, v in settings.items()
                        if meta.get("settings", {}).get(k) != v}
                raise ckpt_lib.ConfigMismatch(f"{path}: saved with other settings (saved, now): {diff}")
            return int(meta["epoch"]), ckpt_lib.load(path, like), meta["rng"], list(meta["curve"])
        except ckpt_lib.ConfigMismatch:
            raise
        except (ckpt_lib.CheckpointError, KeyError) as e:
            print(f"{path}: not usable ({e}); trying an older epoch", flush=True)
    return None




def packed_facts(world: World) -> list:
    """Every fact of ``world`` packed once per wording: ``[TurnBatch [n_facts, L]]`` (one per wording)."""
    per_template = wm.fact_examples(world)
    length = max(probe_length(p, a) for ex in per_template for p, a in ex)
    return [pack(ex, length) for ex in per_template]


def optimizer(lr: float, total_steps: int, warmup_steps: int):
    """AdamW (b2 0.98, weight decay 0.01) after global-norm clipping at 1, with linear warm-up over
    ``min(warmup_steps, total_steps // 10)`` steps and cosine decay to ``lr/20`` at ``total_steps``."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup_steps, total_steps // 10), total_steps,
                                               lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.98, weight_decay=0.01))


def export_latest(world: World, cfg: ModelConfig, args) -> None:
    """Save the newest epoch checkpoint of ``args.checkpoint_dir`` (made with the same flags) as a world model in
    ``args.out``, with its epoch and loss curve in the report: a partly trained model to measure mid-run."""
    params = init_params(cfg, jax.random.PRNGKey(args.seed), std=0.02)
    opt_state = optimizer(args.lr, 1, args.warmup_steps).init(params)  # only its structure matters here
    meta = None
    for name in sorted(os.listdir(args.checkpoint_dir), reverse=True):
        if name.startswith("epoch_"):
            path = os.path.join(args.checkpoint_dir, name)
            meta, tree = ckpt_lib.metadata(path), ckpt_lib.load(path, {"params": params, "opt_state": opt_state})
            break
    if meta is None:
        raise SystemExit(f"{args.checkpoint_dir}: no epoch checkpoint to export")
    report = {"epochs": meta["epoch"], "loss_by_epoch": meta["curve"], "partial_of": meta["settings"]["epochs"],
              "accuracy_by_wording": [wm.fact_accuracy(cfg, tree["params"], pk) for pk in packed_facts(world)]}
    wm.save(args.out, cfg, tree["params"], report)
    print(json.dumps(report, indent=2))


def architecture(args, world: World) -> ModelConfig:
    """The model to train: the shipped model's architecture for ``world`` with the command line's changes
    (``--d-model/--layers/--d-ff/--activation`` and a key-value memory from ``--memory-*``)."""
    changes = {k: v for k, v in (("d_model", args.d_model), ("n_layers", args.layers), ("d_ff", args.d_ff),
                                 ("activation", args.activation), ("memory_slots", args.memory_slots),
                                 ("memory_threshold", args.memory_threshold)) if v is not None}
    if args.memory_layers:
        changes["memory_layers"] = tuple(int(i) for i in args.memory_layers.split(","))
    return dataclasses.replace(wm.default_config(world), **changes)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=45)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--out", default=wm.ASSET_DIR)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--warmup-steps", type=int, default=500)
    ap.add_argument("--init-from", default=None, help="continue training the world model saved in this directory")
    ap.add_argument("--d-model", type=int, default=None, help="architecture (default: the shipped model's)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d-ff", type=int, default=None)
    ap.add_argument("--activation", default=None, help="MLP gate activation, e.g. silu or relu")
    ap.add_argument("--memory-layers", default=None,
                    help="comma-separated blocks that get a key-value memory, trained with the model (e.g. 2)")
    ap.add_argument("--memory-slots", type=int, default=None)
    ap.add_argument("--memory-threshold", type=float, default=None)
    ap.add_argument("--checkpoint-dir", default=None, help="save the training state after every epoch here")
    ap.add_argument("--resume", action="store_true", help="continue from the newest epoch in --checkpoint-dir")
    ap.add_argument("--export-latest", action="store_true",
                    help="write the newest epoch of --checkpoint-dir to --out as a world model, without training")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    world = World(WorldSpec(seed=args.world_seed))
    cfg = architecture(args, world)
    if args.export_latest:
        return export_latest(world, cfg, args)
    init = wm.load(args.init_from).params if args.init_from else None
    params, report = train(world, cfg, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, log=lambda m: print(m, flush=True), init=init,
                              label_smoothing=args.label_smoothing, warmup_steps=args.warmup_steps,
                              checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    if args.init_from:
        earlier = wm.report(args.init_from)
        report["continued_from"] = {k: earlier.get(k) for k in ("epochs", "lr", "batch_size", "label_smoothing",
                                                                "train_seconds", "accuracy_by_wording")}
    report["world_spec"] = world.spec.__dict__
    wm.save(args.out, cfg, params, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
