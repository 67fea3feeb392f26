"""The horizon question on the fair testbed (issue 23): ≥ 100,000 sequential edits in one run per editor.

The fair testbed (``lnjax.world.memory_testbed.FAIR_SETTINGS``: slot keys from wording 0 only) has 3,600 editable facts
in the evaluation role (``lnjax.world.fair``), so the stream re-edits them: every pass over them gives each fact a new
answer, never its current one (facts whose answers change over time). ES and GS are scored against a fact's
*latest* answer, on a fixed random subset of the editable facts (``--probes``); every locality family of
``lnjax.world.fair`` is scored on fixed kept facts against the unedited model; retention is ES by the age (turns since
the fact's latest write). Every ``--eval-every`` turns the script also measures, on a fixed probe turn, the scale
of the value step each editor takes (raw ``lr‖k‖²‖g‖`` and, for LN editors, the standardized
``lr‖k̂‖²‖ĝ‖`` with the statistics of that moment), so the difference between LN and no-LN is measured, not assumed.
At the end, Fig. 1b at this length: the last ``--fresh-turns`` turns of the stream applied by a fresh editor to the
unedited model, against the same edits at the end of the long run.

    python experiments/horizon_fair.py --out runs/horizon_fair                    # 100K edits, 4 editors
    python experiments/horizon_fair.py --out runs/horizon_fair --resume           # continue a killed run
    python experiments/horizon_fair.py --edits 2000 --eval-every 5 --out runs/hf_smoke --editors ultraedit

Each editor's run is checkpointed under ``<out>/ckpt/<editor>``; finished editors are kept in
``<out>/horizon.json`` (rewritten after every editor and every evaluation), plotted to ``<out>/horizon.png``.
Learning rates: ``lnjax.app.hparams.FAIR_TESTBED_HPARAMS`` (tuned on the tuning subjects, experiments/tune_fair.py).
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

import lnjax
from lnjax import data, editors
from lnjax.world import fair
from lnjax import eval as ev
from lnjax.core.turns import pack, pack_turns, probe_length
from lnjax.app.hparams import FAIR_TESTBED_HPARAMS
from lnjax.world.memory_testbed import DEFAULT_TARGETS, FAIR_SETTINGS, default_testbed
from lnjax.app.plots import pyplot, save_figure
from lnjax.app.report import write_json
from lnjax.eval.step_scale import value_step_scale
from lnjax.engine.sequence import ChunkEnd, Hook, edit_sequence
from lnjax.world import default_world

AGE_BINS = (0, 10, 50, 200, 10 ** 9)   # turns since the fact's latest write: [0, 10), [10, 50), ...


class Probe(Hook):
    """Every ``every`` applied turns: ES/GS of the probe facts' latest edits, retention by age, the locality
    families, and the value-step scale on a fixed turn — appended to ``host_state["points"]``."""

    def __init__(self, ctx, name, settings, every, save):
        self.ctx, self.name, self.settings, self.every, self.save = ctx, name, settings, every, save
        self.t0 = time.time()

    def chunk(self, end: ChunkEnd) -> None:
        applied, before = end.applied_turns, end.applied_before
        # a point whenever the chunk crossed a multiple of ``every`` edit turns (chunks count warm-up turns too,
        # so with StableEdit's warm-up they end 2 edit turns short of the multiples: points at 48, 98, ... turns)
        if applied == 0 or (applied // self.every == before // self.every and applied != self.ctx["turns"]):
            return
        point = measure(self.ctx, end.params(), applied, end.carry.editor_state, self.settings)
        point["seconds"] = time.time() - self.t0
        end.host_state.setdefault("points", []).append(point)
        self.save(end.host_state["points"])
        print(json.dumps({"editor": self.name, **{k: v for k, v in point.items() if k != "retention_by_age"}}),
              flush=True)


def measure(ctx, params, applied, state, settings) -> dict:
    """One point of the curves after ``applied`` turns (``Probe``)."""
    apply = ctx["model"].apply
    n = applied * ctx["ept"]
    latest = ctx["latest_index"](n)
    idx = latest[latest >= 0]
    out = {"turns": applied, "edits": n, "probe_facts": int(len(idx))}
    if len(idx):
        sub = ctx["stream_set"].subset(idx)
        m = ev.evaluate(apply, params, sub, None, ("teacher_forced",), per_example=True)
        out["efficacy"] = m["teacher_forced"]["efficacy"]
        out["generalization"] = m["teacher_forced"]["generalization"]
        age = applied - 1 - ctx["turn_of_edit"][idx]
        es = m["per_example"]["teacher_forced.efficacy"]
        out["retention_by_age"] = {f"{lo}-{hi}": (float(es[(age >= lo) & (age < hi)].mean())
                                                  if np.any((age >= lo) & (age < hi)) else None)
                                   for lo, hi in zip(AGE_BINS[:-1], AGE_BINS[1:])}
    for name, (batch, base) in ctx["families"].items():
        preds = ev.predictions(apply, params, batch)
        out[f"locality.{name}"] = float(ev.agreement(preds, base, np.asarray(batch.labels)).mean())
    out.update(value_scale(ctx, params, state, settings, min(applied, ctx["turns"] - 1)))
    return out


def value_scale(ctx, params, state, settings, turn) -> dict:
    """The value step on turn ``turn`` (``lnjax.eval.step_scale``), keys prefixed ``scale.``."""
    batch = jax.tree_util.tree_map(lambda a: a[turn], ctx["batches"])
    stats = next(iter(state.stats.values())) if state.stats else None
    got = value_step_scale(ctx["model"].apply, params, DEFAULT_TARGETS, batch, settings["lr"], stats,
                           settings["editor"] == "per_turn_normalization")
    return {f"scale.{k}": v for k, v in got.items()}


def build_context(args, world, split, model, tok):
    rows, fact_id = fair.edit_stream(world, split, "eval", args.edits, seed=args.seed)
    t0 = time.time()
    recs = data.tokenize(data.records_from_dicts("zsre", rows, "world:fair_stream"), tok)
    print(f"tokenized {len(recs)} edits in {time.time() - t0:.0f}s", flush=True)
    warm_recs = data.tokenize(data.records_from_dicts(
        "zsre", world.records("train", args.warmup_turns * args.edits_per_turn, seed=args.seed), "world:train"), tok)
    length = max(probe_length(*r.edit) for r in recs + warm_recs)
    batches, order = pack_turns([r.edit for r in recs], args.edits_per_turn, length)
    warm = pack_turns([r.edit for r in warm_recs], args.edits_per_turn, length)[0] if warm_recs else None
    rng = np.random.default_rng(args.seed + 99)
    editable = split.editable["eval"]
    probe_facts = np.sort(rng.choice(editable, min(args.probes, len(editable)), replace=False))
    # the latest edit (stream index) of each probe fact among the first n edits; -1 if none yet
    pos = {int(f): i for i, f in enumerate(probe_facts)}
    hits = [(pos[int(f)], i) for i, f in enumerate(fact_id) if int(f) in pos]
    slot, edit_idx = np.asarray([h[0] for h in hits]), np.asarray([h[1] for h in hits])

    def latest_index(n):
        out = -np.ones(len(probe_facts), np.int64)
        keep = edit_idx < n
        np.maximum.at(out, slot[keep], edit_idx[keep])
        return out

    stream_set = ev.build_eval_set(recs)
    del stream_set.batches["locality"], stream_set.pairs["locality"]
    keys = np.asarray(model.params["model"]["layers"][FAIR_SETTINGS["layers"][0]]["memory"]["key_proj"]["kernel"])
    fams = fair.locality_families(world, split, "eval", editable, keys, args.probes, seed=args.seed)
    fair.check_protocol(split, key_wordings=FAIR_SETTINGS["key_wordings"], families=fams, edited=editable)
    families = {}
    for name, probes in fams.items():
        batch = pack(fair.probe_pairs(world, probes, tok))
        families[name] = (batch, ev.predictions(model.apply, model.params, batch))
    turn_of_edit = np.empty(len(recs), np.int64)
    for t, row in enumerate(order):
        turn_of_edit[row[row >= 0]] = t
    return {"model": model, "ept": args.edits_per_turn, "turns": len(order), "batches": batches, "warm": warm,
            "latest_index": latest_index, "stream_set": stream_set, "families": families, "recs": recs,
            "turn_of_edit": turn_of_edit, "order": order,
            "family_sizes": {k: int(len(v)) for k, v in fams.items()}}


def fresh_comparison(ctx, name, settings, params_long, args) -> dict:
    """Fig. 1b at this length: the stream's last ``fresh_turns`` turns, (a) at the end of the long run, (b)
    applied by a fresh editor (warm-up as in the long run) to the unedited model: ES / GS of those edits."""
    k = args.fresh_turns
    last = ctx["order"][-k:].reshape(-1)
    last = last[last >= 0]
    sub = ctx["stream_set"].subset(last)
    model = ctx["model"]
    long = ev.evaluate(model.apply, params_long, sub, None, ("teacher_forced",))["teacher_forced"]
    tail = jax.tree_util.tree_map(lambda a: a[-k:], ctx["batches"])
    res = edit_sequence(model, make_editor(name, settings), tail, DEFAULT_TARGETS, warmup=ctx["warm"],
                        chunk=k, progress=False)
    fresh = ev.evaluate(model.apply, res.params, sub, None, ("teacher_forced",))["teacher_forced"]
    return {"turns": k, "edits": int(len(last)), "after_long_run": long, "fresh": fresh}


def make_editor(name, settings):
    return editors.get(settings["editor"], lr=settings["lr"], alpha=settings["alpha"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=100_000)
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--editors", default="ultraedit,stableedit,no_normalization_tuned,per_turn_normalization")
    ap.add_argument("--eval-every", type=int, default=50, help="turns between evaluations")
    ap.add_argument("--probes", type=int, default=500, help="probe facts per measure (ES/GS and each family)")
    ap.add_argument("--warmup-turns", type=int, default=2, help="StableEdit's warm-up turns (train pool)")
    ap.add_argument("--fresh-turns", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=2, help="evaluations between checkpoints")
    ap.add_argument("--out", default="runs/horizon_fair")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--collect", action="store_true",
                    help="merge <out>/<editor>/horizon.json (one process per editor, finished or not) into "
                         "<out>/horizon.json with each editor's degradation onset, and plot it; runs nothing")
    args = ap.parse_args(argv)
    if args.collect:
        return collect(args.out)
    os.makedirs(args.out, exist_ok=True)
    world = default_world()
    split = fair.fair_split(world)
    model = default_testbed(settings=FAIR_SETTINGS)
    tok = world.tokenizer()
    ctx = build_context(args, world, split, model, tok)
    path = os.path.join(args.out, "horizon.json")
    report = json.load(open(path)) if args.resume and os.path.exists(path) else {"editors": {}}
    command = "python experiments/horizon_fair.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report.update({"command": command,
                   "edits": args.edits, "edits_per_turn": args.edits_per_turn, "eval_every_turns": args.eval_every,
                   "probes": args.probes, "family_sizes": ctx["family_sizes"], "split": split.describe(),
                   "testbed": FAIR_SETTINGS, "seed": args.seed, "lnjax_version": lnjax.__version__})
    for name in args.editors.split(","):
        if report["editors"].get(name, {}).get("finished"):
            print(f"{name}: finished before; kept", flush=True)
            continue
        settings = dict(FAIR_TESTBED_HPARAMS[name])
        warm = ctx["warm"] if settings["editor"].startswith("stableedit") else None
        host = {"points": []}
        t0 = time.time()

        def save(points, name=name, settings=settings):
            report["editors"][name] = {"settings": settings, "points": points, "finished": False}
            write_json(path, report)

        res = edit_sequence(model, make_editor(name, settings), ctx["batches"], DEFAULT_TARGETS, warmup=warm,
                            chunk=args.eval_every, hooks=[Probe(ctx, name, settings, args.eval_every, save)],
                            checkpoint_dir=os.path.join(args.out, "ckpt", name),
                            checkpoint_every=args.checkpoint_every, resume=args.resume, host_state=host,
                            progress=False)
        entry = {"settings": settings, "warmup_turns": args.warmup_turns if warm is not None else 0,
                 "points": host["points"], "wall_seconds": time.time() - t0,
                 "rejected_turns": int(res.editor_state.rejected)}
        entry["fig1b"] = fresh_comparison(ctx, name, settings, res.params, args)
        entry["finished"] = True
        report["editors"][name] = entry
        write_json(path, report)
        plot(report, os.path.join(args.out, "horizon.png"))
        print(json.dumps({"editor": name, "wall_seconds": entry["wall_seconds"], "fig1b": entry["fig1b"]}),
              flush=True)


def onset(points: list, drop: float = 0.05, floor: float = 0.95) -> dict:
    """Where an editor starts to degrade: the first evaluation (edits so far) at which ES falls more than
    ``drop`` below the best ES seen before it, and the first at which any locality family falls below ``floor``
    (None: not within the run)."""
    es_at = loc_at = None
    best = -1.0
    for p in points:
        if es_at is None and "efficacy" in p and p["efficacy"] < best - drop:
            es_at = p["edits"]
        best = max(best, p.get("efficacy", best))
        if loc_at is None and min(v for k, v in p.items() if k.startswith("locality.")) < floor:
            loc_at = p["edits"]
    return {"es_drop": drop, "es_onset_edits": es_at, "locality_floor": floor, "locality_onset_edits": loc_at}


def collect(out: str) -> None:
    """``--collect``: one report from the per-editor directories under ``out``."""
    merged = None
    for sub in sorted(os.listdir(out)):
        path = os.path.join(out, sub, "horizon.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            part = json.load(f)
        merged = merged or {k: v for k, v in part.items() if k != "editors"} | {"editors": {}}
        merged["editors"].update(part["editors"])
    if merged is None:
        raise SystemExit(f"no <editor>/horizon.json under {out}")
    merged["command"] = (f"python experiments/horizon_fair.py --editors NAME --out {out}/NAME (one process per "
                         f"editor; --resume continues one), then python experiments/horizon_fair.py --collect "
                         f"--out {out}")
    for name, entry in merged["editors"].items():
        entry["edits_done"] = entry["points"][-1]["edits"] if entry["points"] else 0
        entry["degradation"] = onset(entry["points"])
        print(json.dumps({"editor": name, "edits_done": entry["edits_done"], **entry["degradation"]}))
    write_json(os.path.join(out, "horizon.json"), merged)
    plot(merged, os.path.join(out, "horizon.png"))


def plot(report: dict, path: str) -> None:
    """ES, GS, each locality family and the value-step scale against edits, one panel per quantity."""
    plt = pyplot()
    keys = ["efficacy", "generalization"] + [f"locality.{f}" for f in fair.FAMILIES] + ["scale.raw_value"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, key in zip(axes.reshape(-1), keys + ["scale.std_value"]):
        for i, (name, r) in enumerate(report["editors"].items()):
            pts = [p for p in r["points"] if key in p]
            ax.plot([p["edits"] for p in pts], [p[key] for p in pts], "o-", ms=2, color=f"C{i}", label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("edits so far")
        if key.startswith("scale"):
            ax.set_yscale("log")
    save_figure(fig, axes[0, 0], path)


if __name__ == "__main__":
    main()
