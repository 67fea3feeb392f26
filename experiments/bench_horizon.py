"""Horizon benchmark (not a test): up to 100,000 sequential edits on the default world, in constant memory.

The edit pool of the default world holds 7,200 facts, so the stream passes over it repeatedly, giving every fact
a new counterfactual target on each pass; at each milestone the metrics are measured on the *latest* target of
every fact edited so far (teacher-forced), on their paraphrases, and on 1,000 fixed locality prompts against the
unedited model. Host RSS is sampled after every chunk. The run is checkpointed under ``<out>/ckpt/<editor>``
(diagnostics streamed to disk chunk by chunk); ``--resume`` continues a killed benchmark.

    python experiments/bench_horizon.py                       # 100K edits with stableedit and ultraedit
    python experiments/bench_horizon.py --edits 20000 --editors stableedit --out runs/horizon

Writes ``horizon.json`` (wall time, RSS at 10/50/100% of the turns, metrics at every milestone) and
``horizon.png`` (metrics vs edits; RSS vs turns).
"""

import argparse
import json
import os
import time


import numpy as np  # noqa: E402

from lnjax import editors
from lnjax import eval as ev
from lnjax.world import world_model
from lnjax.app.plots import pyplot  # noqa: E402
from lnjax.app.hparams import WORLD_HPARAMS  # noqa: E402
from lnjax.engine.sequence import Evaluation, edit_sequence  # noqa: E402
from lnjax.eval.prepare import prepare_edits  # noqa: E402
from lnjax.world import default_world  # noqa: E402


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=100_000)
    ap.add_argument("--edits-per-turn", type=int, default=100)
    ap.add_argument("--editors", default="stableedit,ultraedit")
    ap.add_argument("--milestones", default="1000,10000,50000,100000")
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/horizon")
    ap.add_argument("--checkpoint-every", type=int, default=10, help="chunks between checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints under <out>/ckpt")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    world = default_world()
    model = world_model.default_model()
    rows, fact_id = world.edit_stream(args.edits, seed=args.seed)
    # locality on 1,000 fixed prompts (the first records'); efficacy at each milestone on subsets of ``recs``
    job = prepare_edits(rows, world.tokenizer(), model, edits_per_turn=args.edits_per_turn, eval_records=slice(1000))
    recs, batches, loc_set, base_loc = job.records, job.turns, job.eval_set, job.base_loc
    milestones = sorted(int(m) for m in args.milestones.split(",") if int(m) <= args.edits)
    report = {"edits": args.edits, "edits_per_turn": args.edits_per_turn, "pool_facts": len(world.all_facts("edit")),
              "editors": {}}
    for name in args.editors.split(","):
        ed = editors.get(name, **WORLD_HPARAMS[name])
        host = {"points": []}
        rss = []
        t0 = time.time()

        def on_chunk(done, carry, diag):
            rss.append((done, rss_mb()))

        def at_milestones(params, applied_turns):
            edits_done = applied_turns * args.edits_per_turn
            if edits_done not in milestones:
                return None
            latest = {}
            for i in range(edits_done):
                latest[fact_id[i]] = i
            idx = np.asarray(sorted(latest.values()))
            sub = ev.build_eval_set([recs[i] for i in idx])
            m = ev.evaluate(model.apply, params, sub, None, ("teacher_forced",))
            loc = ev.evaluate(model.apply, params, loc_set, base_loc, ("locality_vs_unedited",))
            point = {"edits": edits_done, "facts_evaluated": len(idx), "efficacy": m["teacher_forced"]["efficacy"],
                     "generalization": m["teacher_forced"]["generalization"],
                     "locality_vs_unedited": loc["locality_vs_unedited"], "seconds": time.time() - t0}
            print(json.dumps({"editor": name, **point}), flush=True)
            return point

        res = edit_sequence(model, ed, batches, world_model.DEFAULT_TARGETS, chunk=args.chunk, callback=on_chunk,
                            hooks=[Evaluation(at_milestones, key="points")],
                            checkpoint_dir=os.path.join(args.out, "ckpt", name),
                            checkpoint_every=args.checkpoint_every, resume=args.resume, host_state=host)
        points = host["points"]
        n = len(rss)
        at = {f"{p}%": rss[max(int(n * p / 100) - 1, 0)][1] for p in (10, 50, 100)}
        d = res.diagnostics
        report["editors"][name] = {"wall_seconds": time.time() - t0, "rss_mb": at,
                                   "rss_growth_10_to_100": at["100%"] / at["10%"] - 1, "milestones": points,
                                   "rss_trace": rss, "rejected_turns": int(d["rejected"][-1]),
                                   "delta_norm_first_last": [float(d["delta_norm"][0].mean()),
                                                             float(d["delta_norm"][-1].mean())]}
        print(json.dumps({"editor": name, "rss_mb": at, "wall_seconds": time.time() - t0}), flush=True)
    with open(os.path.join(args.out, "horizon.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(report, os.path.join(args.out, "horizon.png"))


def plot(report: dict, path: str) -> None:
    """Efficacy / generalization / locality against edits so far, and host RSS against turns, per editor."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(report["editors"].items()):
        e = [p["edits"] for p in r["milestones"]]
        for key, style in (("efficacy", "o-"), ("generalization", "x--"), ("locality_vs_unedited", "s:")):
            ax.plot(e, [p[key] for p in r["milestones"]], style, color=f"C{i}", label=f"{name} {key}")
        bx.plot([t for t, _ in r["rss_trace"]], [m for _, m in r["rss_trace"]], color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("edits so far")
    ax.set_ylabel("teacher-forced accuracy / locality")
    ax.legend(fontsize=7)
    bx.set_xlabel("turns done")
    bx.set_ylabel("host RSS (MB)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
