"""Where a run's locality damage goes: kept facts flipped by a sequential run, by exposure.

A kept (locality-pool) fact is *exposed* to an edit when the edit's old answer starts with the same token as the
kept fact's answer: the unedited model then predicts the same token at both first answer rows, which is where
``key_geometry.py`` finds the keys of different facts alike. This study runs one editor over ``--turns`` turns of
seed-``--seed`` world edits and reports, for ``--n-loc`` kept facts (wording 0), how often the first answer token's
teacher-forced prediction changed, grouped by the number of the run's edits each fact was exposed to.

    python experiments/leak_by_answer.py                                     # shipped model, UltraEdit
    python experiments/leak_by_answer.py --model runs/nols14_mem_L3 --targets model.layers.3.memory.value_proj

Writes ``leak_by_answer.json`` and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


import lnjax as lx  # noqa: E402
from key_geometry import supervised_keys, supervised_logits  # noqa: E402
from lnjax.core.cpu_threads import limit_lapack_threads_on_cpu  # noqa: E402
from lnjax.world import world_model
from lnjax.eval.prepare import prepare_edits  # noqa: E402
from lnjax.models import Model  # noqa: E402
from lnjax.world import default_world  # noqa: E402

BUCKETS = ((0, 0), (1, 1), (2, 4), (5, 14), (15, 10 ** 9))
SHARING_BUCKETS = ((0, 0), (1, 4), (5, 19), (20, 79), (80, 10 ** 9))


def first_predictions(model, pairs):
    """The model's argmax token at the first answer row of each (prompt, answer) pair [n]."""
    logits, _ = supervised_logits(model, pairs)
    firsts = np.cumsum([0] + [len(a) for _, a in pairs[:-1]])
    return logits[firsts].argmax(1)


def flips_by_exposure(before, after, exposure, buckets=BUCKETS):
    """Share of kept facts whose first-token prediction changed, per exposure bucket:
    ``[{"exposure": "lo-hi", "facts": n, "flipped": share}]`` (buckets with no fact are left out)."""
    changed = before != after
    out = []
    for lo, hi in buckets:
        sel = (exposure >= lo) & (exposure <= hi)
        if sel.any():
            out.append({"exposure": f"{lo}-{hi}" if hi < 10 ** 9 else f"{lo}+", "facts": int(sel.sum()),
                        "flipped": float(changed[sel].mean())})
    return out


def slot_sharing(model, target, kept_pairs, edit_pairs, chunk=200):
    """For a memory target (sparse code): per kept fact, the number of the run's edit rows that fire at least one
    of the slots its first answer row fires [n_kept], counted through per-slot touch counts so that the edit keys
    are never all in memory at once."""
    floor = lambda k: k.min(axis=1, keepdims=True) + 1e-6  # a silent slot holds the code's constant offset
    touched = None
    for i in range(0, len(edit_pairs), chunk):
        k, _ = supervised_keys(model, [target], edit_pairs[i:i + chunk])
        fired = (k[target] > floor(k[target])).astype(np.int64)
        touched = fired.sum(0) if touched is None else touched + fired.sum(0)
    k, first = supervised_keys(model, [target], kept_pairs)
    kept = k[target][first]
    return ((kept > floor(kept)) * touched[None, :]).sum(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="world-model directory (default: the shipped one)")
    ap.add_argument("--targets", default=None, help="comma-separated modules (default: the model's)")
    ap.add_argument("--editor", default="ultraedit")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n-loc", type=int, default=1200)
    ap.add_argument("--out", default="runs/leak_by_answer")
    args = ap.parse_args(argv)
    limit_lapack_threads_on_cpu(1)
    world = default_world()
    tok = world.tokenizer()
    model = world_model.load(args.model) if args.model else world_model.default_model()
    targets = tuple(args.targets.split(",")) if args.targets else world_model.DEFAULT_TARGETS
    n = args.turns * args.edits_per_turn
    raw = world.records("edit", n, seed=args.seed)
    job = prepare_edits(raw, tok, edits_per_turn=args.edits_per_turn, eval_records=None)  # kept facts: below
    editor = lx.editors.get(args.editor, lr=args.lr)
    result = lx.edit_sequence(model, editor, job.turns, targets, progress=True)
    kept = world.all_facts("locality")
    kept = kept[np.random.default_rng(args.seed).permutation(len(kept))[:args.n_loc]]
    pairs = [(tok.encode(world.prompt(s, r, 0)), tok.encode(" " + world.answer(s, r), False)) for s, r in kept]
    before = first_predictions(model, pairs)
    after = first_predictions(Model(model.config, result.params), pairs)
    old_first = np.array([tok.encode(" " + r["pred"], False)[0] for r in raw])
    new_first = np.array([tok.encode(" " + r["alt"], False)[0] for r in raw])
    kept_first = np.array([a[0] for _, a in pairs])
    exposure = (kept_first[:, None] == old_first[None, :]).sum(1)
    as_target = (kept_first[:, None] == new_first[None, :]).sum(1)
    # the whole answer: the same relation's same answer (answer words are relation-specific)
    kept_answer = np.array([world.answer(s, r) for s, r in kept])
    same_answer = (kept_answer[:, None] == np.array([r["pred"] for r in raw])[None, :]).sum(1)
    out = {"config": vars(args), "edits": n, "kept_facts": len(pairs),
           "flipped_overall": float((before != after).mean()),
           "by_exposure": flips_by_exposure(before, after, exposure),
           "by_same_old_answer": flips_by_exposure(before, after, same_answer),
           "by_exposure_as_new_target": flips_by_exposure(before, after, as_target)}
    memories = [t for t in targets if ".memory." in t]
    if memories:  # a sparse code: how many edit rows wrote into the slots a kept fact reads
        shared = slot_sharing(model, memories[0], pairs, [r.edit for r in job.records])
        out["by_slot_sharing"] = flips_by_exposure(before, after, shared, SHARING_BUCKETS)
        out["slot_sharing_percentiles"] = dict(zip(("10", "50", "90"), np.percentile(shared, (10, 50, 90)).tolist()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "leak_by_answer.json"), "w") as f:
        json.dump(out, f, indent=2)
    lines = [f"# Kept facts flipped after {n} edits ({args.editor}, lr {args.lr}, {args.model or 'shipped model'}, "
             f"targets {', '.join(targets)})", "", f"Overall: {out['flipped_overall']:.3f} of {len(pairs)} kept facts "
             "changed their first-token prediction."]
    tables = [("edits sharing the kept fact's first answer token as their old answer", "by_exposure"),
              ("edits whose whole old answer is the kept fact's answer", "by_same_old_answer"),
              ("edits whose new target starts with the kept fact's first answer token", "by_exposure_as_new_target")]
    if memories:
        tables.append((f"edit rows firing a slot the kept fact's first row fires ({memories[0]})", "by_slot_sharing"))
    for title, key in tables:
        lines += ["", f"| {title} | kept facts | flipped |", "|---|---|---|"]
        lines += [f"| {b['exposure']} | {b['facts']} | {b['flipped']:.3f} |" for b in out[key]]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
