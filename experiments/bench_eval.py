"""Evaluation benchmark (not a test): the previous evaluation against the current one on the same records.

Loads a model (default: the built-in SmolLM2-135M GGUF), takes the first ``--records`` edit records of
``--dataset facts`` (``lnjax.data.facts``) or of a ZsRE-format file (``--data``), builds the evaluation set of
their three probe sets and times, in one process one after the other, each path from a cold start (compilation
included, as a run pays it):

- ``dense``: the previous evaluation — every probe set padded to its longest probe, chunks of 256 rows, logits
  and argmax at every position (``lnjax.eval.dense_predictions``);
- ``bucketed``: ``lnjax.eval.predictions_of`` — probes pooled and bucketed by length, calls fitted to the
  buckets, the vocabulary projection at the supervised positions only.

Both predictions go through the same metric code (``evaluate(..., known=...)``); the script reports whether the
metrics and the predictions at every supervised position are identical, and writes a JSON.

    python experiments/bench_eval.py --records 100 --json experiments/results/bench_cpu/eval_smollm2.json
"""

import argparse
import os
import time

import jax
import numpy as np

from lnjax import data as data_lib
from lnjax import eval as ev
from lnjax.core.turns import IGNORE
from lnjax.io import hf
from lnjax.app.report import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--dataset", default="facts", help="facts, or zsre with --data")
    ap.add_argument("--data", default=None)
    ap.add_argument("--order", default="dense,bucketed", help="which paths to time, in this order")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t0 = time.time()
    model = hf.load(args.model)
    tok = hf.load_tokenizer(args.model)
    if args.dataset == "facts":
        from lnjax.data import facts
        records = facts.edit_records("edit", args.records, seed=0)
    else:
        records = data_lib.read(args.dataset, args.data, args.records, seed=0)
    es = ev.build_eval_set(data_lib.tokenize(records, tok, None))
    print(f"model and {es.size} records ready in {time.time() - t0:.1f}s; probe shapes "
          f"{ {k: tuple(np.asarray(b.input_ids).shape) for k, b in es.batches.items()} }", flush=True)

    protocols = ("teacher_forced", "generation_exact_match")
    out = {"model": args.model, "records": es.size, "dataset": args.dataset, "device": jax.devices()[0].device_kind,
           "cpu_count": os.cpu_count(), "paths": {}}
    preds = {}
    for path in args.order.split(","):
        t = time.time()
        if path == "dense":
            preds[path] = {k: ev.dense_predictions(model.apply, model.params, b) for k, b in es.batches.items()}
        elif path == "bucketed":
            preds[path] = ev.predictions_of(model.apply, model.params, es.batches)
        else:
            raise SystemExit(f"unknown path {path!r}")
        seconds = time.time() - t
        metrics = ev.evaluate(model.apply, model.params, es, preds[path]["locality"], protocols, known=preds[path])
        out["paths"][path] = {"seconds": seconds, "metrics": metrics}
        print(f"{path}: {seconds:.1f}s  {metrics}", flush=True)
    if len(preds) == 2:
        a, b = preds.values()
        same = all(np.array_equal(a[k][np.asarray(bt.labels) != IGNORE], b[k][np.asarray(bt.labels) != IGNORE])
                   for k, bt in es.batches.items())
        m = [v["metrics"] for v in out["paths"].values()]
        out["identical_predictions"] = bool(same)
        out["identical_metrics"] = m[0] == m[1]
        d, bk = out["paths"].get("dense"), out["paths"].get("bucketed")
        if d and bk:
            out["speedup"] = d["seconds"] / bk["seconds"]
        print(f"identical predictions at supervised positions: {same}; identical metrics: {m[0] == m[1]}; "
              f"speed-up {out.get('speedup', float('nan')):.2f}x", flush=True)
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
