"""SmolLM2-135M on the real-fact edit set, in one process (the model loads and compiles once):

    python experiments/smollm2_study.py knowledge --n 1200
    python experiments/smollm2_study.py frontier \
        --grid "ultraedit=1e-3;stableedit=1e-3;no_normalization=~1e-3;ultraedit=1e-2;stableedit=1e-2"

``knowledge``: what the unedited model gets right on the first ``n`` edit-split facts with their true answers,
by relation (teacher-forced and greedy), and the known/unknown row indices (``lnjax.eval.knowledge``).

``frontier``: one turn of ``--edits`` counterfactual edits on ``--targets`` per (editor, lr), evaluated on the
edit, paraphrase and locality probes (teacher-forced) and locality vs the unedited model. First it records the
scale of the turn's raw features per target (mean ``‖k‖²``, mean ``‖g‖``) and of the normalized ones
(``‖k̂‖² ≈ d_in``), the factor the value step ``V = -lr ‖k‖² g`` differs by between no-LN and LN editors; a grid
value ``~lr`` is lr times that factor (no-LN at the step size LN takes at lr).
StableEdit gets one warm-up turn from the training split, as ``lnjax run`` gives it.
"""

import argparse
import json
import os
import time


import numpy as np  # noqa: E402

import lnjax as lx  # noqa: E402
from lnjax.io import builtin_models  # noqa: E402
from lnjax import eval as eval_lib
from lnjax.data import facts
from lnjax.eval import knowledge as knowledge_lib
from lnjax.core.turns import pack  # noqa: E402
from lnjax.eval.prepare import prepare_edits  # noqa: E402
from lnjax.models.probe import turn_features  # noqa: E402
from lnjax.app.hparams import uses_warmup  # noqa: E402


def knowledge(model, tok, args):
    t0 = time.time()
    out = knowledge_lib.knowledge(model.apply, model.params, tok, "edit", args.n, seed=args.seed)
    out["seconds"] = time.time() - t0
    out["versions"] = facts.versions()
    return out


def feature_scales(model, targets, batch):
    feats, _, n = turn_features(model.apply, model.params, targets, pack(batch))
    n = int(n)
    out = {}
    for t in targets:
        k = np.asarray(feats[t].keys[:n], np.float64)
        g = np.asarray(feats[t].value_grads[:n], np.float64)
        out[t] = {"rows": n, "d_in": k.shape[1], "mean_sq_key_norm": float((k ** 2).sum(1).mean()),
                  "mean_grad_norm": float(np.linalg.norm(g, axis=1).mean()),
                  "raw_step_scale": float(((k ** 2).sum(1) * np.linalg.norm(g, axis=1)).mean()),
                  "standardized_step_scale": float(k.shape[1] * np.sqrt(g.shape[1]))}
    return out


def frontier(model, tok, args):
    targets = tuple(args.targets.split(",")) if args.targets else builtin_models.BUILTIN["smollm2"].default_targets
    job = prepare_edits(facts.edit_records("edit", args.edits, seed=args.seed), tok, model, edits_per_turn=args.edits,
                        warmup_records=facts.edit_records("train", args.edits, seed=args.seed))
    batches, warm, es, base = job.turns, job.warmup_turns(), job.eval_set, job.base_loc
    out = {"targets": list(targets), "edits": args.edits, "scales": feature_scales(model, targets,
                                                                                 [r.edit for r in job.records]),
           "unedited": eval_lib.evaluate(model.apply, model.params, es, base, ("teacher_forced",
                                                                               "locality_vs_unedited")),
           "rows": []}
    print(json.dumps({"scales": out["scales"], "unedited": out["unedited"]}), flush=True)
    # "~lr": lr times the standardized/raw step-scale ratio, i.e. the no-LN lr whose raw value step has the size
    # LN's standardized step has at lr
    ratio = float(np.mean([s["standardized_step_scale"] / s["raw_step_scale"] for s in out["scales"].values()]))
    out["step_scale_ratio"] = ratio
    grid = [(n.strip(), [float(x[1:]) * ratio if x.startswith("~") else float(x) for x in lrs.split(",") if x])
            for n, _, lrs in (part.partition("=") for part in args.grid.split(";"))]
    for name, lrs in grid:
        for lr in lrs:
            t0 = time.time()
            ed = lx.editors.get(name.strip(), lr=lr)
            res = lx.edit_sequence(model, ed, batches, targets, warmup=warm if uses_warmup(name) else None,
                                   progress=False, log=lambda m: None)
            m = eval_lib.evaluate(model.apply, res.params, es, base, ("teacher_forced", "locality_vs_unedited"))
            row = {"editor": name.strip(), "lr": lr, **m["teacher_forced"],
                   "locality_vs_unedited": m["locality_vs_unedited"],
                   "delta_norm": [float(x) for x in res.diagnostics["delta_norm"][-1]],
                   "rejected": int(res.editor_state.rejected), "seconds": time.time() - t0}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("knowledge", "frontier"))
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--targets", default="")
    ap.add_argument("--grid", default="ultraedit=1e-4,1e-3,1e-2;stableedit=1e-4,1e-3,1e-2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="experiments/results/smollm2")
    args = ap.parse_args(argv)
    model, tok = lx.hf.load("smollm2"), lx.hf.load_tokenizer("smollm2")
    result = {"config": vars(args), **(knowledge if args.what == "knowledge" else frontier)(model, tok, args)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.what}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
