"""Pretrain the embedded default model on the default world and write it to lnjax/assets/world_model.

    python experiments/pretrain_world.py --out /tmp/wm_stage1 --epochs 50 --lr 5e-3
    python experiments/pretrain_world.py --init-from /tmp/wm_stage1 --epochs 4 --lr 1e-3 --label-smoothing 0.3 \
        --warmup-steps 50                                # the shipped model (about 35 min on 2 CPU cores)
    python experiments/pretrain_world.py --epochs 2 --out /tmp/wm   # a quick, untrained-ish run
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lnjax import world_model as wm  # noqa: E402
from lnjax.world import World, WorldSpec  # noqa: E402


def main(argv=None):
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
    args = ap.parse_args(argv)
    world = World(WorldSpec(seed=args.world_seed))
    cfg = wm.default_config(world)
    init = wm.load(args.init_from).params if args.init_from else None
    params, report = wm.train(world, cfg, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, log=lambda m: print(m, flush=True), init=init,
                              label_smoothing=args.label_smoothing, warmup_steps=args.warmup_steps)
    if args.init_from:
        earlier = wm.report(args.init_from)
        report["continued_from"] = {k: earlier.get(k) for k in ("epochs", "lr", "batch_size", "label_smoothing",
                                                                "train_seconds", "accuracy_by_wording")}
    report["world_spec"] = world.spec.__dict__
    wm.save(args.out, cfg, params, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
