"""RLEdit and MALMEN with and without lifelong normalization on the embedded world (Fig. 1a for the hypernetwork
editors): each editor is meta-trained on the world's training split (cached under ``hypernets/`` in the lnjax cache), then edits
``--turns`` turns of 100 sequential edits; prints and writes the ES/GS/LS table.

    python experiments/hypernets_world.py                       # world-scaled initial lr 1e-2, meta_lr 1e-5
    python experiments/hypernets_world.py --lr 1e-6 --meta-lr 1e-5   # the published initial values

The published initial edit learning rate (1e-6) is tied to 7B-model feature scales; on the world model the
closed-form editors need about 1e-2 (``lnjax.app.hparams.WORLD_HPARAMS``), hence the world-scaled default. LN on and off
use the same settings, as in the ablation.
"""

import argparse
import json
import os
import sys


from lnjax.app.report import format_table  # noqa: E402
from lnjax.app.run import RunConfig, run  # noqa: E402
from lnjax.world.world_model import ASSET_DIR  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editors", default="rledit,rledit_no_normalization,malmen,malmen_no_normalization")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--meta-lr", type=float, default=1e-5)
    ap.add_argument("--model", default=ASSET_DIR,
                    help="world-model directory (default: the shipped model's dense down_proj, as in REPORT.md §10), "
                         "or 'testbed' for lnjax run's default testbed (its fact memory)")
    ap.add_argument("--out", default="runs/hypernets_world")
    a = ap.parse_args(argv)
    cfg = RunConfig(editors=tuple(a.editors.split(",")), turns=a.turns, edits_per_turn=100, generation=False,
                    eval_every=0, model=None if a.model == "testbed" else a.model,
                    editor_options={"lr": a.lr, "meta_lr": a.meta_lr, "n_train": a.n_train})
    results = run(cfg, out_dir=a.out)
    print(format_table(results))
    with open(os.path.join(a.out, "command.json"), "w") as f:
        json.dump({"argv": sys.argv}, f)


if __name__ == "__main__":
    main()
