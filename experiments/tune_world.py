"""Learning-rate sweep: the efficacy / locality frontier of each editor (on the embedded world by default).

    python experiments/tune_world.py --grid "stableedit=3e-3,1e-2,3e-2,1e-1;ultraedit=1e-3,3e-3,1e-2,3e-2;no_normalization=0.3,1,3,10"
    python experiments/tune_world.py --editors stableedit --lrs 1e-2,3e-2 --alphas 1,10
    python experiments/tune_world.py --model smollm2 --dataset facts --turns 1 --grid "ultraedit=1e-3,1e-2"

Edits are drawn with a seed other than the default run's (``--seed 1``). Prints one JSON line per
(editor, lr, alpha) with the teacher-forced metrics and locality vs the unedited model, writes them all to
``--out`` (JSON) and plots efficacy and generalization against locality per editor next to it (PNG). The
defaults in ``lnjax.app.hparams.WORLD_HPARAMS`` were chosen from such a sweep.
"""

import argparse
import json
import os


from lnjax.app.plots import pyplot  # noqa: E402
from lnjax.app.run import RunConfig, run  # noqa: E402


def parse_grid(grid: str, editors: str, lrs: str) -> list[tuple[str, list[float]]]:
    """``"a=1,2;b=3"`` -> [("a", [1., 2.]), ("b", [3.])]; without a grid every editor gets ``lrs``."""
    if grid:
        out = []
        for part in grid.split(";"):
            name, _, values = part.partition("=")
            out.append((name.strip(), [float(x) for x in values.split(",") if x]))
        return out
    return [(name, [float(x) for x in lrs.split(",") if x]) for name in editors.split(",")]


def plot_frontier(rows: list[dict], path: str) -> None:
    """Efficacy (solid) and generalization (dashed) against locality vs the unedited model, one colour per editor."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(dict.fromkeys(r["editor"] for r in rows)):
        pts = sorted((r for r in rows if r["editor"] == name), key=lambda r: r["locality_vs_unedited"])
        loc = [r["locality_vs_unedited"] for r in pts]
        ax.plot(loc, [r["efficacy"] for r in pts], "o-", color=f"C{i}", label=f"{name} ES")
        ax.plot(loc, [r["generalization"] for r in pts], "x--", color=f"C{i}", label=f"{name} GS")
        for r in pts:
            ax.annotate(f"{r['lr']:g}", (r["locality_vs_unedited"], r["efficacy"]), fontsize=7)
    ax.set_xlabel("locality vs unedited model")
    ax.set_ylabel("teacher-forced accuracy")
    ax.set_title("efficacy / locality frontier (labels: lr)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="", help='per-editor learning rates, e.g. "stableedit=1e-2,3e-2;ultraedit=1e-2"')
    ap.add_argument("--editors", default="stableedit,ultraedit,no_normalization")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--alphas", default="")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="runs/tune_world.json")
    ap.add_argument("--model", default=None, help="world-model directory (default: the shipped one), HF "
                                                 "checkpoint, .gguf or built-in name (smollm2)")
    ap.add_argument("--dataset", default="world", help="world or facts (generated data; no --data needed)")
    ap.add_argument("--targets", default="", help="comma-separated module paths (default: the model's)")
    ap.add_argument("--warmup-turns", type=int, default=None)
    ap.add_argument("--options", default="{}",
                    help='extra editor options as JSON, e.g. \'{"key_metric": "second_moment"}\'')
    args = ap.parse_args(argv)
    options = json.loads(args.options)
    rows = []
    alphas = [float(a) for a in args.alphas.split(",") if a] or [None]
    for name, lrs in parse_grid(args.grid, args.editors, args.lrs):
        for lr in lrs:
            for alpha in alphas:
                cfg = RunConfig(editors=(name,), turns=args.turns, edits_per_turn=args.edits_per_turn, lr=lr,
                                alpha=alpha, seed=args.seed, eval_every=0, generation=False, model=args.model,
                                dataset=args.dataset, targets=tuple(t for t in args.targets.split(",") if t) or None,
                                warmup_turns=args.warmup_turns,
                                editor_options=options or None)
                res = run(cfg, None, log=lambda m: None, progress=False)["editors"][name]
                row = {"editor": name, "lr": lr, "alpha": alpha, "options": options, **res["teacher_forced"],
                       "locality_vs_unedited": res["locality_vs_unedited"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    plot_frontier(rows, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
