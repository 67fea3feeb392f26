"""The main job: sequential editing runs of several editors on the same edits, evaluated and written to disk.

``run(RunConfig(...))`` is what ``lnjax run`` calls: it loads the model and the edits, runs ``edit_sequence`` per
editor (with the ``Evaluation`` hook during the run and ``Checkpointing`` under ``checkpoint_dir``) and hands the
results to ``lnjax.app.report``, which writes the run directory. Hyperparameters come from ``lnjax.app.hparams``, the
resume protocol (``done.json``, the saved config) from ``lnjax.io.checkpoint``. Everything outside ``metadata`` is a
deterministic function of the config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Optional, Sequence

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
from lnjax.core.cpu_threads import limit_lapack_threads_on_cpu
from lnjax.core.turns import REFERENCE_MINIBATCH_SIZE
from lnjax.core.placement import to_host
from lnjax.engine import WARMUP_POSITIONS
from lnjax.engine.sequence import Evaluation, Hook, edit_sequence
from lnjax.eval.prepare import PreparedEdits, prepare_edits
from lnjax.world import default_world

DEFAULT_EDITORS = ("stableedit", "ultraedit", "no_normalization")
# On the default (fair) testbed: also the un-normalized solve at its own tuned lr and per-turn normalization
# (lnjax.app.hparams.FAIR_TESTBED_HPARAMS), so the table shows what LN adds over a fairly tuned twin.
FAIR_DEFAULT_EDITORS = DEFAULT_EDITORS + ("no_normalization_tuned", "per_turn_normalization")


def csv_tuple(text: str) -> tuple:
    """``"a, b,"`` -> ("a", "b"): a comma-separated command-line value."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _flag(help: str, **argparse_options) -> dict:
    """Field metadata saying how ``lnjax run`` offers a ``RunConfig`` field (``lnjax.app.cli`` builds the option
    from it, default from the field): ``help``, and ``flag`` (default ``--field-name``; ``--no-x`` for a field
    that defaults to True), ``type``, ``choices`` or ``metavar`` for argparse."""
    return {"cli": {"help": help, **argparse_options}}


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run: the options of ``lnjax run``, each declared once here (its default, and in
    the field's metadata its help text; ``lnjax.app.cli`` derives the parser from these fields)."""

    editors: Optional[tuple] = dataclasses.field(default=None, metadata=_flag(
        f"comma-separated editors (default: {','.join(FAIR_DEFAULT_EDITORS)} on the default testbed, else "
        f"{','.join(DEFAULT_EDITORS)}); known: {','.join(sorted({*editors_lib.REGISTRY, *hparams.RUN_ALIASES}))}",
        flag="--editor", type=csv_tuple))
    turns: Optional[int] = dataclasses.field(default=None, metadata=_flag(
        "sequential edit turns (default: 10 per seed on the default testbed, else 20)", type=int))
    edits_per_turn: int = dataclasses.field(default=100, metadata=_flag("edits per turn"))
    warmup_turns: Optional[int] = dataclasses.field(default=None, metadata=_flag(
        "warm-up turns (default: turns//10, at least 1, for StableEdit editors, 0 for the others)", type=int))
    warmup_at: str = dataclasses.field(default="start", metadata=_flag(
        "where the warm-up turns go in the sequence", choices=WARMUP_POSITIONS))
    lr: Optional[float] = dataclasses.field(default=None, metadata=_flag(hparams.help_text("lr"), type=float))
    alpha: Optional[float] = dataclasses.field(default=None, metadata=_flag(hparams.help_text("alpha"), type=float))
    targets: Optional[tuple] = dataclasses.field(default=None, metadata=_flag(
        "comma-separated HF module paths to edit", type=csv_tuple))
    model: Optional[str] = dataclasses.field(default=None, metadata=_flag(
        "HF checkpoint directory, world-model directory (e.g. lnjax/assets/world_model, edited at its dense "
        "down_proj 1-3), .gguf file or built-in name (smollm2: SmolLM2-135M-Instruct, fetched once); default: the "
        "world model with a fact memory (lnjax.world.memory_testbed, built once)"))
    dtype: str = dataclasses.field(default="float32", metadata=_flag(
        "parameter dtype of a loaded model", choices=("float32", "bfloat16")))
    dataset: str = dataclasses.field(default="world", metadata=_flag(
        "world: the embedded world; facts: real geography facts (lnjax.data.facts); others read --data",
        choices=("world", "facts") + data_lib.DATASETS))
    data: Optional[str] = dataclasses.field(default=None, metadata=_flag("edit records file (JSON array) for --dataset"))
    train_data: Optional[str] = dataclasses.field(default=None, metadata=_flag(
        "training-split file for warm-up turns and the meta-trained editors' training records"))
    seed: int = dataclasses.field(default=0, metadata=_flag(
        "random seed: which records are drawn (and the hypernetworks' meta-training)"))
    seeds: Optional[int] = dataclasses.field(default=None, metadata=_flag(
        "how many edit seeds (--seed, --seed+1, ...) to run and report as mean ± spread (default: 3 on the default "
        "fair testbed, else 1)", type=int))
    chunk: int = dataclasses.field(default=5, metadata=_flag(
        "turns per compiled chunk when --eval-every is 0 (otherwise --eval-every turns)"))
    eval_every: int = dataclasses.field(default=5, metadata=_flag(
        "turns between evaluations during the run (0: end only)"))
    max_length: Optional[int] = dataclasses.field(default=None, metadata=_flag(
        "refuse probes longer than this many tokens (default: the model's context length)", type=int))
    minibatch_size: int = dataclasses.field(default=REFERENCE_MINIBATCH_SIZE, metadata=_flag(
        "edits per mini-batch of the editing loss (the reference implementations' 10)"))
    strict: bool = dataclasses.field(default=False, metadata=_flag(
        "a data row that cannot be an edit (empty or missing text, a duplicate) is an error; by default it is "
        "skipped, logged and listed in results.json (data.skipped)"))
    generation: bool = dataclasses.field(default=True, metadata=_flag("skip the greedy-generation metric"))
    reuse_streams: bool = dataclasses.field(default=True, metadata=_flag(
        "run every turn's probe and every evaluation through all blocks, instead of from the unedited model's "
        "residual stream entering the lowest edited block, computed once per run (lnjax.eval.FrozenPrefix; "
        "sequential editing never changes the blocks below)"))
    editor_options: Optional[dict] = dataclasses.field(default=None, metadata=_flag(
        'extra keyword options for the editor factories, as JSON (e.g. \'{"whiten": false}\')', type=json.loads,
        metavar="JSON"))

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, saved: dict) -> "RunConfig":
        """The config ``to_json`` wrote (lists back to tuples; unknown keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})


def _load_model(cfg: RunConfig, log: Callable[[str], None] = print):
    if cfg.model is None:  # the default, fair testbed: the shipped world model with a fact memory (built once)
        from lnjax.world.memory_testbed import DEFAULT_TARGETS, FAIR_SETTINGS, default_testbed
        return (default_testbed(log, settings=FAIR_SETTINGS), default_world().tokenizer(),
                tuple(cfg.targets or DEFAULT_TARGETS))
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


def check_targets(model, targets) -> None:
    """ValueError naming a target that is not a module of ``model`` with a 2-D ``kernel``, before anything runs."""
    from lnjax.core.tree import get_module
    for t in targets:
        try:
            module = get_module(model.params, t)
        except KeyError as e:
            raise ValueError(f"--targets: {t!r} is not a module of the model ({e.args[0]})") from None
        kernel = module.get("kernel") if isinstance(module, dict) else None
        if kernel is None or np.ndim(kernel) != 2:
            what = sorted(module) if isinstance(module, dict) else type(module).__name__
            raise ValueError(f"--targets: {t!r} has no 2-D kernel to edit (it holds {what})")


def _load_records(cfg: RunConfig, n: int, n_warm: int, read_report: data_lib.ReadReport,
                  log: Optional[Callable[[str], None]] = None):
    if cfg.dataset == "world":
        w = default_world()
        rows = _fair_edits(cfg, n)[0] if fair_protocol(cfg) else w.records("edit", n, seed=cfg.seed)
        edits = data_lib.records_from_dicts("zsre", rows, "world:edit")
        warm = data_lib.records_from_dicts("zsre", w.records("train", n_warm, seed=cfg.seed), "world:train") \
            if n_warm else []
        return edits, warm
    if cfg.dataset == "facts":
        from lnjax.data import facts
        return (facts.edit_records("edit", n, seed=cfg.seed),
                facts.edit_records("train", n_warm, seed=cfg.seed) if n_warm else [])
    if cfg.data is None:
        raise ValueError(f"--data PATH is required for --dataset {cfg.dataset}")
    edits = data_lib.read(cfg.dataset, cfg.data, n, seed=cfg.seed, strict=cfg.strict, report=read_report, log=log)
    warm = []
    if n_warm:
        if cfg.train_data is None:
            raise ValueError("warm-up turns need --train-data (the dataset's training split), or --warmup-turns 0")
        warm = data_lib.read(cfg.dataset, cfg.train_data, n_warm, seed=cfg.seed, strict=cfg.strict,
                             report=read_report, log=log)
    return edits, warm


def with_defaults(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the defaults that depend on the protocol filled in: on the default (fair) testbed the editors
    of ``FAIR_DEFAULT_EDITORS`` and 10 turns per seed (3 seeds fit the default run's few minutes), else
    ``DEFAULT_EDITORS`` and 20 turns."""
    fair = fair_protocol(cfg)
    return dataclasses.replace(cfg, editors=cfg.editors or (FAIR_DEFAULT_EDITORS if fair else DEFAULT_EDITORS),
                               turns=cfg.turns or (10 if fair else 20))


def fair_protocol(cfg: RunConfig) -> bool:
    """Whether ``cfg`` runs under the fair protocol (``lnjax.world.fair``): the default testbed on the world."""
    return cfg.model is None and cfg.dataset == "world"


def _fair_max_answer() -> int:
    """The most answer tokens of any fact of the world (its answers are 1-3 words, one token each)."""
    w = default_world()
    return max(len(a.split()) for r in w.relations for a in r.answers)


def _fair_edits(cfg: RunConfig, n: int) -> tuple:
    """The fair protocol's edits of ``cfg.seed``: ``(records, fact ids)`` of the evaluation role."""
    from lnjax.world import fair
    w = default_world()
    return fair.edit_records(w, fair.fair_split(w), "eval", n, seed=cfg.seed)


def fair_families(cfg: RunConfig, model, n: int, family_size: int = 500) -> dict:
    """The locality families of ``cfg.seed``'s edits (``lnjax.world.fair``), with the unedited predictions;
    ``fair.check_protocol`` holds them to the protocol."""
    from lnjax.world import fair
    from lnjax.world.memory_testbed import FAIR_SETTINGS
    w = default_world()
    split = fair.fair_split(w)
    facts = _fair_edits(cfg, n)[1]
    fams = fair.locality_families(w, split, "eval", facts, fair.slot_keys_of(model, FAIR_SETTINGS["layers"][0]),
                                  family_size, cfg.seed)
    fair.check_protocol(split, key_wordings=FAIR_SETTINGS["key_wordings"], families=fams, edited=facts)
    return fair.family_predictions(model, w, fams)


def editor_settings(name: str, cfg: RunConfig) -> dict:
    """What ``run`` uses for editor ``name`` under ``cfg``: ``lnjax.app.hparams.resolve`` of its flags (the
    hypernetwork editors learn their lr per module and take no warm-up unless asked)."""
    return hparams.resolve(name, dataset=cfg.dataset, turns=with_defaults(cfg).turns, lr=cfg.lr, alpha=cfg.alpha,
                           warmup_turns=cfg.warmup_turns, model=cfg.model)


def meta_options(name: str, cfg: RunConfig) -> dict:
    """A hypernetwork's meta-training options in a run of ``cfg``: on the default testbed its row of
    ``hparams.FAIR_TESTBED_BASELINE_HPARAMS`` (the tuned initial edit ``lr``), then ``--lr``, then the run's
    editor options (each overriding the one before)."""
    table = hparams.FAIR_TESTBED_BASELINE_HPARAMS if fair_protocol(cfg) else {}
    given = {} if cfg.lr is None else {"lr": cfg.lr}
    return {**table.get(name, {}), **given, **(cfg.editor_options or {})}


def meta_training_records(name: str, cfg: RunConfig, tok, log: Optional[Callable[[str], None]] = None):
    """What a hypernetwork of ``cfg`` meta-trains on: None for the embedded world's models on the world (its
    training split, ``lnjax.app.train_editor``'s default), else the run dataset's training split tokenized with
    the run's ``tok`` -- the world's or facts' ``train`` split (subjects disjoint from the edited ones), a file
    dataset's ``--train-data`` -- so a real model never meta-trains on another tokenizer's ids. ``n_train`` of the
    editor options bounds how many are read (default: all)."""
    world_models = cfg.model is None or world_model.is_model_dir(cfg.model)
    if cfg.dataset == "world" and world_models:
        return None
    n = meta_options(name, cfg).get("n_train")
    if cfg.dataset == "world":
        w = default_world()
        records = data_lib.records_from_dicts("zsre", w.records("train", n or len(w.all_facts("train")),
                                                                seed=cfg.seed), "world:train")
    elif cfg.dataset == "facts":
        from lnjax.data import facts
        records = facts.edit_records("train", n, seed=cfg.seed)
    elif cfg.train_data is None:
        raise ValueError(f"{name} is meta-trained before it edits: with --dataset {cfg.dataset} it needs the "
                         "dataset's training split as --train-data (records disjoint from --data's)")
    else:
        records = data_lib.read(cfg.dataset, cfg.train_data, n, seed=cfg.seed, strict=cfg.strict, log=log)
    return tuple(data_lib.tokenize(records, tok, strict=cfg.strict, log=log))


def _editor(name: str, cfg: RunConfig, model=None, targets=None, log: Callable[[str], None] = print, tok=None):
    if name in hparams.META_TRAINED:   # meta-trained first (or taken from the cache)
        from lnjax.app.train_editor import trained_editor
        return trained_editor(name, model, targets, edits_per_turn=cfg.edits_per_turn, seed=cfg.seed,
                              minibatch_size=cfg.minibatch_size, options=meta_options(name, cfg), log=log,
                              records=meta_training_records(name, cfg, tok, log))
    settings = editor_settings(name, cfg)
    return _registry_editor(hparams.registry_name(name), settings["lr"], settings["alpha"],
                            json.dumps(cfg.editor_options or {}, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _registry_editor(name: str, lr, alpha, options: str):
    # One editor object per settings, so that the seeds of a run (same shapes) share its compiled chunk function
    # (lnjax.engine.sequence.compiled_chunk_fn).
    return editors_lib.get(name, lr=lr, alpha=alpha, **json.loads(options))



@dataclasses.dataclass
class Job:
    """The edits of a run, shared by its editors: the prepared edits (``lnjax.eval.prepare``: packed turns,
    tokenized warm-up records, the evaluation set with the unedited model's locality predictions), each editor's
    warm-up turns and the reader's report."""

    edits: PreparedEdits
    warm_turns: dict
    read_report: data_lib.ReadReport
    families: Optional[dict] = None      # the fair protocol's locality families (``fair_families``)
    tokenizer: object = None             # the run's tokenizer (a hypernetwork's training records need it)

    @property
    def batches(self):
        return self.edits.turns

    @property
    def eval_set(self) -> eval_lib.EvalSet:
        return self.edits.eval_set

    @property
    def base_loc(self) -> np.ndarray:
        return self.edits.base_loc

    @property
    def turn_of_example(self) -> np.ndarray:
        return self.edits.turn_of_example


def max_probe_length(cfg: RunConfig, model) -> int:
    """The longest probe (prompt + answer - 1 tokens) a run accepts: ``--max-length``, else the model's context
    (its ``max_position_embeddings``, else ``config.max_positions``); longer ones are refused by name before
    anything is packed, so an enormous record never reaches an allocation."""
    if cfg.max_length is not None:
        return cfg.max_length
    return int((getattr(model, "hf_config", None) or {}).get("max_position_embeddings") or model.config.max_positions)


def prepare_job(cfg: RunConfig, model, tok, log: Optional[Callable[[str], None]] = None,
                targets: Optional[Sequence[str]] = None) -> Job:
    """Read, tokenize and pack the edits of ``cfg`` (and the warm-up records its editors need); with the run's
    ``targets``, the evaluation set keeps the unedited residual streams below them (``lnjax.eval.FrozenPrefix``)."""
    n = cfg.turns * cfg.edits_per_turn
    warm_turns = {name: editor_settings(name, cfg)["warmup_turns"] for name in cfg.editors}
    n_warm = max(warm_turns.values(), default=0) * cfg.edits_per_turn
    read_report = data_lib.ReadReport()
    records, warm_records = _load_records(cfg, n, n_warm, read_report, log)
    edits = prepare_edits(records, tok, model, edits_per_turn=cfg.edits_per_turn, n_turns=cfg.turns,
                          warmup_records=warm_records, max_length=max_probe_length(cfg, model), strict=cfg.strict,
                          report=read_report, log=log, targets=targets if cfg.reuse_streams else None)
    families = fair_families(cfg, model, n) if fair_protocol(cfg) else None
    return Job(edits=edits, warm_turns=warm_turns, read_report=read_report, families=families, tokenizer=tok)


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


class StepScale(Hook):
    """After each chunk, the value step the editor takes on the next scheduled turn, raw and normalized
    (``lnjax.eval.step_scale``), appended to ``host_state["step_scale"]``: how LN's step scale drifts over a run."""

    def __init__(self, apply, targets, lr: float, per_turn: bool):
        self.apply, self.targets, self.lr, self.per_turn = apply, tuple(targets), lr, per_turn

    def chunk(self, end) -> None:
        from lnjax.eval.step_scale import value_step_scale
        turn = min(end.turns_done, end.run.total - 1)
        batch = jax.tree_util.tree_map(lambda a: np.asarray(a)[turn], end.run.turns)
        stats = end.carry.editor_state.stats
        scale = value_step_scale(self.apply, end.params(), self.targets, batch, self.lr,
                                 next(iter(stats.values())) if stats else None, self.per_turn)
        end.host_state.setdefault("step_scale", []).append({"turns_done": end.turns_done, **scale})


def run_editor(name: str, cfg: RunConfig, model, targets: tuple, job: Job, *, checkpoint_dir: Optional[str] = None,
               resume: bool = False, **options) -> tuple[dict, dict, list]:
    """One editor's run on ``job``: ``(metrics, timings, diagnostics lines)``. ``options`` go to
    ``edit_sequence`` (``progress``, ``on_nonfinite``, ``log``, ``mesh``)."""
    r = job.warm_turns[name]
    warm = job.edits.warmup_turns(r) if r else None
    hooks = [Evaluation(during_run_metrics(cfg, model, job))] if cfg.eval_every > 0 else []
    host = {"curve": []}
    batches, extra = job.batches, {}
    if name in baselines.MODEL_EDITORS:  # FT, MEMIT, AlphaEdit run the model: built with their statistics
        editor, targets, extra = baselines.for_run(name, model, targets, dataset=cfg.dataset,
                                                   explicit_targets=cfg.targets is not None, lr=cfg.lr,
                                                   options=cfg.editor_options, testbed=fair_protocol(cfg))
        batches = job.edits.edit_turns()
        extra = {**extra, "targets": list(targets)}
    else:
        editor = _editor(name, cfg, model, targets, options.get("log", print), job.tokenizer)
        # the unedited residual streams the evaluation kept below the edited blocks: each turn runs only the rest
        streamed = job.edits.streamed_turns(model, warm) if cfg.reuse_streams else None
        if streamed is not None:
            batches, warm = streamed
        if job.families is not None and name not in hparams.META_TRAINED:  # the fair protocol measures the step
            hooks.append(StepScale(model.apply, targets, editor_settings(name, cfg)["lr"],
                                   hparams.registry_name(name) == "per_turn_normalization"))
    t0 = time.time()
    # under the fair protocol every turn is sized for the world's longest answer, so all seeds share one compile
    max_rows = cfg.edits_per_turn * _fair_max_answer() if fair_protocol(cfg) else None
    # a chunk never longer than the run: a padding turn costs a whole turn's compute (it is masked, not skipped)
    chunk = min(cfg.eval_every if cfg.eval_every > 0 else cfg.chunk, cfg.turns + r)
    res = edit_sequence(model, editor, batches, targets, warmup=warm, warmup_at=cfg.warmup_at, max_rows=max_rows,
                        chunk=chunk, minibatch_size=cfg.minibatch_size,
                        track_accuracy=True, hooks=hooks, checkpoint_dir=checkpoint_dir, resume=resume,
                        host_state=host, run_config=cfg.to_json(), **options)
    jax.block_until_ready(res.params)
    if jax.process_count() > 1:  # several processes: each evaluates on its own devices, on the whole weights
        res = dataclasses.replace(res, params=to_host(res.params))
    t_edit = time.time() - t0
    metrics = eval_lib.evaluate(model.apply, res.params, job.eval_set, job.base_loc, _protocols(cfg),
                                per_example=True)
    if cfg.eval_every > 0:  # every chunk ends with an evaluation; the last one is this final evaluation
        host["curve"].append(curve_point(cfg, job, metrics, cfg.turns))
    del metrics["per_example"]
    if job.families:
        from lnjax.world import fair
        metrics["locality_families"] = fair.family_locality(model.apply, res.params, job.families)
    metrics["during_run"] = host["curve"]
    if "step_scale" in host:
        metrics["step_scale"] = host["step_scale"]
    metrics["rejected_turns"] = int(res.editor_state.rejected)  # non-finite or overflowing shifts, not applied
    # turns with no supervised position (every edit padding): applied as a zero shift, statistics unchanged
    metrics["empty_turns"] = int(np.sum((res.diagnostics["rows"] == 0) & res.diagnostics["active"]))
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
    cfg = with_defaults(cfg)
    model, tok, targets = _load_model(cfg, log)
    check_targets(model, targets)
    device_mesh = None
    if mesh:
        from lnjax.engine.sharding import make_mesh
        device_mesh = make_mesh(mesh)
    if checkpoint_dir:
        checkpoint.save_run_config(checkpoint_dir, cfg.to_json())
    seeds = [cfg.seed + k for k in range(cfg.seeds or (3 if fair_protocol(cfg) else 1))]
    runs = []
    for seed in seeds:
        if len(seeds) > 1:
            log(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})")
        seed_dir = os.path.join(checkpoint_dir, f"seed{seed}") if checkpoint_dir and len(seeds) > 1 else checkpoint_dir
        runs.append(_run_seed(dataclasses.replace(cfg, seed=seed), model, tok, targets, log, progress, seed_dir,
                              resume, on_nonfinite, device_mesh))
    results, diag_lines, timings, job = runs[0] if len(runs) == 1 else _over_seeds(runs, seeds)
    for name in cfg.editors:
        # a model-running baseline reports the settings it was built with (e.g. FT's tuned lr on the testbed)
        results["editors"][name]["settings"] = {"editor": hparams.registry_name(name), **editor_settings(name, cfg),
                                                **results["editors"][name].pop("baseline_settings", {}),
                                                **(meta_options(name, cfg) if name in hparams.META_TRAINED else {})}
    results["metadata"] = report.metadata(
        cfg.to_json(), params=model.params, targets=targets, edit_labels=job.batches.labels,
        warmup_turns=job.warm_turns, timings=timings,
        total_seconds=time.time() - t_start, world_facts=default_world().n_facts if cfg.dataset == "world" else None)
    results["metadata"].update(data_packages=_data_packages(cfg), seeds=seeds)
    if fair_protocol(cfg):
        results["metadata"]["protocol"] = _fair_metadata()
    if out_dir:
        report.write_run_dir(out_dir, cfg.to_json(), results, diag_lines)
    return results


def _fair_metadata() -> dict:
    """What the fair protocol was (``lnjax.world.fair``): the split, the testbed, where the settings were tuned."""
    from lnjax.world import fair
    from lnjax.world.memory_testbed import FAIR_SETTINGS
    return {"name": "fair (issue 23)", "split": fair.fair_split(default_world()).describe(),
            "evaluated_role": "eval", "testbed": FAIR_SETTINGS, "locality_families": list(fair.FAMILIES),
            "tuning": hparams.FAIR_TUNING}


def _over_seeds(runs: list, seeds: list) -> tuple:
    """One run's ``(results, diagnostics lines, timings, job)`` from each seed's: every number the mean over
    seeds, the headline metrics' sample standard deviation under ``spread`` and each seed's under ``per_seed``."""
    results = {k: v for k, v in runs[0][0].items() if k != "editors"}
    results["unedited"] = report.mean_tree([r[0]["unedited"] for r in runs])
    results["editors"] = {}
    for name in runs[0][0]["editors"]:
        each = [r[0]["editors"][name] for r in runs]
        merged = report.mean_tree(each)
        merged["spread"] = report.std_tree([{k: m[k] for k in report.HEADLINE if k in m} for m in each])
        merged["per_seed"] = {str(s): m for s, m in zip(seeds, each)}
        results["editors"][name] = merged
    lines = [{**line, "seed": s} for (_, ls, _, _), s in zip(runs, seeds) for line in ls]
    timings = {name: {k: sum(r[2][name][k] for r in runs) for k in runs[0][2][name]} for name in runs[0][2]}
    return results, lines, timings, runs[-1][3]


def _run_seed(cfg: RunConfig, model, tok, targets, log, progress, checkpoint_dir, resume, on_nonfinite,
              device_mesh) -> tuple:
    """Every editor of ``cfg`` on ``cfg.seed``'s edits: ``(results, diagnostics lines, timings, job)``."""
    job = prepare_job(cfg, model, tok, log, targets)
    if job.read_report.layout:
        log(f"{cfg.data}: read as {cfg.dataset} in the {job.read_report.layout} layout")
    if job.read_report.skipped:
        log(f"{len(job.read_report.skipped)} unusable rows skipped (listed in results.json under data.skipped; "
            "--strict refuses them)")
    results: dict = {"editors": {}, "data": report.data_section(cfg.data, job.read_report), "metadata": {}}
    # the unedited predictions of every probe were computed once, with base_loc (prepare_edits): reused here
    results["unedited"] = eval_lib.evaluate(model.apply, model.params, job.eval_set, job.base_loc, _protocols(cfg),
                                            known=job.edits.unedited)
    diag_lines: list[dict] = []
    timings = {}
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
    return results, diag_lines, timings, job


def _data_packages(cfg: RunConfig) -> Optional[dict]:
    """Versions of the packages generated data came from (None for data read from files or the world)."""
    if cfg.dataset != "facts":
        return None
    from lnjax.data import facts
    return facts.versions()
