"""FT, MEMIT and AlphaEdit after sequential edits on the embedded world (efficacy, generalization, locality).

    python experiments/locate_baselines.py --turns 20 --edits-per-turn 100 --out experiments/results/locate_baselines

The same edits as ``lnjax run`` on the world (``World.records("edit", n, seed)``, turns packed by ``pack_turns``),
evaluated with ``lnjax.eval`` against the unedited model. Each turn is one jitted ``editor.update`` with the
turn's parameters and arrays (what ``edit_sequence`` passes by the editor's ``needs``), driven here turn by turn
so that each turn is timed. Writes ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lnjax.app import baselines
from lnjax import data
from lnjax import eval as eval_lib
from lnjax.world import world_model
from lnjax.core.turns import EditTurn, pack_turns
from lnjax.models import get_module, with_module_leaf
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
    tok = world.tokenizer()
    n = args.turns * args.edits_per_turn
    records = data.records_from_dicts("zsre", world.records("edit", n, seed=args.seed), "world:edit")
    tokenized = data.tokenize(records, tok)
    length = max(len(p) + len(a) - 1 for r in tokenized for p, a in [r.edit])
    batches, order = pack_turns([r.edit for r in tokenized], args.edits_per_turn, length)
    subject_last = np.where(order >= 0, np.array([tokenized[i].subject_last for i in order.reshape(-1)])
                            .reshape(order.shape), -1).astype(np.int32)
    eval_set = eval_lib.build_eval_set(tokenized)
    base_loc = eval_lib.base_predictions(model.apply, model.params, eval_set)
    protocols = ("teacher_forced", "locality_vs_unedited")
    results = {"unedited": eval_lib.evaluate(model.apply, model.params, eval_set, base_loc, protocols),
               "editors": {}, "config": vars(args)}
    print("unedited", results["unedited"], flush=True)
    for name in args.editors.split(","):
        targets = baselines.WORLD_TARGETS.get(name, world_model.DEFAULT_TARGETS)
        options = {**baselines.WORLD_HPARAMS[name], **extra.get(name, {})}
        editor, meta = baselines.make_editor(name, model, targets, world=world, options=options)
        shapes = {t: tuple(get_module(model.params, t)["kernel"].shape) for t in targets}
        state = editor.init(shapes)

        @jax.jit
        def turn_fn(params, state, edit, subject_last):
            turn = EditTurn(edit=edit, subject_last=subject_last)
            deltas, state = editor.update(None, state, params=params, turn=turn)
            for t in targets:
                kernel = get_module(params, t)["kernel"]
                params = with_module_leaf(params, t, "kernel", kernel + deltas[t].astype(kernel.dtype))
            return params, state

        params, times = model.params, []
        for i in range(args.turns):
            edit = jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), batches)
            t0 = time.time()
            params, state = turn_fn(params, state, edit, jnp.asarray(subject_last[i]))
            jax.block_until_ready(params)
            times.append(time.time() - t0)
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
