"""Command line: ``lnjax run`` (also ``python -m lnjax run``), the main job; ``lnjax train-editor``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from lnjax.data import DATASETS
from lnjax.editors import REGISTRY
from lnjax.engine import WARMUP_POSITIONS
from lnjax.app.hparams import help_text


def _csv(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lnjax", description="Lifelong model editing with Lifelong Normalization.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="sequential editing runs of several editors, evaluated and written to --out",
                       description="With no arguments: StableEdit, UltraEdit and the no-normalization ablation over "
                                   "2,000 sequential edits (20 turns of 100) on the embedded world, edited in the "
                                   "fact memory of the default testbed (lnjax.world.memory_testbed).")
    r.add_argument("--editor", type=_csv, default=None,
                   help=f"comma-separated editors (default stableedit,ultraedit,no_normalization); "
                        f"known: {','.join(sorted(REGISTRY))}")
    r.add_argument("--turns", type=int, default=20)
    r.add_argument("--edits-per-turn", type=int, default=100)
    r.add_argument("--warmup-turns", type=int, default=None,
                   help="warm-up turns (default: turns//10 for StableEdit editors, 0 for the others)")
    r.add_argument("--warmup-at", choices=WARMUP_POSITIONS, default="start")
    r.add_argument("--lr", type=float, default=None, help=help_text("lr"))
    r.add_argument("--alpha", type=float, default=None, help=help_text("alpha"))
    r.add_argument("--targets", type=_csv, default=None, help="comma-separated HF module paths to edit")
    r.add_argument("--model", default=None, help="HF checkpoint directory, world-model directory (e.g. "
                                                 "lnjax/assets/world_model, edited at its dense down_proj 1-3), .gguf "
                                                 "file or built-in name (smollm2: SmolLM2-135M-Instruct, fetched "
                                                 "once); default: the world model with a fact memory "
                                                 "(lnjax.world.memory_testbed, built once)")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    r.add_argument("--dataset", choices=("world", "facts") + DATASETS, default="world",
                   help="world: the embedded world; facts: real geography facts (lnjax.data.facts); others read --data")
    r.add_argument("--data", default=None, help="edit records file (JSON array) for --dataset")
    r.add_argument("--train-data", default=None, help="training-split file for warm-up turns")
    r.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--eval-every", type=int, default=5, help="turns between evaluations during the run (0: end only)")
    r.add_argument("--max-length", type=int, default=None, help="refuse probes longer than this many tokens")
    r.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed rows instead of failing")
    r.add_argument("--no-generation", action="store_true", help="skip the greedy-generation metric")
    r.add_argument("--checkpoint-dir", default=None, help="checkpoint every chunk into this directory")
    r.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR (its saved config is used; other flags must agree)")
    r.add_argument("--on-nonfinite", choices=("skip", "stop"), default="skip",
                   help="a turn with a non-finite shift is rejected; then go on (skip) or stop the run")
    r.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,model=4 (weights over model, edits over data)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (arguments detected on TPU, Slurm, "
                        "Open MPI; elsewhere give --coordinator/--num-processes/--process-id)")
    r.add_argument("--coordinator", default=None, help="multi-host coordinator address host:port")
    r.add_argument("--num-processes", type=int, default=None)
    r.add_argument("--process-id", type=int, default=None)
    from lnjax.app.train_editor import add_cli
    add_cli(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train-editor":
        from lnjax.core.cpu_threads import limit_lapack_threads_on_cpu
        from lnjax.app.train_editor import cli_main
        limit_lapack_threads_on_cpu(1)  # as lnjax.app.run does: SciPy's spinning LAPACK threads slow every step
        return cli_main(args)
    if args.distributed:
        import jax
        # Must run before any JAX computation; every process then sees the global devices for --mesh.
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    from lnjax.app.report import format_table
    from lnjax.app.run import DEFAULT_EDITORS, RunConfig, run

    cfg = RunConfig(editors=args.editor or DEFAULT_EDITORS, turns=args.turns, edits_per_turn=args.edits_per_turn,
                    warmup_turns=args.warmup_turns, warmup_at=args.warmup_at, lr=args.lr, alpha=args.alpha,
                    targets=args.targets, model=args.model, dtype=args.dtype, dataset=args.dataset, data=args.data,
                    train_data=args.train_data, seed=args.seed, eval_every=args.eval_every,
                    max_length=args.max_length, skip_bad_rows=args.skip_bad_rows,
                    generation=not args.no_generation)
    checkpoint_dir = args.checkpoint_dir
    if args.resume:
        from lnjax.io.checkpoint import CheckpointError, resume_config
        try:
            cfg = RunConfig.from_json(resume_config(args.resume, cfg.to_json(), RunConfig().to_json()))
        except CheckpointError as e:
            print(f"lnjax run: --resume: {e}", file=sys.stderr)
            return 2
        checkpoint_dir = args.resume
    unknown = [e for e in cfg.editors if e not in REGISTRY]
    if unknown:
        print(f"lnjax run: unknown editor(s) {unknown}; known: {sorted(REGISTRY)}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    results = run(cfg, out, progress=not args.quiet, checkpoint_dir=checkpoint_dir, resume=bool(args.resume),
                  on_nonfinite=args.on_nonfinite, mesh=args.mesh)
    print(format_table(results))
    print(f"run directory: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
