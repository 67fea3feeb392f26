"""The StableEdit paper's studies on the embedded world, one command each (issue: "The studies").

    python experiments/studies.py ln_onoff   [--quick] [--out runs/studies]   # Fig. 1a: LN on/off
    python experiments/studies.py ln_onoff --editors hypernets   # Fig. 1a for RLEdit, MALMEN and MEND
    python experiments/studies.py cumulative [--quick]                        # Fig. 1b: early edits help later ones
    python experiments/studies.py cumulative --editors rledit,malmen,mend     # Fig. 1b for the hypernetworks
    python experiments/studies.py meta_curves [--quick]                       # hypernetworks' meta-training curves
    python experiments/studies.py theory     [--quick]                        # ‖ΔW_t‖ and cos(ΔW_t, ΔW_{t-1})
    python experiments/studies.py ablations  [--quick]                        # warm-up, whitening, α, lr, pooling

Each writes ``<out>/<study>/`` with ``config.json``, ``results.json`` (every number), PNG figures and
``summary.md``. ``--quick`` shrinks every study to seconds (the test suite runs it so the scripts do not rot).
Seeded: rerunning a study gives the same numbers.
"""

import argparse
import json
import os
import time


import numpy as np  # noqa: E402

from lnjax import editors
from lnjax import eval as ev
from lnjax.world import world_model
from lnjax.app.plots import plot_update_curves, pyplot, update_curves  # noqa: E402
from lnjax.app.hparams import META_TRAINED, WORLD_HPARAMS  # noqa: E402
from lnjax.app.report import format_table, write_config_and_results  # noqa: E402
from lnjax.app.run import RunConfig, editor_settings, run  # noqa: E402
from lnjax.engine.sequence import edit_sequence  # noqa: E402
from lnjax.eval.prepare import prepare_edits  # noqa: E402
from lnjax.world import default_world  # noqa: E402

# The studies of REPORT.md §1-5 edit the shipped world model's dense down_proj 1-3 (lnjax run's default before
# the fact-memory testbed), with the hyperparameters tuned there (WORLD_HPARAMS).
DENSE = world_model.ASSET_DIR


def _write(out, name, config, results, summary, figures=()):
    d = os.path.join(out, name)
    write_config_and_results(d, config, results)
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write(summary)
    for fname, fig in figures:
        fig.savefig(os.path.join(d, fname), dpi=110)
    print(summary)
    return d


def _sizes(quick):
    return (2, 20) if quick else (20, 100)


LN_ONOFF_EDITORS = ("stableedit", "ultraedit", "no_normalization", "per_turn_normalization")
# Fig. 1a's other two systems and MEND, each beside its LN-off twin (meta-trained first when not cached).
HYPERNET_PAIRS = ("rledit", "rledit_no_normalization", "malmen", "malmen_no_normalization", "mend",
                  "mend_no_normalization")


def study_ln_onoff(out, quick, editors=None):
    """Fig. 1a: UltraEdit and StableEdit with lifelong normalization vs no and per-turn normalization (or the
    given ``editors``, e.g. ``HYPERNET_PAIRS``)."""
    turns, per = _sizes(quick)
    names = tuple(editors or LN_ONOFF_EDITORS)
    cfg = RunConfig(editors=names, turns=turns, edits_per_turn=per, eval_every=0 if quick else 5,
                    generation=not quick, model=DENSE)
    res = run(cfg, os.path.join(out, "ln_onoff", "run"), progress=not quick)
    table = format_table(res)
    paper = ("Paper (Llama-3-8B, ZsRE 20K, teacher-forced ES/GS/LS): UltraEdit with LN 90.1/87.4/49.5, without LN "
             "36.8/35.8/38.9; RLEdit 91.1/89.6/41.4 vs 54.8/52.3/46.9; MALMEN 66.8/59.2/15.8 vs 8.8/8.5/17.7.")
    summary = f"# LN on/off ({turns * per} edits, {turns} turns)\n\n```\n{table}\n```\n\n{paper}\n"
    return _write(out, "ln_onoff", cfg.to_json(), res, summary)


def _study_editor(name, model):
    """Registry editor ``name`` with its world settings; the hypernetwork editors meta-trained (or read from
    the ``hypernets/`` cache under the lnjax cache root) as ``lnjax run`` does."""
    if name in META_TRAINED:
        from lnjax.app.train_editor import trained_editor
        return trained_editor(name, model, world_model.DEFAULT_TARGETS, log=lambda m: None)
    return editors.get(name, **WORLD_HPARAMS[name])


def study_cumulative(out, quick, editors_=("stableedit", "ultraedit")):
    """Fig. 1b: the same late edits applied after a stream of early edits vs to the unedited model, for each of
    ``editors_`` (closed-form or hypernetwork editors)."""
    turns, per = _sizes(quick)
    late_turns = max(1, turns // 4)
    world = default_world()
    model = world_model.default_model()
    job = prepare_edits(world.records("edit", turns * per, seed=7), world.tokenizer(), model, edits_per_turn=per,
                        eval_records=slice((turns - late_turns) * per, None))
    # the late turns alone: the same packed arrays as the stream's last turns (each turn is ordered on its own)
    full, only_late, es, base = job.turns, job.turn_slice(turns - late_turns), job.eval_set, job.base_loc
    results = {"turns": turns, "late_turns": late_turns, "editors": {}}
    for name in editors_:
        ed = _study_editor(name, model)
        a = edit_sequence(model, ed, full, world_model.DEFAULT_TARGETS, chunk=5, progress=False, track_accuracy=True)
        b = edit_sequence(model, ed, only_late, world_model.DEFAULT_TARGETS, chunk=5, progress=False)
        ma = ev.evaluate(model.apply, a.params, es, base, ("teacher_forced", "locality_vs_unedited"))
        mb = ev.evaluate(model.apply, b.params, es, base, ("teacher_forced", "locality_vs_unedited"))
        results["editors"][name] = {"late_after_early": ma, "late_alone": mb,
                                    "turn_accuracy_right_after": a.diagnostics["accuracy"].tolist()}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in results["editors"].items():
        ax.plot(r["turn_accuracy_right_after"], label=name)
    ax.set_xlabel("turn")
    ax.set_ylabel("edit accuracy right after the turn")
    ax.legend()
    lines = [f"# Positive cumulative effect ({late_turns} late turns after {turns - late_turns} early turns)", "",
             "| editor | late edits after early stream ES/GS | late edits alone ES/GS |", "|---|---|---|"]
    for name, r in results["editors"].items():
        x, y = r["late_after_early"]["teacher_forced"], r["late_alone"]["teacher_forced"]
        lines.append(f"| {name} | {x['efficacy']:.3f} / {x['generalization']:.3f} | "
                     f"{y['efficacy']:.3f} / {y['generalization']:.3f} |")
    lines += ["", "Paper (Fig. 1b, ES/GS with early edits vs without): UltraEdit 91.8/88.9 vs 87.7/83.9; "
              "RLEdit ES 92.9 vs 88.8, MALMEN ES 79.8 vs 71.5 (StableEdit paper)."]
    return _write(out, "cumulative", {"turns": turns, "edits_per_turn": per, "late_turns": late_turns}, results,
                  "\n".join(lines) + "\n", [("turn_accuracy.png", fig)])


def _run_variant(out, study, label, cfg):
    """Run one configuration into ``<out>/<study>/<label>``; returns (results, diagnostics lines)."""
    d = os.path.join(out, study, label)
    res = run(cfg, d, log=lambda m: None, progress=False)
    with open(os.path.join(d, "diagnostics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    return res, lines


def study_theory(out, quick):
    """‖ΔW_t‖_F and cos(ΔW_t, ΔW_{t-1}) per turn with/without LN and with/without the ridge term."""
    turns, per = _sizes(quick)
    variants = {"stableedit": ("stableedit", None), "ultraedit": ("ultraedit", None),
                "ultraedit_alpha0": ("ultraedit", 0.0), "no_normalization": ("no_normalization", None),
                "no_normalization_alpha0": ("no_normalization", 0.0)}
    if quick:
        variants = {k: variants[k] for k in ("ultraedit", "no_normalization_alpha0")}
    results, curves = {}, {}
    for label, (name, alpha) in variants.items():
        cfg = RunConfig(editors=(name,), turns=turns, edits_per_turn=per, alpha=alpha, eval_every=0,
                        generation=False, warmup_turns=0, model=DENSE)
        res, lines = _run_variant(out, "theory", label, cfg)
        norms, cos = curves[label] = update_curves(lines)
        half = len(cos) // 2
        results[label] = {"metrics": res["editors"][name]["teacher_forced"], "delta_norm": norms, "cosine": cos,
                          "mean_abs_cosine_second_half": float(np.mean(np.abs(cos[half:]))) if cos[half:] else None,
                          "norm_last_over_first": norms[-1] / norms[0] if norms and norms[0] > 0 else None}
    fig = plot_update_curves(curves)
    lines = [f"# Theory check ({turns} turns of {per} edits)", "",
             "| variant | mean abs cosine, 2nd half | ‖ΔW‖ last/first | ES |", "|---|---|---|---|"]
    for label, r in results.items():
        c, n_ratio = r["mean_abs_cosine_second_half"], r["norm_last_over_first"]
        lines.append(f"| {label} | {c if c is None else f'{c:.3f}'} | "
                     f"{n_ratio if n_ratio is None else f'{n_ratio:.2f}'} | {r['metrics']['efficacy']:.3f} |")
    lines += ["", "The paper proves that LN + ridge makes consecutive updates asymptotically orthogonal (cosine → 0)"
              " with bounded norms."]
    return _write(out, "theory", {"turns": turns, "edits_per_turn": per,
                                  "variants": {k: list(v) for k, v in variants.items()}},
                  results, "\n".join(lines) + "\n", [("updates.png", fig)])


def study_ablations(out, quick):
    """StableEdit ablations: warm-up position and length, whitening, α, lr, pooling, Algorithm-1 variant."""
    turns, per = _sizes(quick)
    base_lr = WORLD_HPARAMS["stableedit"]["lr"]
    grid = {
        "warmup_at": [("start", {}), ("q1", {}), ("middle", {}), ("q3", {}), ("end", {}), ("none", {})],
        "warmup_turns": [(str(r), {"warmup_turns": r}) for r in (0, 1, 2, 4)],
        "whitening": [("full", {}), ("diagonal", {"editor_options": {"whiten": False}})],
        "alpha": [(str(a), {"alpha": a}) for a in (0.1, 1.0, 10.0, 100.0)],
        "lr": [(f"{m:g}x", {"lr": base_lr * m}) for m in (0.25, 0.5, 1.0, 2.0, 4.0)],
        "pooling": [("shape", {}), ("target", {"editor_options": {"pooling": "target"}})],
        "variant": [("released_code", {}), ("algorithm1", {"editor": "stableedit_algorithm1"})],
    }
    if quick:
        grid = {"whitening": grid["whitening"], "warmup_at": grid["warmup_at"][:1]}
    results, done = {}, {}
    for axis, values in grid.items():
        results[axis] = {}
        for label, opts in values:
            opts = dict(opts)
            name = opts.pop("editor", "stableedit")
            warmup_at = label if axis == "warmup_at" else "start"
            cfg = RunConfig(editors=(name,), turns=turns, edits_per_turn=per, warmup_at=warmup_at, eval_every=0,
                            generation=False, model=DENSE, **opts)
            # Several axes include the default setting: that configuration runs once.
            key = json.dumps({**cfg.to_json(), **editor_settings(name, cfg)}, sort_keys=True)
            if key not in done:
                res, _ = _run_variant(out, "ablations", f"{axis}-{label}", cfg)
                m = res["editors"][name]
                done[key] = {**m["teacher_forced"], "locality_vs_unedited": m["locality_vs_unedited"]}
            results[axis][label] = done[key]
    lines = [f"# StableEdit ablations ({turns} turns of {per} edits; teacher-forced ES/GS/LS, locality vs unedited)",
             ""]
    for axis, rows in results.items():
        lines += [f"## {axis}", "", "| setting | ES | GS | LS | loc~base |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['efficacy']:.3f} | {v['generalization']:.3f} | {v['specificity']:.3f} | "
                  f"{v['locality_vs_unedited']:.3f} |" for k, v in rows.items()]
        lines.append("")
    return _write(out, "ablations", {"turns": turns, "edits_per_turn": per,
                                     "grid": {k: [lbl for lbl, _ in v] for k, v in grid.items()}},
                  results, "\n".join(lines))


def study_meta_curves(out, quick, editors_=HYPERNET_PAIRS, cache=None):
    """The hypernetwork editors' meta-training curves (per-turn generalization and locality losses), read from
    the training diagnostics of the nets ``lnjax run`` uses (meta-trained into ``cache`` first when absent).
    ``--quick`` meta-trains MALMEN on 200 records into ``<out>/meta_curves/nets`` instead."""
    from lnjax.io.checkpoint import DiagnosticsLog
    from lnjax.app.train_editor import trained_editor, training_plan

    names, n_train = (("malmen",), 200) if quick else (tuple(editors_), None)
    cache = os.path.join(out, "meta_curves", "nets") if quick else cache
    model = world_model.default_model()
    curves = {}
    for name in names:
        trained_editor(name, model, world_model.DEFAULT_TARGETS, cache_dir=cache, n_train=n_train,
                       progress=not quick, log=lambda m: None)
        plan = training_plan(name, model, world_model.DEFAULT_TARGETS, cache_dir=cache, n_train=n_train)
        log_ = DiagnosticsLog(os.path.join(plan.directory, "train", "diagnostics"))
        diag = log_.read(log_.spans()[-1][1])
        curves[name] = {k: np.asarray(diag[k]).tolist() for k in ("gen_loss", "loc_loss")}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, c in curves.items():
        for ax, key in zip(axes, ("gen_loss", "loc_loss")):
            ax.plot(c[key], label=name, ls="--" if name.endswith("_no_normalization") else "-")
    for ax, key in zip(axes, ("generalization loss", "locality loss")):
        ax.set_xlabel("meta-training turn")
        ax.set_title(key)
    axes[0].legend(fontsize=7)
    lines = ["# Meta-training curves of the hypernetwork editors", "",
             "| editor | turns | gen loss first → last | loc loss first → last |", "|---|---|---|---|"]
    for name, c in curves.items():
        lines.append(f"| {name} | {len(c['gen_loss'])} | {c['gen_loss'][0]:.3g} → {c['gen_loss'][-1]:.3g} | "
                     f"{c['loc_loss'][0]:.3g} → {c['loc_loss'][-1]:.3g} |")
    return _write(out, "meta_curves", {"editors": list(names), "n_train": n_train}, curves,
                  "\n".join(lines) + "\n", [("meta_curves.png", fig)])


STUDIES = {"ln_onoff": study_ln_onoff, "cumulative": study_cumulative, "theory": study_theory,
           "ablations": study_ablations, "meta_curves": study_meta_curves}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/studies")
    ap.add_argument("--editors", default=None,
                    help="ln_onoff / cumulative: comma-separated editors, or 'hypernets' for " +
                    ",".join(HYPERNET_PAIRS))
    args = ap.parse_args(argv)
    t = time.time()
    if args.editors:
        if args.study not in ("ln_onoff", "cumulative", "meta_curves"):
            ap.error("--editors applies to the ln_onoff, cumulative and meta_curves studies only")
        names = HYPERNET_PAIRS if args.editors == "hypernets" else tuple(args.editors.split(","))
        STUDIES[args.study](args.out, args.quick, names)
    else:
        STUDIES[args.study](args.out, args.quick)
    print(f"{args.study}: {time.time() - t:.0f}s")


if __name__ == "__main__":
    main()
