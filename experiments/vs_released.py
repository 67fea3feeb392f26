"""lnjax against the released editor code, end to end on a real LM (issue 24 item 3, issue 25 "against the released
code"): the same real edits, the same SmolLM2-135M-Instruct checkpoint, targets and lr, on this machine, one job
after the other.

    python experiments/vs_released.py --released-root runs/released            # ultraedit and stableedit
    python experiments/vs_released.py --released-root DIR --editors stableedit --turns 2 --edits-per-turn 100

``DIR`` holds work trees of the released repositories: ``DIR/UltraEdit`` (XiaojieGu/UltraEdit) and
``DIR/StableEdit`` (MINE-USTC/StableEdit), e.g. ``git clone`` of each into ``DIR``. Their code is imported at run time, in a subprocess whose
``PYTHONPATH`` is the checkout; nothing of it is copied here. Per editor, three jobs:

1. **released**: a thin driver builds the released code's config (a plain namespace in place of Hydra's), its
   zsre ``DataLoader`` (``data/base.py``: sorted turns, mini-batches of 10), its ``make_model`` and its editor
   class, runs the code's own evaluation loop on the unedited model (``--unedited-eval on``, the default: the
   job issue 25 timed evaluates before and after, and "locality vs unedited" needs the unedited predictions;
   ``off`` leaves it out), and calls the editor's own ``sequential_valid`` (warm-up, edit turns, and the code's
   own teacher-forced evaluation; its ``run()`` would then reload the model twice, which is left out of the
   timing); the edited target weights are saved. Logging-only imports (wandb, swanlab) and imports of code
   paths this run never takes (GLUE evaluation, LoRA, nltk, omegaconf for type hints) are stand-in modules.
   The released StableEdit ``editor/base.py`` does not parse (an ``else:`` followed by a condition, in the
   WikiBigEdit branch); the driver compiles it with that one line read as ``elif``, in memory.
2. **lnjax**: ``lnjax.app.run.run`` exactly as ``lnjax run --model DIR --dataset zsre --data FILE --editor NAME
   --targets ... --lr ... --alpha ... --warmup-turns W --train-data FILE --eval-every 0 --chunk 1
   --no-generation`` calls it (``--dataset ultraeditbench`` with ``--layout ultraeditbench``), with the JAX compilation cache on as the CLI turns it on; ``edit_sequence`` is
   wrapped only to add a timing hook after every turn and to keep the edited kernels.
3. **score** (not timed): lnjax's evaluation of both edited models (the released weights put into lnjax's params,
   transposed from ``(out, in)`` to ``(in, out)``), so metric differences come from editing only, and the
   largest difference between the two shifts relative to the shift's size.

The records are real geography facts (``lnjax.data.facts``, the ``edit`` split for the evaluated edits, the
``train`` split for StableEdit's warm-up) written in the ZsRE layout both readers accept (``src``, ``rephrase``,
``alt``/``ans``, ``answers``, ``loc``, ``loc_ans``; both append ``"?"`` to ``loc``, which spoils the facts' cloze
locality prompts, so gold-answer locality is near 0 there and "locality vs unedited" is the informative one), or
with ``--layout ultraeditbench`` in that layout (``loc`` read as written). Both jobs run with
``OMP_WAIT_POLICY=PASSIVE`` (``CHILD_ENV``). Outputs: ``results.json`` and ``summary.md`` under ``--out`` (default
``runs/vs_released``), and a table on stdout. A fidelity check and a benchmark, not a study of the editors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

REPOS = {"ultraedit": "UltraEdit", "stableedit": "StableEdit"}
TARGETS = tuple(f"model.layers.{i}.mlp.down_proj" for i in range(25, 29))
# The released settings matched on both sides. UltraEdit: lr 1e-3 (issue 24's SmolLM2 check; the released default
# 1e-6 is for 7-8B models), the ridge identity of its code (alpha 1), 128-row normalization chunks (its yaml).
# StableEdit: the same lr (the release has no setting for a model this small), alpha 10 and 512-row chunks as in
# every run of its run.sh, the "stable" statistics and warm-up at the start.
SETTINGS = {
    "ultraedit": {"lr": 1e-3, "alpha": 1.0, "chunk_rows": 128},
    "stableedit": {"lr": 1e-3, "alpha": 10.0, "chunk_rows": 512},
}
MINIBATCH = 10                # the released dataset.batch_size
ZSRE_FIELDS = ("src", "rephrase", "alt", "ans", "answers", "loc", "loc_ans")
# The record layouts both implementations read, as ``facts`` field -> file field. ZsRE's readers (both) append "?"
# to ``loc``, made for ZsRE's question-form locality prompts; UltraEditBench's read ``loc`` as it is, which keeps the
# facts' cloze locality prompts answerable (the gold-answer locality metric is then informative).
LAYOUTS = {"zsre": {f: f for f in ZSRE_FIELDS},
           "ultraeditbench": {"src": "prompt", "rephrase": "rephrase_prompt", "ans": "ans", "loc": "loc",
                              "loc_ans": "loc_ans"}}
# libgomp's threads spin while they wait; on a shared CPU a descheduled partner makes every torch op wait out its
# time slice (measured here: 0.7 s against 1-7 s for one SmolLM2 forward with another process running). Passive
# waiting changes no result; both jobs get it unless the caller set OMP_WAIT_POLICY.
CHILD_ENV = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


# ----------------------------------------------------------------------------------------------- pure helpers


def zsre_rows(rows: Sequence[dict], source: str = "<rows>", layout: str = "zsre") -> list:
    """``rows`` (``lnjax.data.facts.build`` dicts) as records both readers accept. ``layout="zsre"``: ``src``,
    ``rephrase``, ``alt`` and ``ans`` (the new answer, MEND's and UltraEdit's spelling), ``answers`` (the true
    answer, a list), ``loc``, ``loc_ans``, and ``subject`` when given; ``"ultraeditbench"``: the same texts as
    ``prompt``, ``rephrase_prompt``, ``ans``, ``loc``, ``loc_ans`` (``LAYOUTS``). ValueError naming the row and
    field of a missing or empty text."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    out = []
    for i, r in enumerate(rows):
        rec = {}
        for f in ZSRE_FIELDS:
            v = r.get(f)
            if f == "answers":
                ok = isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v)
            else:
                ok = isinstance(v, str) and v.strip()
            if not ok:
                raise ValueError(f"{source}: row {i}: field {f!r}: missing or empty ({v!r})")
            rec[f] = v
        if rec["alt"] != rec["ans"]:
            raise ValueError(f"{source}: row {i}: field 'ans': {rec['ans']!r} differs from 'alt' {rec['alt']!r}")
        if r.get("subject"):
            rec["subject"] = r["subject"]
        out.append({LAYOUTS[layout].get(k, k): v for k, v in rec.items()
                    if k in LAYOUTS[layout] or k == "subject"})
    return out


def write_records(path: str, rows: Sequence[dict], source: str = "<rows>", layout: str = "zsre") -> str:
    """Write ``zsre_rows(rows, source, layout)`` to ``path`` as one JSON array (the published files' form);
    returns ``path``."""
    recs = zsre_rows(rows, source, layout)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(recs, f, indent=0, ensure_ascii=False)
    return path


def hf_weight_to_kernel(weight: np.ndarray, kernel_shape: Sequence[int], name: str = "weight") -> np.ndarray:
    """A Hugging Face ``nn.Linear`` weight ``[d_out, d_in]`` as lnjax's kernel ``[d_in, d_out]`` (float32),
    checked against the kernel it replaces. ValueError naming ``name`` on a shape that does not fit."""
    w = np.asarray(weight)
    if w.ndim != 2 or tuple(w.shape[::-1]) != tuple(kernel_shape):
        raise ValueError(f"{name}: weight of shape {tuple(w.shape)} does not transpose to the kernel's "
                         f"{tuple(kernel_shape)} (an nn.Linear weight is (out, in), a kernel (in, out))")
    return np.ascontiguousarray(w.T, dtype=np.float32)


def shift_difference(base: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    """How far two edits of one kernel ``base`` differ: ``max|a - b|`` against the size of ``b``'s shift
    ``max|b - base|`` (all [d_in, d_out], compared in float64); also both shifts' Frobenius norms and cosine."""
    base, a, b = (np.asarray(x, np.float64) for x in (base, a, b))
    da, db = a - base, b - base
    diff = float(np.max(np.abs(a - b)))
    size = float(np.max(np.abs(db)))
    na, nb = float(np.linalg.norm(da)), float(np.linalg.norm(db))
    return {"max_abs_diff": diff, "max_abs_shift": size, "relative": diff / size if size > 0 else float("inf"),
            "frobenius_a": na, "frobenius_b": nb,
            "cosine": float(np.sum(da * db) / (na * nb)) if na > 0 and nb > 0 else float("nan")}


def turn_seconds(stamps: Sequence[dict]) -> dict:
    """Per-turn seconds from stamps ``{"kind": "warmup"|"edit", "start": t0, "end": t1}`` in run order:
    ``{"warmup": [...], "edit": [...]}``. ValueError on a stamp without an end or ending before it starts."""
    out = {"warmup": [], "edit": []}
    for i, s in enumerate(stamps):
        if s.get("end") is None or s["end"] < s["start"]:
            raise ValueError(f"turn stamp {i} ({s.get('kind')}) has no valid end: {s}")
        if s["kind"] not in out:
            raise ValueError(f"turn stamp {i}: unknown kind {s['kind']!r}")
        out[s["kind"]].append(float(s["end"] - s["start"]))
    return out


def patch_else_condition(source: str) -> tuple:
    """``(source, changed)``: an ``else:`` followed on its next line by a ``<condition>:`` (a syntax error) read as
    ``elif <condition>:``, as the released StableEdit ``editor/base.py`` needs to parse; unchanged otherwise."""
    pattern = re.compile(r"else:[ \t]*\n[ \t]*(self\.config\.dataset\.name in \[[^\]\n]*\]):")
    new, n = pattern.subn(r"elif \1:", source)
    return new, n > 0


# ----------------------------------------------------------------------------------------------- released side


def _stub(name: str, **attrs):
    import importlib.machinery
    import types
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec-based availability checks need one
    mod.__dict__.update(attrs)
    mod.__lnjax_stand_in__ = True
    sys.modules[name] = mod
    return mod


def _install_stand_ins(logged: list) -> list:
    """Stand-in modules for the released code's imports this run does not need; returns their names. The
    experiment loggers are always replaced (their ``log`` calls are recorded in ``logged``; the real ones want
    an account or a server); the others only when the package is missing."""
    import importlib.util

    # transformers and accelerate decide at import time which loggers exist: import them first, so that they see
    # the installed packages only and never pick up a stand-in
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    def log(data=None, *a, **k):
        logged.append(dict(data or {}))

    names = []
    for logger in ("wandb", "swanlab"):
        _stub(logger, log=log, init=lambda *a, **k: None, finish=lambda *a, **k: None)
        names.append(logger)

    def unused(what):
        def fail(*a, **k):
            raise RuntimeError(f"{what} is not available in this driver (the run was configured not to use it)")
        return fail

    optional = {"nltk": {}, "omegaconf": {"DictConfig": dict, "OmegaConf": None},
                "hessian_dominant_subspace": {"prepare_lora_model": unused("LoRA (for_lora)")}}
    for name, attrs in optional.items():
        if importlib.util.find_spec(name) is None:
            _stub(name, **attrs)
            names.append(name)
    # GLUE evaluation (StableEdit, downstream_eval_steps > 0) imports `datasets` and sklearn; it is off here.
    _stub("glue_eval.glue_eval", GLUEEval=unused("GLUE evaluation (downstream_eval_steps)"))
    names.append("glue_eval.glue_eval")
    return names


def _released_config(a):
    from types import SimpleNamespace as NS
    s = SETTINGS[a.editor]
    editor = NS(name=a.editor, lr=s["lr"], batch_size=s["chunk_rows"], token="ans", cache_dir=a.cache_dir,
                alpha=s["alpha"], RunningMeanStd_mode="stable", preheat_mode="start" if a.warmup_turns else "none",
                n_epochs=1, load_checkpoint=False, save_checkpoint=False)
    model = NS(name="smollm2", name_or_path=a.model, class_name="AutoModelForCausalLM",
               edit_modules=list(a.targets), half=False)
    # the datasets are clipped to n_edits * dataset.num_seq rows: room for the warm-up turns of the train split
    dataset = NS(name=a.layout, n_edits=a.edits_per_turn, batch_size=MINIBATCH, train_path=a.train_data,
                 valid_path=a.data, num_seq=max(a.turns, a.warmup_turns))
    return NS(editor=editor, model=model, dataset=dataset, num_seq=a.turns, num_seq_zsre=a.warmup_turns,
              num_seq_wikibigedit=a.warmup_turns, model_device="cpu", editor_device="cpu", model_cache=False,
              model_cache_dir="", for_lora=False, downstream_eval_steps=0)


def _import_editor(a) -> tuple:
    """The released editor class, with ``editor.base`` compiled from the checkout (patched when it does not
    parse); returns ``(class, patches applied)``."""
    import importlib
    import types
    patches = []
    base_file = os.path.join(a.repo, "editor", "base.py")
    with open(base_file) as f:
        src = f.read()
    try:
        compile(src, base_file, "exec")
    except SyntaxError as e:
        src, changed = patch_else_condition(src)
        if not changed:
            raise
        patches.append(f"{base_file}:{e.lineno}: `else:` + condition read as `elif` (SyntaxError as released)")
        importlib.import_module("editor")  # the namespace package, so that editor.base can be registered in it
        mod = types.ModuleType("editor.base")
        mod.__file__ = base_file
        sys.modules["editor.base"] = mod
        exec(compile(src, base_file, "exec"), mod.__dict__)
    cls = getattr(importlib.import_module(f"editor.{a.editor}"), a.editor.upper())
    return cls, patches


def _timed(editor, stamps: list) -> None:
    """Stamp each turn of ``editor.sequential_valid``: a turn starts at ``cache`` (features) and ends after
    ``edit_model`` applied its shift; warm-up turns are the ones cached in ``mode="train"``."""
    cache, edit = editor.cache, editor.edit_model

    def timed_cache(tuples, *args, **kw):
        mode = kw.get("mode", args[0] if args else "inference")
        stamps.append({"kind": "warmup" if mode == "train" else "edit", "start": time.perf_counter(), "end": None})
        return cache(tuples, *args, **kw)

    def timed_edit(*args, **kw):
        out = edit(*args, **kw)
        stamps[-1]["end"] = time.perf_counter()
        return out

    editor.cache, editor.edit_model = timed_cache, timed_edit


def released_unedited_eval(model, loader, turns: int, succ_ratios) -> dict:
    """The released code's own evaluation loop (``sequential_valid``'s: every edit, equivalence and unrelated
    mini-batch of the first ``turns`` turns through ``model``, ``succ_ratios`` of its labels) run on the unedited
    model, keeping the argmax at the unrelated probes' labelled positions: what "locality vs unedited" compares
    against, so a job that reports that metric (lnjax's does) runs this pass, as issue 25's 213 s job did ("a
    plain batched transformers evaluation" before and after). Returns the unedited ES / GS / LS and the kept
    argmax count."""
    import itertools

    import torch
    succs = {"edit_tuples": [], "equiv_tuples": [], "unrel_tuples": []}
    kept = []
    for tuples in itertools.islice(loader, turns):
        for k, s in succs.items():
            for t in tuples[k]:
                with torch.no_grad():
                    logits = model(**t)["logits"]
                s += succ_ratios(logits, t["labels"])
                if k == "unrel_tuples":
                    kept.append(logits.argmax(-1)[t["labels"] != -100])
    return {"ES": float(np.mean(succs["edit_tuples"])), "GS": float(np.mean(succs["equiv_tuples"])),
            "LS": float(np.mean(succs["unrel_tuples"])), "kept_locality_tokens": int(sum(len(x) for x in kept))}


def released_side(a) -> None:
    t0 = time.perf_counter()
    logged: list = []
    stand_ins = _install_stand_ins(logged)
    import importlib

    import torch
    cfg = _released_config(a)
    cls, patches = _import_editor(a)
    data_base, data_mod = importlib.import_module("data.base"), importlib.import_module(f"data.{a.layout}")
    make_model = importlib.import_module("model").make_model
    loaders = data_base.make_loader(cfg, getattr(data_mod, f"{a.layout.upper()}Dataset"))
    train_loader, valid_loader = loaders if a.warmup_turns else (None, loaders[1])
    model = make_model(cfg.model).to(cfg.model_device)
    editor = cls(cfg, model)
    stamps: list = []
    _timed(editor, stamps)
    t_loaded = time.perf_counter()
    unedited = None
    if a.unedited_eval == "on":
        unedited = released_unedited_eval(editor.model, valid_loader, cfg.num_seq,
                                          importlib.import_module("util").succ_ratios)
    t_unedited = time.perf_counter()
    if a.editor == "stableedit":
        editor.prev_param_shift = {}  # what its run() sets before sequential_valid
        editor.sequential_valid(valid_loader, train_loader=train_loader)
    else:
        editor.sequential_valid(valid_loader)
    t_done = time.perf_counter()
    get = importlib.import_module("util").get_module
    weights = {t: get(editor.model, t).weight.detach().to(torch.float32).numpy() for t in a.targets}
    np.savez(a.kernels_out, **weights)
    own = next((d for d in reversed(logged) if "ES" in d), None)
    turns = turn_seconds(stamps)
    json.dump({"side": "released", "editor": a.editor, "repo": a.repo, "stand_in_modules": stand_ins,
               "patches": patches, "own_metrics": {k: float(v) for k, v in (own or {}).items()},
               "own_unedited_metrics": unedited,
               "dtype": str(next(editor.model.parameters()).dtype), "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "timings": {"load_seconds": t_loaded - t0, "unedited_eval_seconds": t_unedited - t_loaded,
                           "turns": turns,
                           "eval_seconds": t_done - stamps[-1]["end"], "in_process_seconds": t_done - t0}},
              open(a.json_out, "w"), indent=1)


# ----------------------------------------------------------------------------------------------- lnjax side


def _run_config(a, editor: str):
    from lnjax.app.run import RunConfig
    s = SETTINGS[editor]
    return RunConfig(editors=(editor,), turns=a.turns, edits_per_turn=a.edits_per_turn, warmup_turns=a.warmup_turns,
                     lr=s["lr"], alpha=s["alpha"], targets=tuple(a.targets), model=a.model, dtype="float32",
                     dataset=a.layout, data=a.data, train_data=a.train_data if a.warmup_turns else None, seeds=1,
                     chunk=1, eval_every=0, generation=False, minibatch_size=MINIBATCH)


def lnjax_side(a) -> None:
    t0 = time.perf_counter()
    from lnjax.io.builtin_models import enable_compilation_cache
    cache = enable_compilation_cache()  # as `lnjax run` does
    import jax

    from lnjax.app import run as run_lib
    from lnjax.core.tree import get_module
    from lnjax.engine.sequence import Callback

    real, kept, phase = run_lib.edit_sequence, {}, {}

    def timed_edit_sequence(model, editor, batches, targets, *, hooks=(), **kw):
        stamps = [time.perf_counter()]

        def stamp(turns_done, carry, diagnostics):
            jax.block_until_ready(carry.kernels)
            stamps.append(time.perf_counter())

        res = real(model, editor, batches, targets, hooks=list(hooks) + [Callback(stamp)], **kw)
        kept["stamps"] = stamps
        kept["kernels"] = {t: np.asarray(get_module(res.params, t)["kernel"], np.float32) for t in targets}
        return res

    def timed(name):  # seconds of one step of ``run`` (model load; reading, tokenizing, unedited predictions)
        fn = getattr(run_lib, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            phase[f"{name.strip('_')}_seconds"] = time.perf_counter() - t
            return out
        return wrapper

    originals = {n: getattr(run_lib, n) for n in ("edit_sequence", "_load_model", "prepare_job")}
    run_lib.edit_sequence, run_lib._load_model, run_lib.prepare_job = (
        timed_edit_sequence, timed("_load_model"), timed("prepare_job"))
    try:
        results = run_lib.run(_run_config(a, a.editor), out_dir=a.run_dir, progress=False)
    finally:
        for n, fn in originals.items():
            setattr(run_lib, n, fn)
    t_done = time.perf_counter()
    np.savez(a.kernels_out, **kept["kernels"])
    st = kept["stamps"]
    kinds = ["warmup"] * a.warmup_turns + ["edit"] * a.turns
    if len(st) != len(kinds) + 1:
        raise RuntimeError(f"expected one chunk per turn ({len(kinds)}), timed {len(st) - 1}")
    turns = turn_seconds([{"kind": k, "start": st[i], "end": st[i + 1]} for i, k in enumerate(kinds)])
    meta = results["metadata"]
    json.dump({"side": "lnjax", "editor": a.editor, "compilation_cache": cache, "jax": jax.__version__,
               "own_metrics": results["editors"][a.editor]["teacher_forced"],
               "settings": results["editors"][a.editor]["settings"],
               "timings": {"turns": turns, "run_total_seconds": meta["total_seconds"], **phase,
                           **{k: v for k, v in meta["timings"][a.editor].items()},
                           "in_process_seconds": t_done - t0}},
              open(a.json_out, "w"), indent=1)


# ----------------------------------------------------------------------------------------------- scoring


def score_side(a) -> None:
    """lnjax's evaluation of the unedited model and of each kernel file in ``a.score`` (``label=path.npz``), and
    the shift differences of each editor's two kernel sets."""
    from lnjax import eval as eval_lib
    from lnjax.app import run as run_lib
    from lnjax.core.tree import get_module, join
    from lnjax.io import hf

    model, tok = hf.load(a.model, "float32"), hf.load_tokenizer(a.model)
    cfg = _run_config(argparse.Namespace(**{**vars(a), "warmup_turns": 0}), "ultraedit")
    job = run_lib.prepare_job(cfg, model, tok)
    protocols = ("teacher_forced", "locality_vs_unedited")
    base = {t: np.asarray(get_module(model.params, t)["kernel"], np.float32) for t in a.targets}
    out = {"unedited": eval_lib.evaluate(model.apply, model.params, job.eval_set, job.base_loc, protocols,
                                         known=job.edits.unedited), "edited": {}, "shifts": {}}
    kernels = {}
    for item in a.score:
        label, path = item.split("=", 1)
        z = np.load(path)
        ks = {t: (hf_weight_to_kernel(z[t], base[t].shape, f"{path}:{t}") if label.endswith("released")
                  else np.asarray(z[t], np.float32)) for t in a.targets}
        kernels[label] = ks
        out["edited"][label] = eval_lib.evaluate(model.apply, join(model.params, ks), job.eval_set, job.base_loc,
                                                 protocols)
    for label in kernels:
        if label.endswith("/lnjax") and label.replace("/lnjax", "/released") in kernels:
            ref = kernels[label.replace("/lnjax", "/released")]
            out["shifts"][label.split("/")[0]] = {t: shift_difference(base[t], kernels[label][t], ref[t])
                                                  for t in a.targets}
    json.dump(out, open(a.json_out, "w"), indent=1)


# ----------------------------------------------------------------------------------------------- the driver


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def _child(side: str, a, extra: list, env: Optional[dict] = None, log=print) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", a.model, "--data", a.data,
           "--train-data", a.train_data, "--turns", str(a.turns), "--edits-per-turn", str(a.edits_per_turn),
           "--targets", ",".join(a.targets), "--layout", a.layout] + extra
    log(f"[{time.strftime('%H:%M:%S')}] {side}: {' '.join(cmd[2:4])} {' '.join(extra[:4])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **CHILD_ENV, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"the {side} job failed (exit status {proc.returncode}); its output is above")
    return wall


def _one_editor(a, editor: str, root: str, log=print) -> dict:
    d = os.path.join(a.out, editor)
    os.makedirs(d, exist_ok=True)
    repo = os.path.join(root, REPOS[editor])
    if not os.path.isfile(os.path.join(repo, "editor", f"{editor}.py")):
        raise FileNotFoundError(f"{repo}: no editor/{editor}.py; --released-root must hold the {REPOS[editor]} "
                                "repository's work tree")
    warm = a.warmup_turns if editor == "stableedit" else 0
    common = ["--editor", editor, "--warmup-turns", str(warm)]
    rec = {"warmup_turns": warm, "settings": SETTINGS[editor], "jobs": {}}
    load = {"released": _uptime()}
    wall = _child("released", a, common + ["--unedited-eval", a.unedited_eval, "--repo", repo,
                                           "--cache-dir", os.path.join(d, "released_cache"),
                                           "--json-out", os.path.join(d, "released.json"),
                                           "--kernels-out", os.path.join(d, "released.npz")],
                  env={"PYTHONPATH": repo, "WANDB_MODE": "disabled"}, log=log)
    rec["jobs"]["released"] = {**json.load(open(os.path.join(d, "released.json"))), "wall_seconds": wall,
                               "uptime_before": load["released"], "uptime_after": _uptime()}
    shutil.rmtree(os.path.join(d, "released_cache"), ignore_errors=True)  # its per-turn feature files
    load["lnjax"] = _uptime()
    wall = _child("lnjax", a, common + ["--run-dir", os.path.join(d, "lnjax_run"),
                                        "--json-out", os.path.join(d, "lnjax.json"),
                                        "--kernels-out", os.path.join(d, "lnjax.npz")], log=log)
    rec["jobs"]["lnjax"] = {**json.load(open(os.path.join(d, "lnjax.json"))), "wall_seconds": wall,
                            "uptime_before": load["lnjax"], "uptime_after": _uptime()}
    return rec


def phases(job: dict) -> dict:
    """Wall seconds of one job by phase: ``whole`` (the subprocess), ``warmup`` and ``edit`` (per turn),
    ``final_eval`` and ``before_first_turn`` (the rest: interpreter, imports, model load, tokenization, and for
    lnjax the unedited model's predictions), from the job's JSON (``released_side`` / ``lnjax_side``); of the
    latter, ``load`` (the model, and for the released code its modules, tokenizer and data loaders; None where
    not timed) and ``prepare`` (lnjax: reading, tokenizing and packing the records and the unedited predictions;
    the released code tokenizes inside its turns, None)."""
    t = job["timings"]
    warm, edit = list(t["turns"]["warmup"]), list(t["turns"]["edit"])
    evaluation = t["eval_seconds"]
    return {"whole": job["wall_seconds"], "unedited_eval": t.get("unedited_eval_seconds"),
            "before_first_turn": job["wall_seconds"] - sum(warm) - sum(edit) - evaluation,
            "load": t.get("load_seconds", t.get("load_model_seconds")), "prepare": t.get("prepare_job_seconds"),
            "warmup": warm, "edit": edit, "final_eval": evaluation}


HEADER = ["editor", "implementation", "ES", "GS", "LS", "loc vs unedited", "own ES / GS / LS"]
TIME_HEADER = ["editor", "implementation", "whole job s", "before first turn s", "of which load s",
               "of which prepare s (lnjax: with the unedited predictions)", "of which unedited evaluation s",
               "warm-up turns s", "edit turns s", "final evaluation s"]


def _own(job: dict) -> str:
    own = job["own_metrics"]
    vals = [own.get(a, own.get(b)) for a, b in (("ES", "efficacy"), ("GS", "generalization"), ("LS", "specificity"))]
    return " / ".join("-" if v is None else f"{v:.4f}" for v in vals)


def _md(rows: list) -> list:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |"
                                                                              for r in rows[1:]]


def table(results: dict) -> str:
    """Markdown tables of ``results`` (``main``'s dict): lnjax's scoring of both edited models beside each
    implementation's own evaluation; wall time by phase; shift differences and time ratios."""
    fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs) or "-"  # noqa: E731
    metrics, times, ratios = [HEADER], [TIME_HEADER], [[
        "editor", "max abs(shift diff) / max abs(released shift), per target", "cosine of the shifts",
        "time lnjax / released: whole job", "whole job, released without its unedited evaluation",
        "per edit turn (mean)", "last edit turn"]]
    for name, rec in results["editors"].items():
        ph = {}
        for side in ("released", "lnjax"):
            job, sc = rec["jobs"][side], results["scores"]["edited"][f"{name}/{side}"]
            tf = sc["teacher_forced"]
            metrics.append([name, side, f"{tf['efficacy']:.4f}", f"{tf['generalization']:.4f}",
                            f"{tf['specificity']:.4f}", f"{sc['locality_vs_unedited']:.4f}", _own(job)])
            ph[side] = p = phases(job)
            opt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
            times.append([name, side, f"{p['whole']:.1f}", f"{p['before_first_turn']:.1f}", opt(p["load"]),
                          opt(p["prepare"]), opt(p["unedited_eval"]), fmt(p["warmup"]), fmt(p["edit"]),
                          f"{p['final_eval']:.1f}"])
        sh = results["scores"]["shifts"][name]
        r, lj = ph["released"], ph["lnjax"]
        ratios.append([name, ", ".join(f"{v['relative']:.1e}" for v in sh.values()),
                       ", ".join(f"{v['cosine']:.6f}" for v in sh.values()), f"{lj['whole'] / r['whole']:.2f}",
                       f"{lj['whole'] / (r['whole'] - (r['unedited_eval'] or 0)):.2f}",
                       f"{np.mean(lj['edit']) / np.mean(r['edit']):.2f}", f"{lj['edit'][-1] / r['edit'][-1]:.2f}"])
    u = results["scores"]["unedited"]
    tf = u["teacher_forced"]
    return "\n".join(_md(metrics) + ["", f"Unedited (lnjax's evaluation): ES {tf['efficacy']:.4f} / GS "
                                           f"{tf['generalization']:.4f} / LS {tf['specificity']:.4f}.", ""]
                     + _md(times) + [""] + _md(ratios))


def _default_model() -> str:
    from lnjax.io import builtin_models, hf
    gguf_file = builtin_models.path("smollm2")
    d = hf.converted_gguf(gguf_file)
    if d is None:
        raise RuntimeError(f"{gguf_file}: no float32 safetensors conversion could be written (LNJAX_GGUF_CACHE=0?); "
                           "pass --model DIR (an HF checkpoint directory both implementations can load)")
    return d


def _write_data(a) -> None:
    from lnjax.data import facts
    rows = facts.build(seed=a.seed)
    n, n_warm = a.turns * a.edits_per_turn, max(a.warmup_turns, 1) * a.edits_per_turn
    for split, k, path in (("edit", n, a.data), ("train", n_warm, a.train_data)):
        if len(rows[split]) < k:
            raise ValueError(f"facts split {split!r} has {len(rows[split])} rows, {k} needed")
        write_records(path, rows[split][:k], f"facts:{split}", a.layout)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    a = parse_args(argv)
    if a.side == "released":
        return released_side(a)
    if a.side == "lnjax":
        return lnjax_side(a)
    if a.side == "score":
        return score_side(a)
    if not a.released_root:
        raise SystemExit("--released-root DIR is required (DIR/UltraEdit and DIR/StableEdit: the released "
                         "repositories' work trees)")
    t0 = time.time()
    a.out = os.path.abspath(a.out)
    a.model = a.model or _default_model()
    a.data = os.path.join(a.out, "data", "records.json")
    a.train_data = os.path.join(a.out, "data", "train.json")
    _write_data(a)
    results = {"command": " ".join([os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:])),
               "model": a.model, "targets": list(a.targets), "turns": a.turns, "edits_per_turn": a.edits_per_turn,
               "minibatch": MINIBATCH, "child_env": CHILD_ENV,
               "records": {"source": "lnjax.data.facts", "seed": a.seed, "layout": a.layout,
                                                   "edit": a.data, "train": a.train_data},
               "released_root": os.path.abspath(a.released_root), "editors": {}}
    results["released_commits"] = {name: _git_head(os.path.join(a.released_root, REPOS[name]))
                                   for name in a.editors}
    for name in a.editors:
        results["editors"][name] = _one_editor(a, name, os.path.abspath(a.released_root))
    scores = os.path.join(a.out, "scores.json")
    labels = [f"{n}/{s}={os.path.join(a.out, n, s + '.npz')}" for n in a.editors for s in ("released", "lnjax")]
    _child("score", a, ["--json-out", scores, "--score", *labels])
    results["scores"] = json.load(open(scores))
    results["total_seconds"] = time.time() - t0
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(_summary(results, text))
    print(text)
    print(f"\nwritten: {a.out}/results.json, {a.out}/summary.md")
    return results


def _git_head(path: str) -> Optional[str]:
    """The commit of the checkout at ``path`` when it is a git work tree of its own, else None (an exported tree
    inside another repository must not report that repository's commit)."""
    try:
        top = subprocess.run(["git", "-C", path, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
        if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(path):
            return None
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def _summary(results: dict, text: str) -> str:
    lines = ["# lnjax against the released code, end to end", "", f"Command: `python {results['command']}`", "",
             f"Model `{results['model']}`, targets {', '.join(results['targets'])}; {results['turns']} turns of "
             f"{results['edits_per_turn']} real-fact edits (lnjax.data.facts, {results['records']['layout']} "
             f"layout), mini-batches of {results['minibatch']}; released commits {results['released_commits']}. "
             "ES/GS/LS are teacher-forced token accuracy (lnjax's evaluation of both edited models), `loc vs "
             "unedited` the agreement with the unedited model on the locality probes; `own ES / GS / LS` is each "
             "implementation's own evaluation. Whole job = the subprocess's wall time (imports, load, edit, "
             f"evaluate), both with {results['child_env']}. Timings come from a shared CPU (load averages below); "
             "the metrics and kernels are deterministic, the seconds are not.", ""]
    for name, rec in results["editors"].items():
        s = rec["settings"]
        lines.append(f"- {name}: lr {s['lr']:g}, alpha {s['alpha']:g}, {rec['warmup_turns']} warm-up turns; "
                     f"released stand-ins {rec['jobs']['released']['stand_in_modules']}, patches "
                     f"{rec['jobs']['released']['patches'] or 'none'}; load during released job: "
                     f"`{rec['jobs']['released']['uptime_before']}`, lnjax job: `{rec['jobs']['lnjax']['uptime_before']}`")
    return "\n".join(lines + ["", text, ""])


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--released-root", help="directory holding UltraEdit/ and StableEdit/ (the released repos)")
    p.add_argument("--editors", default="ultraedit,stableedit",
                   type=lambda s: [x.strip() for x in s.split(",") if x.strip()])
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--edits-per-turn", type=int, default=100)
    p.add_argument("--warmup-turns", type=int, default=1,
                   help="StableEdit's warm-up turns from the train split (lnjax's default for 2 turns: turns//10, "
                        "at least 1; the released runs use 20 for 200 turns)")
    p.add_argument("--model", help="HF checkpoint directory (default: the built-in SmolLM2 as float32 safetensors)")
    p.add_argument("--targets", default=",".join(TARGETS), type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--seed", type=int, default=0, help="seed of the facts split")
    p.add_argument("--layout", default="zsre", choices=sorted(LAYOUTS),
                   help="record layout (zsre: the issue's; its readers append '?' to the cloze locality prompts)")
    p.add_argument("--unedited-eval", default="on", choices=("on", "off"),
                   help="released job: run its own evaluation loop on the unedited model first (on: the job issue 25 "
                        "timed, evaluation before and after, which the locality-vs-unedited metric needs; off: the "
                        "released sequential_valid alone, which reports gold-answer LS only)")
    p.add_argument("--out", default=os.path.join("runs", "vs_released"))
    # internal: one job of the comparison, run in its own process
    p.add_argument("--side", choices=("released", "lnjax", "score"), help=argparse.SUPPRESS)
    for internal in ("--editor", "--repo", "--cache-dir", "--json-out", "--kernels-out", "--run-dir", "--data",
                     "--train-data"):
        p.add_argument(internal, help=argparse.SUPPRESS)
    p.add_argument("--score", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    unknown = [e for e in a.editors if e not in REPOS]
    if unknown:
        p.error(f"--editors: unknown {unknown}; known: {sorted(REPOS)}")
    return a


if __name__ == "__main__":
    main()
