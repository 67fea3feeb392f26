"""The published runs (docs/method.md §8) as ready-to-run ``lnjax run`` commands: 4 models × 4 datasets ×
{stableedit, ultraedit}, with the published numbers next to them where the papers give them.

    python experiments/published.py --list                                   # every configuration
    python experiments/published.py llama3-8b zsre stableedit --weights /ckpt/Meta-Llama-3-8B-Instruct \
        --data-dir /data/ultraedit                                           # print the command
    python experiments/published.py llama3-8b zsre ultraedit --weights ... --data-dir ... --run

Models run in bfloat16; evaluation once at the end (the reference protocol). ``--data-dir`` holds the published
files under their published names (table below); nothing is downloaded.
"""

import argparse
import os
import shlex
import sys


from lnjax.app import presets  # noqa: E402

# dataset -> (edit file, training-split file, edits in the published run)
DATASETS = {
    "zsre": ("zsre_eval_20k.json", "zsre_train.json", 20_000),
    "fever": ("fever_eval_20k.json", "fever_train.json", 20_000),
    "wikibigedit": ("wikibigedit_eval_17k.json", "wikibigedit_train_17k.json", 17_000),
    "ultraeditbench": ("UltraEditBench_2M.json", "UltraEditBench_train_20k.json", 20_000),
}

# Published teacher-forced ES / GS / LS (docs/method.md §8); only the cells the papers state are filled.
PUBLISHED = {
    ("llama3-8b", "zsre", "ultraedit"): {"edits": 20_000, "efficacy": 90.07, "generalization": 87.36,
                                         "specificity": 49.51},
}


def command(model: str, dataset: str, method: str, weights: str, data_dir: str, out: str,
            edits: int = 0) -> list[str]:
    """The ``lnjax run`` argument list of one published configuration (``edits`` 0: the published count)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    p = presets.get(model, method)
    edit_file, train_file, n = DATASETS[dataset]
    n = edits or n
    turns = n // p.edits_per_turn
    args = ["lnjax", "run", "--editor", method, "--model", weights, "--dtype", "bfloat16", "--dataset", dataset,
            "--data", os.path.join(data_dir, edit_file), "--turns", str(turns),
            "--edits-per-turn", str(p.edits_per_turn), "--lr", f"{p.lr:g}", "--alpha", f"{p.alpha:g}",
            "--targets", ",".join(p.targets), "--warmup-turns", str(p.warmup_turns), "--eval-every", "0",
            "--out", out]
    if p.warmup_turns:
        args += ["--train-data", os.path.join(data_dir, train_file)]
    return args


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", choices=sorted(presets.MODELS))
    ap.add_argument("dataset", nargs="?", choices=sorted(DATASETS))
    ap.add_argument("method", nargs="?", choices=("stableedit", "ultraedit"))
    ap.add_argument("--weights", default="WEIGHTS_DIR", help="HF checkpoint directory of the model")
    ap.add_argument("--data-dir", default="DATA_DIR", help="directory with the published data files")
    ap.add_argument("--edits", type=int, default=0, help="override the published number of edits")
    ap.add_argument("--out", default=None)
    ap.add_argument("--list", action="store_true", help="print every configuration's command")
    ap.add_argument("--run", action="store_true", help="run the command instead of printing it")
    args = ap.parse_args(argv)
    if args.list:
        for model in sorted(presets.MODELS):
            for dataset in DATASETS:
                for method in ("stableedit", "ultraedit"):
                    out = f"runs/published/{model}-{dataset}-{method}"
                    pub = PUBLISHED.get((model, dataset, method))
                    note = f"   # published ES/GS/LS {pub['efficacy']}/{pub['generalization']}/" \
                           f"{pub['specificity']}" if pub else ""
                    print(shlex.join(command(model, dataset, method, args.weights, args.data_dir, out,
                                             args.edits)) + note)
        return 0
    if not (args.model and args.dataset and args.method):
        ap.error("give MODEL DATASET METHOD, or --list")
    out = args.out or f"runs/published/{args.model}-{args.dataset}-{args.method}"
    cmd = command(args.model, args.dataset, args.method, args.weights, args.data_dir, out, args.edits)
    if not args.run:
        print(shlex.join(cmd))
        return 0
    from lnjax.app.cli import main as cli_main
    return cli_main(cmd[1:])


if __name__ == "__main__":
    sys.exit(main())
