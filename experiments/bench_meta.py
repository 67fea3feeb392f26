"""RLEdit meta-training on SmolLM2 (layers 25-28 down_proj, real-fact training edits): every back-tracked loss term
running the whole model vs only the blocks from the lowest edited one, from the history's kept residual streams
(``lnjax.engine.meta.train(reuse_prefix=True)``, the default) -- a benchmark, not a test. Per path: one call of
one training turn (compile included), then one call of ``--turns`` turns on the compiled step (timed per turn),
peak resident memory so far; then how the two agree: the largest relative difference of the per-turn losses and
hypernet-gradient norms, and ‖θ_a − θ_b‖ / ‖θ_b − θ_0‖ over every leaf (RLEdit takes one Adam step, whose first
step is nearly sign(g): float32 noise on tiny gradient entries moves single entries, hence the norm ratio).

    python experiments/bench_meta.py --edits-per-turn 20 --turns 3 \\
        --out experiments/results/smollm2/bench_meta_rledit.json
"""

import argparse
import json
import resource
import time

import jax
import numpy as np

import lnjax as lx
from lnjax.app.report import write_json
from lnjax.app.train_editor import training_plan
from lnjax.data import facts
from lnjax.editors import hypernet as hn
from lnjax.engine.meta import train
from lnjax.io import builtin_models


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3, help="initial edit lr of the net")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    model, tok = lx.hf.load("smollm2"), lx.hf.load_tokenizer("smollm2")
    targets = builtin_models.BUILTIN["smollm2"].default_targets
    n = a.edits_per_turn * a.turns
    records = tuple(lx.data.tokenize(facts.edit_records("train", None)[600:600 + n], tok))
    plan = training_plan("rledit", model, targets, records=records, options={"lr": a.lr}, cache_dir="/tmp",
                         edits_per_turn=a.edits_per_turn)
    out = {"model": "smollm2", "editor": "rledit", "targets": list(targets), "edits_per_turn": a.edits_per_turn,
           "turns": a.turns, "back_depth": plan.meta.back_depth, "device": str(jax.devices()[0]), "paths": {}}
    nets = {}
    for name, reuse in (("history_streams", True), ("whole_model", False)):
        row = {}
        for k in (1, a.turns):
            t0 = time.time()
            trained, rep = train(model, targets, plan.turns, plan.net, plan.meta, progress=False, stop_after=k,
                               log=lambda m: None, reuse_prefix=reuse)
            jax.block_until_ready(trained.theta)
            row[f"seconds_{k}_turns" + ("_with_compile" if k == 1 else "")] = time.time() - t0
        row["seconds_per_turn"] = row[f"seconds_{a.turns}_turns"] / a.turns
        row["max_rss_gb_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        nets[name] = (trained, rep["diagnostics"])
        out["paths"][name] = row
        print(name, row, flush=True)
    (fast, d_fast), (whole, d_whole) = nets["history_streams"], nets["whole_model"]
    out["max_relative_difference"] = {k: float(np.max(np.abs(d_fast[k] - d_whole[k]) / np.abs(d_whole[k])))
                                      for k in ("gen_loss", "loc_loss", "edit_loss", "grad_norm")}
    init = hn.init_theta(plan.net, whole.targets)
    diff = moved = 0.0
    for g in init:
        for k, v in whole.theta[g].items():
            v0, vf = np.asarray(init[g][k], np.float64), np.asarray(fast.theta[g][k], np.float64)
            moved += float(np.sum((np.asarray(v, np.float64) - v0) ** 2))
            diff += float(np.sum((vf - np.asarray(v, np.float64)) ** 2))
    out["theta_difference_over_movement"] = (diff / moved) ** 0.5 if moved else 0.0
    out["speedup_per_turn"] = (out["paths"]["whole_model"]["seconds_per_turn"]
                               / out["paths"]["history_streams"]["seconds_per_turn"])
    print(json.dumps({k: out[k] for k in ("speedup_per_turn", "max_relative_difference",
                                          "theta_difference_over_movement")}))
    if a.out:
        write_json(a.out, out)


if __name__ == "__main__":
    main()
