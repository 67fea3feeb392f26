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

``--slot-keys facts`` keys the memory by the facts the model was pretrained on instead: one slot per fact of the
world (all pools: the pretraining corpus, never an edit's new target), its key the mean direction of that fact's
whitened first-answer-row input over the three wordings, read by cosine (``ModelConfig.memory_code="cosine"``,
``--threshold`` is then the cosine above which a slot fires). Every fact then reads its own slot and almost no
other, which puts the edited module in the regime the LN editors assume (REPORT.md §8, "A memory keyed by facts").
"""

import argparse


from lnjax.world import world_model  # noqa: E402
from lnjax.core.cpu_threads import limit_lapack_threads_on_cpu  # noqa: E402
from lnjax.world.memory_testbed import grow  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="world-model directory to grow (default: the shipped one)")
    ap.add_argument("--layers", default="2", help="comma-separated blocks that get a memory")
    ap.add_argument("--slots", type=int, default=8192)
    ap.add_argument("--threshold", type=float, default=3.0, help="slots fire this many std above the token mean")
    ap.add_argument("--ridge", type=float, default=1e-3,
                    help="whitening ridge as a fraction of the top eigenvalue; negative: centre only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slot-keys", choices=("random", "facts"), default="random",
                    help="random slot directions read by z-score, or one slot per world fact read by cosine "
                         "(--slots is then the number of facts, --threshold a cosine)")
    ap.add_argument("--anchor", default="", help='with --slot-keys facts: read the memory at this token (e.g. "?") '
                    "for --offsets positions from it on, one copy of the slots per position")
    ap.add_argument("--offsets", type=int, default=3, help="answer positions an anchored memory covers")
    ap.add_argument("--winner", action="store_true", help="with --slot-keys facts: read only the best-matching fact")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    limit_lapack_threads_on_cpu(1)
    base = world_model.load(args.base) if args.base else world_model.default_model()
    layers = tuple(int(x) for x in args.layers.split(","))
    grown = grow(base, layers, args.slots, args.threshold, args.ridge, args.seed, args.slot_keys,
                 args.anchor, args.offsets, args.winner)
    report = {"grown_from": args.base or "the shipped world model", "memory_layers": list(layers),
              "slots": grown.config.memory_slots, "slot_keys": args.slot_keys,
              "anchor": args.anchor, "offsets": grown.config.memory_offsets,
              "winner": args.winner, "threshold": args.threshold, "whitening_ridge": args.ridge, "seed": args.seed,
              "fitted_on": "train-pool prompts (src and rephrase), supervised positions"}
    world_model.save(args.out, grown.config, grown.params, report)
    print(f"wrote {args.out}: memory at blocks {list(layers)}, {grown.config.memory_slots} slots, "
          f"threshold {args.threshold}")


if __name__ == "__main__":
    main()
