r"""Every editor on SmolLM2-135M with real facts at 2,000 sequential edits: tune on one subject set, evaluate on another.

    # 1. cost of one turn and one evaluation per editor (MEMIT/AlphaEdit: published settings, untuned)
    python experiments/smollm2_frontier.py tune --turns 1 --offsets 0 \
        --editors ultraedit,stableedit,no_normalization,ft --out runs/frontier2000/cost.json
    python experiments/smollm2_frontier.py tune --turns 1 --published --editors memit,alphaedit \
        --out runs/frontier2000/cost_locate.json
    # 2. tuning: the same grid for every editor, on tune-subject edits (--reuse: rows an interrupted run logged)
    python experiments/smollm2_frontier.py tune --editors ultraedit,no_normalization,stableedit --turns 4 \
        --offsets=-2,-1,0 --out experiments/results/smollm2/frontier2000/tuning.json
    python experiments/smollm2_frontier.py tune --editors alphaedit --turns 4 --offsets=-2,-1,0 \
        --out experiments/results/smollm2/frontier2000/tuning_alphaedit.json
    # 3. the chosen lr of each editor, 20 turns of 100 edit-subject edits, per edit seed
    python experiments/smollm2_frontier.py run --tuning experiments/results/smollm2/frontier2000/tuning.json \
        --seed 0 --out experiments/results/smollm2/frontier2000/run_seed0.json
    python experiments/smollm2_frontier.py run --tuning experiments/results/smollm2/frontier2000/tuning_alphaedit.json \
        --editors alphaedit --seed 0 --out experiments/results/smollm2/frontier2000/run_alphaedit_seed0.json
    # 4. table + frontier figure from the tuning and run files (tuning*.json, run_*seed*.json)
    python experiments/smollm2_frontier.py summary --dir experiments/results/smollm2/frontier2000

Subjects. ``lnjax.data.facts`` splits *subjects* (seed 0): ``edit`` (about 60%), ``train`` (25%), ``locality``
(15%). Tuning edits are ``train`` rows ``[WARMUP_ROWS, WARMUP_ROWS + turns*100)``; the evaluated edits are
drawn from the ``edit`` rows (2,000 of 3,978, a random subset and order per ``--seed``), so no tuned-on subject is
ever evaluated. StableEdit's warm-up (``max(1, turns // 10)`` turns, as ``lnjax run`` gives it) takes ``train``
rows ``[0, WARMUP_ROWS)``, never a tuning edit. The locality probes of both come from the ``locality`` split's
pool (facts never edited); tuning and evaluation draw them independently per row.

Tuning budget, the same for every editor: the learning rates ``CENTRES[editor] * 10 ** (k / 2)`` for ``k`` in
``--offsets`` (half a decade apart; the centres were fixed before any run, the reason beside each), one seed,
``--turns`` turns of 100 tune edits, each point
scored ``score = mean(ES, GS, locality)`` (teacher-forced token accuracy of edit and paraphrase probes; locality:
agreement with the unedited model's teacher-forced argmax on the locality probes) over every tuned edit; the
largest score wins, ties to the smaller lr (the rule of ``experiments/tune_fair.py``).

Evaluation: after all turns, the same three metrics on ``--eval-n`` edited records drawn at random (seeded)
from the run's edits (all of them with ``--eval-n 0``); recorded in the results as ``eval_records``.

MEMIT and AlphaEdit edit ``LOCATE_TARGETS`` with key statistics from ``docstring_corpus`` (cached as MEMIT-format
.npz under ``STATS_DIR``). They have no learning rate: the same 3-point grid runs over the ridge weight that sets
their step (``KNOBS``: MEMIT's λ, AlphaEdit's α; larger is weaker, so the grid steps up from the published value
where the learning rates step down, each spanning the decade on the weaker side of its centre); every other
setting is published. ``--published`` runs one point at the published settings (the cost measurement
``cost_one_turn_locate.json``).
"""

import argparse
import ast
import glob
import json
import os
import sysconfig
import time

import jax
import numpy as np

import lnjax as lx
from lnjax import eval as eval_lib
from lnjax.app import baselines
from lnjax.app.hparams import uses_warmup
from lnjax.app.plots import pyplot, save_figure
from lnjax.app.report import logged_rows, write_json
from lnjax.core.turns import TurnBatch
from lnjax.data import facts
from lnjax.editors import key_stats
from lnjax.eval.prepare import prepare_edits
from lnjax.io import builtin_models

EDITS_PER_TURN = 100
WARMUP_ROWS = 200   # train rows 0..199: StableEdit's warm-up (2 turns for a 20-turn run); tuning edits start after
FACTS_SEED = 0      # the subject split; edit seeds only re-draw which edit-split rows are edited, in what order
PROTOCOLS = ("teacher_forced", "locality_vs_unedited")
CORPUS_SEQS, CORPUS_LENGTH = 500, 128
CORPUS_NAME = ("CPython standard-library docstrings (>= 200 chars, test folders skipped), first "
               f"{CORPUS_SEQS} x {CORPUS_LENGTH} tokens; an approximation of MEMIT's Wikipedia statistics")
STATS_DIR = "runs/frontier2000/key_stats"
# MEMIT/AlphaEdit edit a window of early-middle down_proj layers: the published Llama3-8B window (layers 4-8 of
# 32) scaled to SmolLM2's 30 layers and rounded (4-8); no causal tracing was run on SmolLM2.
LOCATE_TARGETS = tuple(f"model.layers.{i}.mlp.down_proj" for i in range(4, 9))
LOCATE = ("memit", "alphaedit")
# editor -> grid centre and why (fixed before any tuning run on this protocol)
CENTRES = {
    "ultraedit": (1e-3, "lnjax.app.hparams.MODEL_HPARAMS['smollm2']: the lr at which the released UltraEdit code "
                        "keeps locality ~0.7 after one turn of 100 edits on these layers (not tuned for a score)"),
    "stableedit": (1e-3, "MODEL_HPARAMS['smollm2']: whitened keys have UltraEdit's squared norm, same step size"),
    "no_normalization": (3.0, "MODEL_HPARAMS['smollm2']: the raw value step equals LN's at lr 1e-3 "
                              "(step-scale ratio ~2.8e3, experiments/smollm2_study.py)"),
    "ft": (5e-4, "the published FT-M setting of the UltraEdit baselines (lnjax.editors.ft defaults: 25 steps, "
                 "L-inf box 5e-5, chunks of 10)"),
    "memit": (15000.0, "MEMIT's published covariance weight lambda (mom2_update_weight, every released config)"),
    "alphaedit": (10.0, "AlphaEdit's published ridge alpha (L2 in its released Llama3-8B / GPT-J configs)"),
    "rledit": (1e-3, "the initial edit lr of meta-training (published 1e-6 at 7-8B, as UltraEdit's, which "
                     "SmolLM2 takes at 1e-3: the same scaling; meta-training then learns it per module)"),
    "malmen": (1e-3, "as RLEdit: MALMEN's published initial edit lr 1e-6, scaled as UltraEdit's to SmolLM2"),
}
# The meta-trained editors (RLEdit, MALMEN): hypernetworks meta-trained on facts 'train' rows [META_ROWS_FROM, end)
# -- after the warm-up and tuning rows, so neither a tuned-on nor an evaluated edit is ever trained on -- tokenized
# for SmolLM2, one network per grid point (the initial edit lr is a meta-training setting), cached in HYPERNET_DIR.
META = ("rledit", "malmen")
META_ROWS_FROM = 600
HYPERNET_DIR = "runs/frontier2000/hypernets"
# What the grid varies per editor and in which direction its points step from the centre. The learning rates
# step down (centre/10 .. centre); MEMIT's lambda and AlphaEdit's alpha are ridge weights, stronger edits at
# smaller values, so their points step *up* (centre .. 10 x centre): every editor's grid spans the decade on the
# weaker side of its centre, the same budget in the same direction. Fixed before any locate-editor tuning run.
KNOBS = {"memit": ("mom2_update_weight", -1), "alphaedit": ("l2", -1)}


def knob(name: str) -> tuple:
    """``(setting tuned, direction)``: ``("lr", 1)`` for the learning-rate editors, ``KNOBS[name]`` otherwise."""
    return KNOBS.get(name, ("lr", 1))


def grid(centre: float, offsets, direction: int = 1) -> list:
    """The settings ``centre * 10 ** (direction * k / 2)`` for the half-decade steps ``k`` in ``offsets``."""
    return [centre * 10 ** (0.5 * direction * k) for k in offsets]


def weakness(name: str, value) -> float:
    """Larger for weaker settings of ``name`` (the rule breaks ties towards the weaker one)."""
    return -(value or 0) * knob(name)[1]


def reused_rows(path: str) -> dict:
    """{(editor, lr): row} of the rows an earlier tuning run printed to its log ``path`` (the same edits and
    probes, deterministic, so a row is what a rerun would give); {} without a path."""
    return {(r["editor"], r["lr"]): r for r in logged_rows(path)}


def targets_of(args) -> tuple:
    return tuple(args.targets.split(",")) if args.targets else builtin_models.BUILTIN["smollm2"].default_targets


def docstring_corpus(tok, n_seqs: int = CORPUS_SEQS, length: int = CORPUS_LENGTH) -> TurnBatch:
    """The key-statistics corpus for MEMIT/AlphaEdit: docstrings of at least 200 characters of the running
    CPython's standard library (read with ``ast``, nothing imported; files in sorted order, test folders
    skipped), joined by blank lines, tokenized and cut into ``n_seqs`` windows of ``length`` tokens [n, L].
    English prose about code: an approximation of the published Wikipedia corpus, the only sizeable local one."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root)
                   if "site-packages" not in d and "test" not in d.split(os.sep) and "tests" not in d.split(os.sep)
                   for f in fs if f.endswith(".py"))
    docs = []
    for path in files:
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError):  # a few stdlib files are py2 examples or latin-1
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                       ast.ClassDef))]
        docs += [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) >= 200]
    ids = np.asarray(tok.encode("\n\n".join(docs), add_special_tokens=False), np.int32)
    if len(ids) < n_seqs * length:
        raise ValueError(f"docstring corpus has {len(ids)} tokens, {n_seqs * length} needed")
    windows = ids[:n_seqs * length].reshape(n_seqs, length)
    return TurnBatch(input_ids=windows, attention_mask=np.ones_like(windows), labels=np.full_like(windows, -100))


def locate_npz(model, tok, targets) -> dict:
    """{target: MEMIT-format .npz} of the docstring corpus' key statistics, computed once into ``STATS_DIR``."""
    paths = {t: os.path.join(STATS_DIR, f"{t}.{CORPUS_SEQS}x{CORPUS_LENGTH}.npz") for t in targets}
    if not all(os.path.exists(p) for p in paths.values()):
        stats = key_stats.collect(model.apply, model.params, targets, docstring_corpus(tok), batch_size=32,
                                  log=print)
        os.makedirs(STATS_DIR, exist_ok=True)
        for t, p in paths.items():
            np.savez(p, **{"mom2.mom2": np.asarray(stats[t].mom2), "mom2.count": np.asarray(stats[t].count)})
    return paths


def make_editor(name: str, lr: float, model, targets, tok=None):
    """``(editor, metadata)``: the LN editors and no-LN by registry name at ``lr``; FT (at ``lr``), MEMIT and
    AlphaEdit (``lr`` is the value of their ``KNOBS`` setting; None: every setting published) through
    lnjax.app.baselines."""
    if name == "ft":
        return baselines.make_editor(name, model, targets, options={"lr": lr}, log=None)
    if name in META:
        from lnjax.app.train_editor import trained_editor
        records = facts.edit_records("train", None, seed=FACTS_SEED)[META_ROWS_FROM:]
        t0 = time.time()
        editor = trained_editor(name, model, targets, records=tuple(lx.data.tokenize(records, tok)),
                                options={} if lr is None else {"lr": float(lr)}, cache_dir=HYPERNET_DIR,
                                edits_per_turn=EDITS_PER_TURN, progress=False)
        return editor, {"meta_training": {"records": f"facts seed {FACTS_SEED} 'train' rows [{META_ROWS_FROM}, "
                                                     f"{META_ROWS_FROM + len(records)})",
                                          "seconds": time.time() - t0}}
    if name in baselines.MODEL_EDITORS:
        options = {} if lr is None else {knob(name)[0]: float(lr)}
        editor, meta = baselines.make_editor(name, model, targets, npz=locate_npz(model, tok, targets),
                                             options=options, log=None)
        return editor, {**meta, "key_stats_corpus_text": CORPUS_NAME, "tuned_setting": knob(name)[0]}
    return lx.editors.get(name, lr=lr), {}


def run_one(model, tok, job, name: str, lr, targets, warm_turns: int) -> dict:
    """One editor at one lr over every turn of ``job``; metrics on its evaluation set and timings. MEMIT and
    AlphaEdit edit ``LOCATE_TARGETS`` instead of ``targets``."""
    targets = LOCATE_TARGETS if name in LOCATE else targets
    editor, meta = make_editor(name, lr, model, targets, tok)
    batches = job.edit_turns() if "turn" in editor.needs else job.turns
    warm = job.warmup_turns(warm_turns) if uses_warmup(name) else None
    if not {"turn", "params"} & set(editor.needs):  # as `lnjax run`: turns from the kept streams below the edits
        streamed = job.streamed_turns(model, warm)
        if streamed is not None:
            batches, warm = streamed
    t0 = time.time()
    res = lx.edit_sequence(model, editor, batches, targets, warmup=warm, chunk=job.n_turns, progress=False,
                           log=lambda m: None)
    jax.block_until_ready(res.params)
    t_edit = time.time() - t0
    m = eval_lib.evaluate(model.apply, res.params, job.eval_set, job.base_loc, PROTOCOLS)
    tf = m["teacher_forced"]
    row = {"editor": name, "lr": lr, "targets": list(targets), "es": tf["efficacy"], "gs": tf["generalization"],
           "loc": m["locality_vs_unedited"], "ls": tf["specificity"], "warmup_turns": warm_turns if warm else 0,
           "rejected_turns": int(res.editor_state.rejected), "seconds_edit": t_edit,
           "seconds_eval": time.time() - t0 - t_edit, **meta}
    row["score"] = (row["es"] + row["gs"] + row["loc"]) / 3
    print(json.dumps(row), flush=True)
    return row


def unedited_row(model, job) -> dict:
    m = eval_lib.evaluate(model.apply, model.params, job.eval_set, job.base_loc, PROTOCOLS,
                          known=job.unedited)
    tf = m["teacher_forced"]
    return {"es": tf["efficacy"], "gs": tf["generalization"], "loc": m["locality_vs_unedited"],
            "ls": tf["specificity"]}


def tune(model, tok, args) -> dict:
    n = args.turns * args.edits_per_turn
    if WARMUP_ROWS + n > META_ROWS_FROM and set(args.editors.split(",")) & set(META):
        raise ValueError(f"tuning rows [{WARMUP_ROWS}, {WARMUP_ROWS + n}) would overlap the hypernetworks' "
                         f"meta-training rows (from {META_ROWS_FROM}); tune on at most "
                         f"{META_ROWS_FROM - WARMUP_ROWS} edits")
    train = facts.edit_records("train", WARMUP_ROWS + n, seed=FACTS_SEED)
    job = prepare_edits(train[WARMUP_ROWS:], tok, model, edits_per_turn=args.edits_per_turn, n_turns=args.turns,
                        warmup_records=train[:WARMUP_ROWS])
    out = {"split": f"facts seed {FACTS_SEED}, split 'train' rows [{WARMUP_ROWS}, {WARMUP_ROWS + n}) (subjects "
                    f"disjoint from the 'edit' split); warm-up rows [0, {WARMUP_ROWS})",
           "rule": "score = mean(ES, GS, locality); largest wins, ties to the smaller lr",
           "unedited": unedited_row(model, job), "rows": [], "chosen": {}, "centres": {}}
    warm_turns = max(1, args.turns // 10)
    offsets = [int(k) for k in args.offsets.split(",")]
    reuse = reused_rows(args.reuse)
    for name in args.editors.split(","):
        centre, why = (None, "published settings, untuned (cost only)") if args.published else CENTRES[name]
        lrs = grid(centre, offsets, knob(name)[1]) if centre is not None else [None]
        out["centres"][name] = {"lr": centre, "setting": knob(name)[0], "why": why, "grid": lrs}
        rows = [dict(reuse[(name, lr)], reused_from=args.reuse) if (name, lr) in reuse else
                run_one(model, tok, job, name, lr, targets_of(args), warm_turns) for lr in lrs]
        out["rows"] += rows
        best = max(rows, key=lambda r: (r["score"], weakness(name, r["lr"])))
        out["chosen"][name] = {"lr": best["lr"], "score": best["score"],
                               "at_grid_edge": best["lr"] in (rows[0]["lr"], rows[-1]["lr"]) and len(rows) > 1}
        write_json(args.out, {"config": vars(args), **out})
    return out


def run(model, tok, args) -> dict:
    chosen = {k: v for path in args.tuning.split(",") if path for k, v in json.load(open(path))["chosen"].items()}
    lrs = {k: v["lr"] for k, v in chosen.items()}
    for k, v in (p.split("=") for p in args.lr.split(",") if p):
        lrs[k] = None if v == "published" else float(v)
    n = args.turns * args.edits_per_turn
    pool = facts.edit_records("edit", None, seed=FACTS_SEED)
    rng = np.random.default_rng(args.seed)
    records = [pool[i] for i in rng.permutation(len(pool))[:n]]
    ev = np.sort(rng.choice(n, args.eval_n, replace=False)) if 0 < args.eval_n < n else slice(None)
    job = prepare_edits(records, tok, model, edits_per_turn=args.edits_per_turn, n_turns=args.turns,
                        warmup_records=facts.edit_records("train", WARMUP_ROWS, seed=FACTS_SEED), eval_records=ev,
                        targets=targets_of(args))
    out = {"edits": n, "seed": args.seed, "eval_records": int(job.eval_set.size),
           "edit_rows": [r.row for r in records],
           "unedited": unedited_row(model, job), "rows": []}
    for name in args.editors.split(","):
        if name not in lrs:
            raise ValueError(f"no lr for {name!r}: not in {args.tuning or '(no --tuning file)'} nor --lr")
        out["rows"].append(run_one(model, tok, job, name, lrs[name], targets_of(args), max(1, args.turns // 10)))
        write_json(args.out, {"config": vars(args), **out})
    return out


def summary(args) -> dict:
    """Mean ± spread per editor over the run files in ``--dir``, and the frontier figure."""
    tunings = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(args.dir, "tuning*.json")))]
    tuning = {"rows": [r for t in tunings for r in t["rows"]], "config": tunings[0]["config"],
              "unedited": tunings[0]["unedited"], "chosen": {k: v for t in tunings for k, v in t["chosen"].items()}}
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(args.dir, "run_*seed*.json")))]
    table = {}
    for r in runs:
        for row in r["rows"]:
            table.setdefault(row["editor"], []).append(row)
    stats = {name: {"lr": rows[0]["lr"], "seeds": [r["seed"] for r in runs if any(x["editor"] == name for x in
                                                                                 r["rows"])],
                    **{k: {"mean": float(np.mean([x[k] for x in rows])), "std": float(np.std([x[k] for x in rows]))}
                       for k in ("es", "gs", "loc", "score", "seconds_edit", "seconds_eval")}}
             for name, rows in table.items()}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    for row in tuning["rows"]:
        c = colors.setdefault(row["editor"], f"C{len(colors)}")
        axes[0].scatter(row["loc"], row["es"], color=c, s=14)
        axes[0].annotate(f"{row['lr']:.2g}", (row["loc"], row["es"]), fontsize=6)
    for name in colors:
        pts = sorted([r for r in tuning["rows"] if r["editor"] == name], key=lambda r: r["lr"])
        axes[0].plot([r["loc"] for r in pts], [r["es"] for r in pts], color=colors[name], label=name, lw=1)
    for name, s in stats.items():
        c = colors.setdefault(name, f"C{len(colors)}")
        for row in table[name]:
            axes[1].scatter(row["loc"], row["es"], color=c, s=14)
        axes[1].errorbar(s["loc"]["mean"], s["es"]["mean"], xerr=s["loc"]["std"], yerr=s["es"]["std"], color=c,
                         marker="o", label=f"{name} {knob(name)[0]} {s['lr']:.2g} ({len(s['seeds'])} seed(s))")
    u = runs[0]["unedited"] if runs else tuning["unedited"]
    ept = tuning["config"].get("edits_per_turn", EDITS_PER_TURN)
    seeds = sorted({r["seed"] for r in runs})
    for ax, title in zip(axes, (f"tuning: {tuning['config']['turns'] * ept} tune-subject edits, turns of {ept}",
                                f"{runs[0]['edits'] if runs else '?'} edits, chosen settings (seeds {seeds})")):
        ax.scatter([u["loc"]], [u["es"]], marker="x", color="k")
        ax.set_xlabel("locality vs unedited")
        ax.set_ylabel("efficacy (teacher-forced)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    save_figure(fig, axes[1], os.path.join(args.dir, "frontier.png"))
    out = {"editors": stats, "unedited": u, "tuning_chosen": tuning["chosen"]}
    write_json(os.path.join(args.dir, "summary.json"), out)
    for name, s in stats.items():
        print(f"{name:18s} {knob(name)[0]} {s['lr']:.3g}  ES {s['es']['mean']:.3f}±{s['es']['std']:.3f}  "
              f"GS {s['gs']['mean']:.3f}±{s['gs']['std']:.3f}  loc {s['loc']['mean']:.3f}±{s['loc']['std']:.3f}  "
              f"seeds {s['seeds']}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("tune", "run", "summary"))
    ap.add_argument("--editors", default="ultraedit,no_normalization,stableedit")
    ap.add_argument("--edits-per-turn", type=int, default=EDITS_PER_TURN)
    ap.add_argument("--turns", type=int, default=None, help="turns (tune: 400 edits, run: 2,000 edits)")
    ap.add_argument("--offsets", default="-2,-1,0", help="tune: the grid, in half decades from each editor's "
                                                          "centre (-2,-1,0: centre/10, centre/sqrt(10), centre)")
    ap.add_argument("--published", action="store_true", help="tune: one point per editor at its published "
                                                                  "settings (MEMIT/AlphaEdit: a cost measurement)")
    ap.add_argument("--reuse", default="", help="tune: log of an earlier tuning run whose rows are reused")
    ap.add_argument("--tuning", default="", help="run: the tuning JSON file(s), comma-separated, whose chosen "
                                                 "settings are run")
    ap.add_argument("--lr", default="", help="run: editor=lr,... over the tuning file's choice "
                                             "(memit=published: its published settings)")
    ap.add_argument("--seed", type=int, default=0, help="run: edit seed (which edit-split rows, in what order)")
    ap.add_argument("--eval-n", type=int, default=500, help="run: evaluate on this many random edited records "
                                                             "(0: all)")
    ap.add_argument("--targets", default="", help="edited modules (default: SmolLM2's layers 25-28 down_proj)")
    ap.add_argument("--dir", default="experiments/results/smollm2/frontier2000", help="summary: results folder")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.what == "summary":
        return summary(args)
    args.turns = args.turns or (400 if args.what == "tune" else 2000) // args.edits_per_turn
    if not args.out:
        ap.error("--out is required for tune and run")
    model, tok = lx.hf.load("smollm2"), lx.hf.load_tokenizer("smollm2")
    t0 = time.time()
    (tune if args.what == "tune" else run)(model, tok, args)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
