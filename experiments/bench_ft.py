"""FT-M on SmolLM2: one turn of 100 real-fact edits (layers 25-28 down_proj) with every step running the whole
model vs only the blocks from the lowest edited one (``FTConfig.reuse_prefix``, the default) -- a benchmark, not a
test. Prints and writes seconds per turn (compile excluded: each path runs the turn twice and the second is timed)
and the largest difference of the two shifts relative to their size.

    python experiments/bench_ft.py --out experiments/results/smollm2/bench_ft.json
"""

import argparse
import json
import time

import jax
import numpy as np

import lnjax as lx
from lnjax.app.report import write_json
from lnjax.data import facts
from lnjax.eval.prepare import prepare_edits
from lnjax.io import builtin_models


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--num-steps", type=int, default=25, help="FT epochs per turn (published 25)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    model, tok = lx.hf.load("smollm2"), lx.hf.load_tokenizer("smollm2")
    targets = builtin_models.BUILTIN["smollm2"].default_targets
    job = prepare_edits(facts.edit_records("train", a.edits), tok, model, edits_per_turn=a.edits, n_turns=1)
    turn = jax.tree_util.tree_map(lambda x: x[0], job.edit_turns())
    shapes = {t: tuple(lx.models.get_module(model.params, t)["kernel"].shape) for t in targets}
    out = {"model": "smollm2", "targets": list(targets), "edits": a.edits, "num_steps": a.num_steps,
           "device": str(jax.devices()[0]), "paths": {}}
    shifts = {}
    for name, reuse in (("blocks_from_lowest_edited", True), ("whole_model", False)):
        ed = lx.editors.get("ft", apply=model.apply, num_steps=a.num_steps, reuse_prefix=reuse)
        fn = jax.jit(lambda s, p, tn: ed.update(None, s, params=p, turn=tn))
        times = []
        for _ in range(2):
            t0 = time.time()
            deltas, state = fn(ed.init(shapes), model.params, turn)
            jax.block_until_ready(deltas)
            times.append(time.time() - t0)
        shifts[name] = deltas
        out["paths"][name] = {"first_call_seconds": times[0], "turn_seconds": times[1],
                              "epochs": int(state.epochs), "loss_first_last": [float(x) for x in state.loss]}
        print(name, out["paths"][name], flush=True)
    a_, b_ = shifts["blocks_from_lowest_edited"], shifts["whole_model"]
    out["max_shift_difference_relative"] = max(float(np.abs(a_[t] - b_[t]).max() / max(np.abs(b_[t]).max(), 1e-30))
                                               for t in targets)
    out["speedup"] = out["paths"]["whole_model"]["turn_seconds"] / out["paths"]["blocks_from_lowest_edited"]["turn_seconds"]
    print(json.dumps({k: out[k] for k in ("speedup", "max_shift_difference_relative")}))
    if a.out:
        write_json(a.out, out)


if __name__ == "__main__":
    main()
