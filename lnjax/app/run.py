"""The main job: sequential editing runs of several editors on the same edits, evaluated and written to disk.

``run(RunConfig(...))`` is what ``lnjax run`` calls: it loads the model and the edits, runs ``edit_sequence`` per
editor (with the ``Evaluation`` hook during the run and ``Checkpointing`` under ``checkpoint_dir``) and hands the
results to ``lnjax.app.report``, which writes the run directory. Hyperparameters come from ``lnjax.app.hparams``, the
resume protocol (``done.json``, the saved config) from ``lnjax.io.checkpoint``. Everything outside ``metadata`` is a
deterministic function of the config.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import jax
import numpy as np

from lnjax.io import checkpoint
from lnjax import data as data_lib
from lnjax import editors as editors_lib
from lnjax import eval as eval_lib
from lnjax.app import baselines
from lnjax.io import hf
from lnjax.app import hparams
from lnjax.app import report
from lnjax.world import world_model
from lnjax.core.turns import EditTurn, pack_turns, probe_length
from lnjax.core.cpu_threads import limit_lapack_threads_on_cpu
from lnjax.engine.sequence import Evaluation, edit_sequence
from lnjax.world import default_world

DEFAULT_EDITORS = ("stableedit", "ultraedit", "no_normalization")


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run (the CLI flags of ``lnjax run``)."""

    editors: tuple = DEFAULT_EDITORS
    turns: int = 20
    edits_per_turn: int = 100
    warmup_turns: Optional[int] = None   # None: turns // 10 (at least 1) for StableEdit editors, 0 for others
    warmup_at: str = "start"
    lr: Optional[float] = None
    alpha: Optional[float] = None
    targets: Optional[tuple] = None
    model: Optional[str] = None          # HF checkpoint dir, world-model dir, built-in name (smollm2) or .gguf;
                                         # None = the default testbed (lnjax.world.memory_testbed)
    dtype: str = "float32"
    dataset: str = "world"
    data: Optional[str] = None
    train_data: Optional[str] = None
    seed: int = 0
    chunk: int = 5
    eval_every: int = 5                  # turns between evaluations during the run; 0 = only at the end
    max_length: Optional[int] = None
    minibatch_size: int = 10
    skip_bad_rows: bool = False
    generation: bool = True
    editor_options: Optional[dict] = None  # extra keyword options for the editor factories (e.g. whiten=False)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, saved: dict) -> "RunConfig":
        """The config ``to_json`` wrote (lists back to tuples; unknown keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})


def _load_model(cfg: RunConfig, log: Callable[[str], None] = print):
    if cfg.model is None:  # the default testbed: the shipped world model with a fact memory (built once)
        from lnjax.world.memory_testbed import DEFAULT_TARGETS, default_testbed
        return default_testbed(log), default_world().tokenizer(), tuple(cfg.targets or DEFAULT_TARGETS)
    if world_model.is_model_dir(cfg.model):
        model = world_model.load(cfg.model)
        return model, default_world().tokenizer(), tuple(cfg.targets or world_model.DEFAULT_TARGETS)
    from lnjax.io import builtin_models
    if builtin_models.is_builtin(cfg.model) and not cfg.targets:
        spec = builtin_models.BUILTIN[cfg.model]
        return hf.load(cfg.model, cfg.dtype), hf.load_tokenizer(cfg.model), spec.default_targets
    if not cfg.targets:
        raise ValueError("--targets is required with --model (e.g. from lx.presets.targets(...))")
    return hf.load(cfg.model, cfg.dtype), hf.load_tokenizer(cfg.model), tuple(cfg.targets)


def _load_records(cfg: RunConfig, n: int, n_warm: int, read_report: data_lib.ReadReport):
    if cfg.dataset == "world":
        w = default_world()
        edits = data_lib.records_from_dicts("zsre", w.records("edit", n, seed=cfg.seed), "world:edit")
        warm = data_lib.records_from_dicts("zsre", w.records("train", n_warm, seed=cfg.seed), "world:train") \
            if n_warm else []
        return edits, warm
    if cfg.dataset == "facts":
        from lnjax.data import facts
        return (facts.edit_records("edit", n, seed=cfg.seed),
                facts.edit_records("train", n_warm, seed=cfg.seed) if n_warm else [])
    if cfg.data is None:
        raise ValueError(f"--data PATH is required for --dataset {cfg.dataset}")
    edits = data_lib.read(cfg.dataset, cfg.data, n, seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows, report=read_report)
    warm = []
    if n_warm:
        if cfg.train_data is None:
            raise ValueError("warm-up turns need --train-data (the dataset's training split), or --warmup-turns 0")
        warm = data_lib.read(cfg.dataset, cfg.train_data, n_warm, seed=cfg.seed, skip_bad_rows=cfg.skip_bad_rows,
                             report=read_report)
    return edits, warm


def editor_settings(name: str, cfg: RunConfig) -> dict:
    """What ``run`` uses for editor ``name`` under ``cfg``: ``lnjax.app.hparams.resolve`` of its flags (the
    hypernetwork editors learn their lr per module and take no warm-up unless asked)."""
    return hparams.resolve(name, dataset=cfg.dataset, turns=cfg.turns, lr=cfg.lr, alpha=cfg.alpha,
                           warmup_turns=cfg.warmup_turns, model=cfg.model)


def _editor(name: str, cfg: RunConfig, model=None, targets=None, log: Callable[[str], None] = print):
    if name in hparams.META_TRAINED:   # meta-trained first (or taken from the cache)
        from lnjax.app.train_editor import trained_editor
        return trained_editor(name, model, targets, edits_per_turn=cfg.edits_per_turn, seed=cfg.seed,
                              minibatch_size=cfg.minibatch_size, options=cfg.editor_options, log=log)
    settings = editor_settings(name, cfg)
    kwargs = {"lr": settings["lr"], "alpha": settings["alpha"], **(cfg.editor_options or {})}
    return editors_lib.get(name, **kwargs)



@dataclasses.dataclass
class Job:
    """The edits of a run, shared by its editors: packed edit turns (``batches``, probe ``length``), tokenized
    warm-up records, the evaluation set with the unedited model's locality predictions, each edit's turn,
    each editor's warm-up turns and the reader's report."""

    batches: object
    length: int
    warm_tok: list
    eval_set: eval_lib.EvalSet
    base_loc: np.ndarray
    turn_of_example: np.ndarray
    warm_turns: dict
    read_report: data_lib.ReadReport
    subject_last: Optional[np.ndarray] = None


def prepare_job(cfg: RunConfig, model, tok) -> Job:
    """Read, tokenize and pack the edits of ``cfg`` (and the warm-up records its editors need)."""
    n = cfg.turns * cfg.edits_per_turn
    warm_turns = {name: editor_settings(name, cfg)["warmup_turns"] for name in cfg.editors}
    n_warm = max(warm_turns.values(), default=0) * cfg.edits_per_turn
    read_report = data_lib.ReadReport()
    records, warm_records = _load_records(cfg, n, n_warm, read_report)
    opts = dict(skip_bad_rows=cfg.skip_bad_rows, report=read_report)
    tokenized = data_lib.tokenize(records, tok, cfg.max_length, **opts)
    warm_tok = data_lib.tokenize(warm_records, tok, cfg.max_length, **opts)
    if len(tokenized) < n:
        raise ValueError(f"only {len(tokenized)} of {n} edits are usable ({len(read_report.skipped)} skipped)")
    length = max(probe_length(*r.edit) for r in tokenized + warm_tok)
    batches, order = pack_turns([r.edit for r in tokenized], cfg.edits_per_turn, length)
    subject_last = np.array([tokenized[i].subject_last if i >= 0 else -1 for i in order.reshape(-1)],
                            np.int32).reshape(order.shape)
    eval_set = eval_lib.build_eval_set(tokenized)
    return Job(batches=batches, length=length, warm_tok=warm_tok, eval_set=eval_set, subject_last=subject_last,
               base_loc=eval_lib.base_predictions(model.apply, model.params, eval_set),
               turn_of_example=np.repeat(np.arange(cfg.turns), cfg.edits_per_turn), warm_turns=warm_turns,
               read_report=read_report)


def during_run_metrics(cfg: RunConfig, model, job: Job) -> Callable:
    """The ``Evaluation`` hook's function of ``lnjax run``: teacher-forced metrics, locality vs the unedited model
    and retention per turn, on the edits applied so far."""

    def evaluate(params, applied: int) -> Optional[dict]:
        if applied >= cfg.turns:
            return None  # the last point comes from the final evaluation (``run_editor``), not a second pass
        n = applied * cfg.edits_per_turn
        sub = job.eval_set.subset(np.arange(n))
        m = eval_lib.evaluate(model.apply, params, sub, job.base_loc[:n], ("teacher_forced", "locality_vs_unedited"),
                              per_example=True)
        return curve_point(cfg, job, m, applied)

    return evaluate


def curve_point(cfg: RunConfig, job: Job, metrics: dict, applied: int) -> dict:
    """One point of the during-run curve from ``evaluate(..., per_example=True)`` metrics of the first
    ``applied`` turns' edits: teacher-forced metrics, locality vs unedited and retention per turn."""
    n = applied * cfg.edits_per_turn
    ret = eval_lib.retention_by_turn(metrics["per_example"]["teacher_forced.efficacy"], job.turn_of_example[:n],
                                     cfg.turns)
    return {"edits": n, "turns": applied, "teacher_forced": metrics["teacher_forced"],
            "locality_vs_unedited": metrics["locality_vs_unedited"],
            "retention_by_turn": [None if np.isnan(x) else float(x) for x in ret[:applied]]}


def run_editor(name: str, cfg: RunConfig, model, targets: tuple, job: Job, *, checkpoint_dir: Optional[str] = None,
               resume: bool = False, **options) -> tuple[dict, dict, list]:
    """One editor's run on ``job``: ``(metrics, timings, diagnostics lines)``. ``options`` go to
    ``edit_sequence`` (``progress``, ``on_nonfinite``, ``log``, ``mesh``)."""
    r = job.warm_turns[name]
    warm = pack_turns([t.edit for t in job.warm_tok[:r * cfg.edits_per_turn]], cfg.edits_per_turn,
                      job.length)[0] if r else None
    hooks = [Evaluation(during_run_metrics(cfg, model, job))] if cfg.eval_every > 0 else []
    host = {"curve": []}
    batches, extra = job.batches, {}
    if name in baselines.MODEL_EDITORS:  # FT, MEMIT, AlphaEdit run the model: built with their statistics
        editor, targets, extra = baselines.for_run(name, model, targets, dataset=cfg.dataset,
                                                   explicit_targets=cfg.targets is not None, lr=cfg.lr,
                                                   options=cfg.editor_options)
        batches = EditTurn(edit=job.batches, subject_last=job.subject_last)
        extra = {**extra, "targets": list(targets)}
    else:
        editor = _editor(name, cfg, model, targets, options.get("log", print))
    t0 = time.time()
    res = edit_sequence(model, editor, batches, targets, warmup=warm, warmup_at=cfg.warmup_at,
                        chunk=cfg.eval_every if cfg.eval_every > 0 else cfg.chunk, minibatch_size=cfg.minibatch_size,
                        track_accuracy=True, hooks=hooks, checkpoint_dir=checkpoint_dir, resume=resume,
                        host_state=host, run_config=cfg.to_json(), **options)
    jax.block_until_ready(res.params)
    t_edit = time.time() - t0
    metrics = eval_lib.evaluate(model.apply, res.params, job.eval_set, job.base_loc, _protocols(cfg),
                                per_example=True)
    if cfg.eval_every > 0:  # every chunk ends with an evaluation; the last one is this final evaluation
        host["curve"].append(curve_point(cfg, job, metrics, cfg.turns))
    del metrics["per_example"]
    metrics["during_run"] = host["curve"]
    metrics["rejected_turns"] = int(res.editor_state.rejected)
    metrics.update(extra)
    timings = {"edit_seconds": t_edit, "eval_seconds": time.time() - t0 - t_edit}
    return metrics, timings, report.diagnostics_lines(name, res.diagnostics, targets)


def _protocols(cfg: RunConfig) -> tuple:
    return ("teacher_forced", "locality_vs_unedited") + (("generation_exact_match",) if cfg.generation else ())


def run(cfg: RunConfig, out_dir: Optional[str] = None, log: Callable[[str], None] = print,
        progress: bool = True, checkpoint_dir: Optional[str] = None, resume: bool = False,
        on_nonfinite: str = "skip", mesh: Optional[str] = None) -> dict:
    """Run every editor of ``cfg`` on the same edits; returns the results dict (also written to ``out_dir``).

    With ``checkpoint_dir`` each editor's run is checkpointed after every chunk under ``checkpoint_dir/<editor>``
    and a finished editor leaves ``done.json`` there (``lnjax.io.checkpoint``); ``resume=True`` skips finished
    editors and continues the interrupted one, so the outputs equal an uninterrupted run's except under
    ``metadata``. ``mesh`` (e.g. ``"data=2,model=4"``) runs the edits sharded over devices (``lnjax.engine.sharding``).
    On the CPU it first limits SciPy's OpenBLAS, whose LAPACK the solves call, to one thread
    (``lnjax.core.cpu_threads``: its spinning idle threads otherwise slow every turn's forward pass).
    """
    t_start = time.time()
    limit_lapack_threads_on_cpu(1)
    model, tok, targets = _load_model(cfg, log)
    device_mesh = None
    if mesh:
        from lnjax.engine.sharding import make_mesh
        device_mesh = make_mesh(mesh)
    job = prepare_job(cfg, model, tok)
    if job.read_report.layout:
        log(f"{cfg.data}: read as {cfg.dataset} in the {job.read_report.layout} layout")
    results: dict = {"editors": {}, "metadata": {}}
    results["unedited"] = eval_lib.evaluate(model.apply, model.params, job.eval_set, job.base_loc, _protocols(cfg))
    diag_lines: list[dict] = []
    timings = {}
    if checkpoint_dir:
        checkpoint.save_run_config(checkpoint_dir, cfg.to_json())
    for name in cfg.editors:
        ck_dir = os.path.join(checkpoint_dir, name) if checkpoint_dir else None
        done = checkpoint.finished(ck_dir) if resume else None
        if done is not None:
            results["editors"][name], timings[name] = done["metrics"], done["timings"]
            diag_lines.extend(done["diagnostics"])
            log(f"{name}: finished before the interruption; results taken from {ck_dir}/{checkpoint.DONE_FILE}")
            continue
        metrics, timings[name], lines = run_editor(name, cfg, model, targets, job, checkpoint_dir=ck_dir,
                                                   resume=resume, progress=progress, on_nonfinite=on_nonfinite,
                                                   log=log, mesh=device_mesh)
        results["editors"][name] = metrics
        diag_lines.extend(lines)
        if ck_dir:
            checkpoint.mark_finished(ck_dir, {"metrics": metrics, "timings": timings[name], "diagnostics": lines})
        log(f"{name}: edited {cfg.turns * cfg.edits_per_turn} facts in {timings[name]['edit_seconds']:.1f}s")
    results["metadata"] = report.metadata(
        cfg.to_json(), params=model.params, targets=targets, edit_labels=job.batches.labels,
        warmup_turns=job.warm_turns, skipped=job.read_report.skipped, timings=timings,
        total_seconds=time.time() - t_start, world_facts=default_world().n_facts if cfg.dataset == "world" else None)
    results["metadata"].update(data_packages=_data_packages(cfg), data_layout=job.read_report.layout)
    if out_dir:
        report.write_run_dir(out_dir, cfg.to_json(), results, diag_lines)
    return results


def _data_packages(cfg: RunConfig) -> Optional[dict]:
    """Versions of the packages generated data came from (None for data read from files or the world)."""
    if cfg.dataset != "facts":
        return None
    from lnjax.data import facts
    return facts.versions()
