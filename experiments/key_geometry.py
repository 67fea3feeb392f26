"""The geometry of the keys the editors solve over, for any model: why one-step editing does or does not write.

    python experiments/key_geometry.py [--out experiments/results/key_geometry] [--model DIR]
    python experiments/key_geometry.py --model smollm2 --dataset facts --layers 5,15,25,26,27,28,29

For every down_proj of the model (the world model by default; ``--layers`` picks some), on edit prompts (seed-1
records, as the tuning sweep uses) and their locality prompts, at the supervised positions (docs/method.md §1):

- mean squared key norm, participation ratio ``(Σλ)²/Σλ²`` of the key covariance and the number of principal
  directions holding 90% of its variance (the keys' effective dimension);
- the cosine of each locality key (first answer position) with its nearest edit key;
- leverage: for a turn of ``n`` edits with keys ``K`` and the ridge ``α``, a locality key ``k`` receives
  ``h = k Kᵀ(KKᵀ + αI)⁻¹`` times the turn's pseudo-values, so ``‖h‖`` (mean over locality keys) is how strongly
  a turn's writes leak into facts it does not edit. An edit key's own row has ``‖h‖ ≈ 1``; well-separated keys
  give ``‖h‖ ≪ 1``. ``own leverage`` is the same for the turn's own edit keys (first answer position), for
  comparison; ``all-row leverage`` takes every locality answer row (not only the first) for the largest turn;
  ``--standardize`` measures all of it on keys standardized as the LN editors see them;
- the teacher-forced logit margins of the locality answers and of the edits' new targets: how far a leak may
  move a kept fact before it flips, against how far a turn must move an edited one.

``--module memory.value_proj`` measures a memory layer (``ModelConfig.memory_layers``, experiments/grow_memory.py)
instead of ``mlp.down_proj``.

Writes ``key_geometry.json`` and ``summary.md``.
"""

import argparse
import json
import os


import numpy as np  # noqa: E402

from lnjax import data  # noqa: E402
from lnjax.data import facts
from lnjax.io import hf
from lnjax.world import world_model
from lnjax.core.turns import IGNORE, pack  # noqa: E402
from lnjax.world.memory_testbed import supervised_keys  # noqa: E402
from lnjax.world import default_world  # noqa: E402


def supervised_logits(model, pairs, batch_size=256):
    """(logits [rows, vocab] float64, answer tokens [rows]) at every supervised position of ``pairs``, in the row
    order of ``supervised_keys``."""
    logits_out, labels_out = [], []
    for i in range(0, len(pairs), batch_size):
        batch = pack(pairs[i:i + batch_size])
        logits = np.asarray(model.apply(model.params, batch.input_ids, batch.attention_mask), np.float64)
        labels = np.asarray(batch.labels)
        rows, cols = np.nonzero(labels != IGNORE)
        logits_out.append(logits[rows, cols])
        labels_out.append(labels[rows, cols])
    return np.concatenate(logits_out), np.concatenate(labels_out)


def answer_margins(model, pairs, batch_size=256):
    """Teacher-forced logit margin at every supervised position of ``pairs``: the answer token's logit minus the
    largest other logit (float64 [rows]). Positive: the model predicts the answer there; for an edit's new target
    a negative margin is how far a turn must raise it."""
    return margins(*supervised_logits(model, pairs, batch_size))


def margins(logits, labels):
    """Answer logit minus the largest other logit per row, from ``supervised_logits``'s (logits, labels)."""
    rows = np.arange(len(labels))
    gold = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return gold - others.max(1)


def cosine_by_prediction(loc_keys, loc_first, loc_pred, edit_keys, edit_pred, high=0.5):
    """How a locality row's key resembles the keys of a turn, split by what the two rows predict.

    For every (locality row, edit row) pair: the cosine of their keys, grouped by the locality row's kind (first
    answer position or later) and by whether the unedited model predicts the same token at both rows (an edit's
    rows are read before the edit, so they predict its *old* answer). Returns ``{"first|later, same|other
    token": {"mean": mean cosine, "above": share of pairs above high, "pairs": count}}``."""
    cos = _unit_rows(loc_keys) @ _unit_rows(edit_keys).T
    same = loc_pred[:, None] == edit_pred[None, :]
    out = {}
    for kind, rows in (("first", loc_first), ("later", ~loc_first)):
        for name, m in (("same token", same), ("other token", ~same)):
            vals = cos[rows][m[rows]]
            if vals.size:
                out[f"{kind}, {name}"] = {"mean": float(vals.mean()), "above": float((vals > high).mean()),
                                          "pairs": int(vals.size)}
    return out


def leverage(loc_keys, edit_keys, alpha):
    """Row norms of ``loc_keys Kᵀ(KKᵀ + αI)⁻¹`` (float64)."""
    gram = edit_keys @ edit_keys.T + alpha * np.eye(len(edit_keys))
    return np.linalg.norm(np.linalg.solve(gram, edit_keys @ loc_keys.T).T, axis=1)


def covariance_spectrum(k):
    """Eigenvalues (descending) of the sample covariance of rows k [n, d], from the smaller of the d × d
    covariance and the n × n centred Gram (they share their nonzero eigenvalues), so wide keys fit in memory."""
    c = k - k.mean(0)
    small = c.T @ c if k.shape[1] <= k.shape[0] else c @ c.T
    return np.clip(np.linalg.eigvalsh(small / (len(k) - 1))[::-1], 0, None)


def _unit_rows(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/key_geometry")
    ap.add_argument("--model", default=None)
    ap.add_argument("--edits", type=int, default=400)
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--turn-sizes", default="10,20,50,100")
    ap.add_argument("--dataset", choices=("world", "facts"), default="world")
    ap.add_argument("--layers", default="", help="comma-separated layer indices (default: every layer)")
    ap.add_argument("--module", default="mlp.down_proj",
                    help="the module of each layer to measure, e.g. memory.value_proj for a memory layer")
    ap.add_argument("--standardize", action="store_true",
                    help="measure on keys standardized with the edit keys' mean and std, as LN editors solve over")
    args = ap.parse_args(argv)
    if args.model is None or os.path.exists(os.path.join(args.model, "report.json")):
        model = world_model.load(args.model) if args.model else world_model.default_model()
        tok = default_world().tokenizer()
    else:
        model, tok = hf.load(args.model), hf.load_tokenizer(args.model)
    if args.dataset == "world":
        records = data.records_from_dicts("zsre", default_world().records("edit", args.edits, seed=1), "world")
    else:
        records = facts.edit_records("edit", args.edits, seed=1)
    recs = data.tokenize(records, tok)
    layers = [int(x) for x in args.layers.split(",") if x] or range(model.config.n_layers)
    targets = [f"model.layers.{i}.{args.module}" for i in layers]
    edit_pairs, loc_pairs = [r.edit for r in recs], [r.locality for r in recs[:100]]
    edit_keys, edit_first = supervised_keys(model, targets, edit_pairs)
    loc_keys, loc_first = supervised_keys(model, targets, loc_pairs)
    edit_of_row = np.cumsum(edit_first) - 1
    sizes = [int(x) for x in args.turn_sizes.split(",")]
    # one forward pass per prompt set serves both the margins and what the unedited model predicts at each row
    loc_logits, edit_logits = supervised_logits(model, loc_pairs), supervised_logits(model, edit_pairs)
    loc_pred, edit_pred = loc_logits[0].argmax(1), edit_logits[0].argmax(1)
    out = {"model": args.model or "world", "dataset": args.dataset, "edits": args.edits, "alpha": args.alpha,
           "d_model": model.config.d_model, "targets": {}}
    pct = (10, 25, 50, 75)
    out["margin_percentiles"] = {
        name: dict(zip(map(str, pct), np.percentile(margins(*logits), pct).tolist()))
        for name, logits in (("locality (gold vs best other)", loc_logits),
                             ("edit new target (vs best other)", edit_logits))}
    if args.standardize:
        for t in targets:
            mu, sd = edit_keys[t].mean(0), edit_keys[t].std(0) + 1e-6
            edit_keys[t], loc_keys[t] = (edit_keys[t] - mu) / sd, (loc_keys[t] - mu) / sd
        out["standardized"] = True
    for t in targets:
        k = edit_keys[t]
        eig = covariance_spectrum(k)
        turn = edit_of_row < sizes[-1]
        lev = leverage(loc_keys[t][loc_first], k[turn], args.alpha)
        cos = _unit_rows(loc_keys[t][loc_first]) @ _unit_rows(k[edit_first]).T
        out["targets"][t] = {
            "d_in": int(k.shape[1]), "mean_sq_norm": float((k ** 2).sum(1).mean()),
            "participation_ratio": float(eig.sum() ** 2 / (eig ** 2).sum()),
            "dims_for_90pct_variance": int(np.searchsorted(np.cumsum(eig) / eig.sum(), 0.9) + 1),
            "nearest_edit_cosine": float(cos.max(1).mean()), "mean_cosine": float(cos.mean()),
            "leverage_by_turn_size": {str(n): float(leverage(loc_keys[t][loc_first], k[edit_of_row < n],
                                                             args.alpha).mean()) for n in sizes},
            "all_row_leverage": float(leverage(loc_keys[t], k[edit_of_row < sizes[-1]], args.alpha).mean()),
            # the same for the turn's own first-answer keys: what a key that *is* edited receives
            "own_leverage_by_turn_size": {str(n): float(leverage(k[edit_first & (edit_of_row < n)],
                                                                 k[edit_of_row < n], args.alpha).mean())
                                          for n in sizes},
            "leverage_percentiles": dict(zip(("10", "50", "90", "max"),
                                             np.percentile(lev, (10, 50, 90, 100)).tolist())),
            "cosine_by_prediction": cosine_by_prediction(loc_keys[t], loc_first, loc_pred, k[turn],
                                                         edit_pred[turn]),
        }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "key_geometry.json"), "w") as f:
        json.dump(out, f, indent=2)
    head = "| target | d_in | eff. dim (PR) | dims for 90% | nearest-edit cos | " + \
        " | ".join(f"leverage n={n}" for n in sizes) + f" | all-row leverage n={sizes[-1]} | " + \
        f"own leverage n={sizes[-1]} |"
    kind = "standardized keys" if args.standardize else "raw keys"
    lines = [f"# Key geometry of {out['model']} on {args.dataset} edits (d_model {out['d_model']}, α {args.alpha}, "
             f"{kind})", "", head,
             "|" + "---|" * (7 + len(sizes))]
    for t, r in out["targets"].items():
        lines.append(f"| {t} | {r['d_in']} | {r['participation_ratio']:.1f} | {r['dims_for_90pct_variance']} | "
                     f"{r['nearest_edit_cosine']:.2f} | " +
                     " | ".join(f"{r['leverage_by_turn_size'][str(n)]:.2f}" for n in sizes) +
                     f" | {r['all_row_leverage']:.2f} | {r['own_leverage_by_turn_size'][str(sizes[-1])]:.2f} |")
    lines += ["", f"Leverage of the first locality rows on a turn of {sizes[-1]}, percentiles 10/50/90/max, and the "
              "cosine of locality keys to the turn's keys by what both rows predict (mean; share of pairs above "
              "0.5):", ""]
    for t, r in out["targets"].items():
        lines.append(f"- {t}: leverage " + " / ".join(f"{v:.3f}" for v in r["leverage_percentiles"].values()) +
                     "; " + "; ".join(f"{k} {v['mean']:.3f} ({v['above']:.1%})"
                                      for k, v in r["cosine_by_prediction"].items()))
    lines += ["", "Teacher-forced logit margins (answer token minus the best other token), percentiles " +
              "/".join(map(str, pct)) + ":", ""]
    lines += [f"- {k}: " + " / ".join(f"{v:.2f}" for v in m.values()) for k, m in out["margin_percentiles"].items()]
    summary = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)


if __name__ == "__main__":
    main()
