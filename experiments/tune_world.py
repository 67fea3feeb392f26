"""Hyperparameter sweep for the embedded world (edits drawn with a seed other than the default run's).

    python experiments/tune_world.py --editors stableedit,ultraedit,no_normalization --lrs 1e-4,3e-4,1e-3

Prints one line per (editor, lr, alpha) with the teacher-forced metrics and locality vs the unedited model, and
writes them to --out as JSON. The defaults in lnjax.run.WORLD_HPARAMS were chosen from such a sweep (seed 1).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lnjax.run import RunConfig, run  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editors", default="stableedit,ultraedit,no_normalization")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--alphas", default="")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="runs/tune_world.json")
    ap.add_argument("--model", default=None, help="world-model directory (default: the shipped one)")
    args = ap.parse_args(argv)
    rows = []
    alphas = [float(a) for a in args.alphas.split(",") if a] or [None]
    for name in args.editors.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            for alpha in alphas:
                cfg = RunConfig(editors=(name,), turns=args.turns, lr=lr, alpha=alpha, seed=args.seed,
                                eval_every=0, generation=False, model=args.model)
                res = run(cfg, None, log=lambda m: None, progress=False)["editors"][name]
                row = {"editor": name, "lr": lr, "alpha": alpha, **res["teacher_forced"],
                       "locality_vs_unedited": res["locality_vs_unedited"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
