"""FT, MEMIT and AlphaEdit after sequential edits on the embedded world (efficacy, generalization, locality).

    python experiments/locate_baselines.py --turns 20 --edits-per-turn 100 --out experiments/results/locate_baselines

The same edits as ``lnjax run`` on the world (``World.records("edit", n, seed)``, prepared by
``lnjax.eval.prepare.prepare_edits``), run by ``edit_sequence`` one turn per chunk so that each turn is timed, and
evaluated with ``lnjax.eval`` against the unedited model. Writes ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from lnjax.app import baselines, hparams
from lnjax import eval as eval_lib
from lnjax.world import world_model
from lnjax.engine.sequence import edit_sequence
from lnjax.eval.prepare import prepare_edits
from lnjax.world import default_world


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--editors", default="ft,memit,alphaedit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--options", default="{}", help='JSON {editor: {option: value}} over the world settings')
    ap.add_argument("--out", default="experiments/results/locate_baselines")
    args = ap.parse_args(argv)
    extra = json.loads(args.options)

    model, world = world_model.default_model(), default_world()
    job = prepare_edits(world.records("edit", args.turns * args.edits_per_turn, seed=args.seed), world.tokenizer(),
                        model, edits_per_turn=args.edits_per_turn, n_turns=args.turns)
    eval_set, base_loc = job.eval_set, job.base_loc
    protocols = ("teacher_forced", "locality_vs_unedited")
    results = {"unedited": eval_lib.evaluate(model.apply, model.params, eval_set, base_loc, protocols),
               "editors": {}, "config": vars(args)}
    print("unedited", results["unedited"], flush=True)
    for name in args.editors.split(","):
        editor, targets, meta = baselines.for_run(name, model, world_model.DEFAULT_TARGETS, dataset="world",
                                                  explicit_targets=False, options=extra.get(name))
        options = {**hparams.MODEL_BASELINE_WORLD_HPARAMS[name], **extra.get(name, {})}
        stamps = [time.time()]  # one chunk per turn, so that each turn is timed
        res = edit_sequence(model, editor, job.edit_turns(), targets, chunk=1, progress=False,
                            callback=lambda done, carry, diag: stamps.append(time.time()))
        params, state, times = res.params, res.editor_state, np.diff(stamps).tolist()
        metrics = eval_lib.evaluate(model.apply, params, eval_set, base_loc, protocols)
        metrics.update(meta)
        metrics.update({"targets": list(targets), "options": options, "rejected_turns": int(state.rejected),
                        "seconds_first_turn_with_compile": times[0],
                        "seconds_per_turn_after_first": float(np.mean(times[1:])) if len(times) > 1 else None})
        if name == "alphaedit":
            metrics["null_dims"] = {t: int(v) for t, v in state.null_dims.items()}
        results["editors"][name] = metrics
        print(name, json.dumps(metrics), flush=True)
    results["host"] = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
