"""Command line: ``lnjax run`` (also ``python -m lnjax run``), the main job; ``lnjax train-editor``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

from lnjax.editors import REGISTRY


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``RunConfig`` field (``lnjax.app.run``), named, typed and explained by the field's metadata
    and defaulting to the field's default, so a default is written once: ``--field-name VALUE`` (dest: the
    field's name); a bool field that defaults to False is a switch ``--field-name``, one that defaults to True a
    switch ``--no-field-name`` that turns it off. The default is appended to the help text."""
    from lnjax.app.run import RunConfig
    for f in dataclasses.fields(RunConfig):
        if "cli" not in f.metadata:
            continue
        opts = dict(f.metadata["cli"])
        name = f.name.replace("_", "-")
        if isinstance(f.default, bool):
            flag = opts.pop("flag", f"--no-{name}" if f.default else f"--{name}")
            parser.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", **opts)
            continue
        flag = opts.pop("flag", f"--{name}")
        opts.setdefault("type", None if f.default is None else type(f.default))
        if f.default is not None:
            shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            opts["help"] = f"{opts['help']} (default: {shown})".replace("%", "%%")
        parser.add_argument(flag, dest=f.name, default=f.default, **opts)


def config_from_args(args: argparse.Namespace):
    """The ``RunConfig`` of parsed ``lnjax run`` arguments (the fields ``add_config_options`` offered)."""
    from lnjax.app.run import RunConfig
    return RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if "cli" in f.metadata})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lnjax", description="Lifelong model editing with Lifelong Normalization.")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (accepted anywhere)")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="sequential editing runs of several editors, evaluated and written to --out",
                       description="With no arguments: StableEdit and UltraEdit beside the no-normalization ablation "
                                   "at UltraEdit's lr, the un-normalized solve at its own tuned lr and per-turn "
                                   "normalization, 1,000 sequential edits (10 turns of 100) for each of 3 edit "
                                   "seeds, on the fair protocol of the default testbed (lnjax.world.fair, "
                                   "lnjax.world.memory_testbed).")
    add_config_options(r)  # every RunConfig field, its default and help from the field
    r.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    r.add_argument("--skip-bad-rows", action="store_true", help=argparse.SUPPRESS)  # deprecated: now the default
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
    r.add_argument("--heartbeat-timeout", type=int, default=60, metavar="SECONDS",
                   help="multi-host: a process silent this long is taken as dead and the others stop with an error")
    from lnjax.app.train_editor import add_cli
    add_cli(sub)
    from lnjax.app.edit import add_cli as add_edit_cli
    add_edit_cli(sub)
    return ap


# What a user's input can cause, reported as one line (``lnjax: error: ...``, exit 1) without a traceback unless
# --debug: bad files, rows and fields (DataError), checkpoints and weights (CheckpointError), flags and configs
# (ValueError, which both derive from), unreadable paths (OSError) and a run stopped on a non-finite shift.
# Anything else is a bug of lnjax and keeps its traceback.
def _user_errors() -> tuple:
    from lnjax.engine.sequence import NonFiniteShift
    return (ValueError, OSError, NonFiniteShift)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lnjax SUBCOMMAND ...``; every subcommand's errors go through here (``--debug``, anywhere on the line,
    or ``LNJAX_DEBUG=1``: raise them with their traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LNJAX_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv)
    except Exception as e:
        distributed = "--distributed" in argv
        if debug or not (isinstance(e, _user_errors()) or distributed):
            raise
        where = ""
        if distributed:  # a collective failing is often another process dying: say which process this is
            import jax
            where = f"process {jax.process_index()} of {jax.process_count()}: "
        text = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, _user_errors()):
            text = f"{type(e).__name__}: {text}"
        print(f"lnjax: error: {where}{text}", file=sys.stderr)
        if distributed:
            # Leave at once: the normal exit would wait at JAX's shutdown barrier for a partner that may be dead,
            # and the runtime would then abort with its own stack trace after this line.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "edit":
        from lnjax.app.edit import cli_main as edit_main
        return edit_main(args)
    if args.command == "train-editor":
        from lnjax.core.cpu_threads import limit_lapack_threads_on_cpu
        from lnjax.app.train_editor import cli_main
        limit_lapack_threads_on_cpu(1)  # as lnjax.app.run does: SciPy's spinning LAPACK threads slow every step
        return cli_main(args)
    if args.distributed:
        import jax
        # Must run before any JAX computation; every process then sees the global devices for --mesh.
        # A dead process stops the others after --heartbeat-timeout (JAX's default, 100 s, then 300 s more at
        # the shutdown barrier, would leave them waiting for minutes).
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout,
                                   shutdown_timeout_seconds=args.heartbeat_timeout)
    from lnjax.io.builtin_models import enable_compilation_cache
    enable_compilation_cache()  # compiled programs persist across runs (LNJAX_COMPILATION_CACHE=0 turns it off)
    from lnjax.app.report import format_table
    from lnjax.app.run import RunConfig, run

    cfg = config_from_args(args)
    if args.skip_bad_rows:
        print("lnjax run: --skip-bad-rows is deprecated and has no effect: unusable rows are skipped (and listed) "
              "by default; --strict refuses them", file=sys.stderr)
    checkpoint_dir = args.checkpoint_dir
    if args.resume:
        from lnjax.io.checkpoint import CheckpointError, resume_config
        try:
            cfg = RunConfig.from_json(resume_config(args.resume, cfg.to_json(), RunConfig().to_json()))
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}") from None
        checkpoint_dir = args.resume
    from lnjax.app.hparams import RUN_ALIASES  # run names for a registry editor at other settings
    unknown = [e for e in cfg.editors or () if e not in REGISTRY and e not in RUN_ALIASES]
    if unknown:
        raise ValueError(f"--editor: unknown editor(s) {unknown}; known: {sorted({*REGISTRY, *RUN_ALIASES})}")
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    results = run(cfg, out, progress=not args.quiet, checkpoint_dir=checkpoint_dir, resume=bool(args.resume),
                  on_nonfinite=args.on_nonfinite, mesh=args.mesh)
    print(format_table(results))
    print(f"run directory: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
