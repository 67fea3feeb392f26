"""``lnjax edit``: keep a deployed model up to date. Each invocation applies a new batch of corrections on top of
every earlier one, with the editor state (the lifelong-normalization statistics, the memory of all past turns)
carried from one invocation to the next, and can export the edited model.

    session = EditSession.open("state/", model="path/to/hf_dir",
                               settings={"editor": "ultraedit", "targets": ("model.layers.5.mlp.down_proj",)})
    entry = session.apply(read_edits("week1.jsonl"), probes=read_probes("probe.jsonl"), min_locality=0.95)
    session.export("exported/")            # an HF checkpoint (config.json, safetensors, tokenizer.json)
    session.close()

**The state directory** (created on first use; written only by a successful invocation)::

    commits/c_000007/      the newest commit: ``state`` (Orbax: the edited target kernels and the editor state),
                           ``commit.json`` (settings, the base model's fingerprint, counters, the content hashes of
                           every applied batch, this invocation's ledger entry), ``sample.jsonl`` (a bounded
                           sample of the edits applied so far, for retention)
    commits/c_000006/      the commit before it (kept so that a damaged newest commit can be recovered by hand)
    ledger.jsonl           one JSON line per applied batch (a copy of the commits' entries; repaired on open)
    .tmp/                  commits being written (a leftover from a killed invocation is removed on open)
    .lock                  held while a session is open (two invocations never write the same state)

**A commit is atomic**: the new state is written into ``.tmp/``, every file and directory fsynced, and the
directory renamed into ``commits/`` (one rename: before it the previous state is the state, after it the new
one); the ledger line is appended after the rename, and a ledger missing the newest commit's line (a kill in
between) is completed from ``commit.json`` on the next open. A kill at any moment therefore leaves the previous
or the new state, never a mixture.

**Turns and bitwise equivalence**: an invocation cuts its edits, in file order, into turns of ``edits_per_turn``;
a partial last turn is padded with empty edits, which have no supervised position and change nothing (masked).
Each turn runs through the engine (``lnjax.engine``: ``make_turn_fn``/``make_chunk_fn``, one turn per scan) at a
shape that depends on that turn alone — its probe length rounded up to a multiple of ``LENGTH_BUCKET`` and its
supervised rows to a multiple of ``ROW_BUCKET`` — so a turn computes the same bits in whichever invocation it
runs. Hence N edits applied in k invocations that each end at a turn boundary give bit for bit the kernels and
editor state of one invocation of the same N edits (tests/test_edit.py checks it, in one process and across
processes), with the same lnjax, JAX and hardware (XLA compiles the same program). An invocation that ends with a
partial turn starts a new turn in the next one: the turn boundaries then differ from a single invocation's.

**Guards**: a batch whose content hash is in the state was applied before and is refused (``force=True``
applies it again); with ``probes`` and ``min_locality`` the probe locality is measured after every turn, and
the first turn that takes it below ``min_locality`` aborts the invocation (``LocalityGuardTripped``): nothing is
written. The base model's parameter digest (``lnjax.core.tree.digest``) is stored at creation; a different base
model is refused, as are editor settings other than the creation's.

Limitations: the editors are the lifelong-normalization family (``EDITORS``: they need only the edited layers'
features); no warm-up turns are run (StableEdit's whitening starts once its statistics allow it, as in a run
with ``--warmup-turns 0``); the duplicate check is per batch (the same edits in a different order or mixed into
another file are not detected).
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from lnjax import data as data_lib
from lnjax import editors as editors_lib
from lnjax import eval as eval_lib
from lnjax.app import hparams
from lnjax.core.errors import CheckpointError, DataError
from lnjax.core.tree import digest, frozen_and_kernels, join
from lnjax.core.turns import pack, pack_turns, probe_length
from lnjax.data import plain
from lnjax.engine import init_carry, make_chunk_fn, make_turn_fn, required_rows, slice_chunk
from lnjax.io import checkpoint

EDITORS = hparams.LN_EDITORS               # the LN-family editors (they need only the edited layers' features)
LENGTH_BUCKET, ROW_BUCKET = 8, 64           # a turn's compiled shape: its own sizes rounded up to these
KEEP_COMMITS = 2
TESTBED = "testbed"                         # the model name of the default testbed (lnjax.world.memory_testbed)
_COMMIT = re.compile(r"^c_(\d{6})$")
_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class EditRefused(ValueError):
    """An invocation refused before anything ran: a batch applied before, another base model, other settings."""


class LocalityGuardTripped(RuntimeError):
    """A turn took the probe locality below ``min_locality``; the invocation was rolled back (nothing written).
    ``report`` holds the turn, the locality measured and the threshold."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class Edit:
    """One correction: ``prompt`` → ``target``, with an optional ``paraphrase`` (same target) for GS; ``source``
    and ``row`` say where it came from."""

    prompt: str
    target: str
    paraphrase: Optional[str] = None
    source: str = ""
    row: int = -1

    def key(self) -> str:
        """What identifies the edit in the content hash and the retention sample (prompt, target, paraphrase)."""
        return json.dumps([self.prompt, self.target, self.paraphrase], ensure_ascii=False)


def read_edits(path: str, dataset: str = "auto") -> list[Edit]:
    """The edits of ``path``: a plain JSON-lines file (``prompt``, ``target``, optional ``paraphrase``) or any
    layout of ``lnjax.data``'s readers (``dataset``; ``"auto"`` detects it, ``lnjax.data.plain.detect_layout``).
    Strict: a row that cannot be an edit refuses the whole file (DataError naming file, row and field), so that
    a batch is applied entirely or not at all."""
    layout = plain.detect_layout(path) if dataset == "auto" else dataset
    records = (plain.read_jsonl(path, strict=True) if layout == plain.JSONL
               else data_lib.read(layout, path, strict=True))
    if not records:
        raise DataError(f"{path}: no edits")
    return [Edit(r.prompt, r.target, r.paraphrase, r.source, r.row) for r in records]


def read_probes(path: str, dataset: str = "auto") -> list[tuple[str, str]]:
    """Facts that must not change, ``(prompt, answer)``: a JSON-lines file of ``prompt`` and ``answer``, or the
    locality probes (``loc_prompt``, ``loc_answer``) of a file in a reader's layout."""
    layout = plain.detect_layout(path) if dataset == "auto" else dataset
    if layout == plain.JSONL:
        probes = plain.read_probes_jsonl(path)
    else:
        probes = [(r.loc_prompt, r.loc_answer) for r in data_lib.read(layout, path, strict=True)]
    if not probes:
        raise DataError(f"{path}: no probes")
    return probes


def batch_hash(edits: Sequence[Edit]) -> str:
    """SHA-256 of a batch's content (each edit's prompt, target and paraphrase, in order): the duplicate check."""
    h = hashlib.sha256()
    for e in edits:
        h.update(e.key().encode())
        h.update(b"\n")
    return h.hexdigest()


def _edit_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _round_up(x: int, m: int) -> int:
    return max(-(-x // m) * m, m)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (so that a rename after it publishes complete data)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdtemp(prefix: str, dir: str) -> str:
    """A fresh directory with the permissions of ``os.makedirs`` (``tempfile.mkdtemp`` makes it private, which an
    export or a state shared by a team should not be)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)


def _model_spec(model: Optional[str]) -> Optional[str]:
    """How a model is named in the state: None/``"testbed"`` → ``"testbed"``; a path → its absolute path."""
    if model is None or model == TESTBED:
        return TESTBED
    return os.path.abspath(model) if os.path.exists(model) else model


def _hparams_for(editor: str, spec: str, lr, alpha) -> tuple[float, float]:
    """lr and ridge α for ``editor`` on model ``spec``: as given, else ``lnjax.app.hparams.resolve``'s."""
    from lnjax.world import world_model
    world = spec == TESTBED or world_model.is_model_dir(spec)
    got = hparams.resolve(editor, dataset="world" if world else "model", turns=1, lr=lr, alpha=alpha,
                          model=None if spec == TESTBED else (spec if world else os.path.basename(spec)))
    return float(got["lr"]), float(got["alpha"])


# The settings fixed when a state is created (EditSession.open's ``settings``); None means "the default".
SETTINGS_DEFAULTS = {"editor": "ultraedit", "lr": None, "alpha": None, "options": {}, "targets": None,
                     "edits_per_turn": 100, "minibatch_size": 10, "dtype": "float32", "sample_size": 200}


def _load_model(spec: str, targets, dtype: str, log):
    """``(model, tokenizer, targets)`` of ``spec`` (``lnjax run``'s model loading)."""
    from lnjax.app.run import RunConfig, _load_model as load
    return load(RunConfig(model=None if spec == TESTBED else spec, targets=targets, dtype=dtype), log)


@functools.lru_cache(maxsize=32)
def _chunk_fn(cfg, editor: str, lr: float, alpha: float, options: str, targets: tuple, minibatch_size: int,
              rows: int):
    """The compiled one-turn scan of the engine for turns with ``rows`` row slots, shared by every session of the
    process with this model architecture and these settings (jit retraces per probe length by itself)."""
    from lnjax.models import apply_fn
    ed = editors_lib.get(editor, lr=lr, alpha=alpha, **json.loads(options))
    return make_chunk_fn(make_turn_fn(apply_fn(cfg), ed, targets, minibatch_size=minibatch_size, max_rows=rows))


class EditSession:
    """An open state directory: the base model, the edited kernels and editor state of the newest commit, and
    the ledger. ``open`` it, ``apply`` batches, ``export``, ``close`` (or use it as a context manager).

    Attributes: ``model`` (the base ``Model``), ``targets``, ``settings`` (resolved), ``editor``, ``kernels``
    (target → edited kernel (d_in, d_out)), ``editor_state``, ``counters`` (invocations, edits, turns),
    ``sample`` (retention sample: dicts with prompt, target, paraphrase, invocation, hash).
    """

    def __init__(self, directory: str, log: Callable[[str], None] = print):
        self.directory = os.path.abspath(directory)
        self.log = log
        self._lock = None

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str, model: Optional[str] = None, settings: Optional[dict] = None,
             log: Callable[[str], None] = print) -> "EditSession":
        """Open (or, when it holds no commit, prepare to create) the state in ``directory``.

        ``model``: an HF checkpoint directory, a world-model directory, a ``.gguf`` file, a built-in name
        (``smollm2``) or ``"testbed"``; None takes the state's model (the default testbed for a new state).
        ``settings``: the values asked for (keys of ``SETTINGS_DEFAULTS``); for a new state the others take their
        defaults, for an existing one each given value must equal the saved one (``EditRefused`` otherwise).
        A different base model (parameter digest) is refused with ``EditRefused``.
        """
        self = cls(directory, log)
        asked = dict(settings or {})
        unknown = set(asked) - set(SETTINGS_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(SETTINGS_DEFAULTS)}")
        os.makedirs(os.path.join(self.directory, "commits"), exist_ok=True)
        self._acquire_lock()
        try:
            self._clean_tmp()
            newest = self._commits()[-1:] or [None]
            saved = self._read_commit(newest[0]) if newest[0] is not None else None
            if saved is None:
                self._create(model, asked)
            else:
                self._resume(saved, model, asked)
        except BaseException:
            self.close()
            raise
        return self

    def _acquire_lock(self) -> None:
        fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EditRefused(f"{self.directory}: another lnjax edit has this state open") from None
        self._lock = fd

    def close(self) -> None:
        """Release the state's lock (the session's arrays stay usable)."""
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _clean_tmp(self) -> None:
        tmp = os.path.join(self.directory, ".tmp")
        if os.path.isdir(tmp) and os.listdir(tmp):
            self.log(f"{self.directory}: removing what a killed invocation left unfinished in .tmp/")
            shutil.rmtree(tmp, ignore_errors=True)

    def _commits(self) -> list[int]:
        found = (_COMMIT.match(n) for n in os.listdir(os.path.join(self.directory, "commits")))
        return sorted(int(m.group(1)) for m in found if m)

    def _commit_path(self, number: int) -> str:
        return os.path.join(self.directory, "commits", f"c_{number:06d}")

    def _read_commit(self, number: int) -> dict:
        path = os.path.join(self._commit_path(number), "commit.json")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable ({e}); the commit before it, if any, is in "
                                  f"{os.path.dirname(os.path.dirname(path))}") from None

    def _setup_model(self, spec: str, targets, dtype: str) -> None:
        t0 = time.time()
        self.model, self.tokenizer, self.targets = _load_model(spec, targets, dtype, self.log)
        self.targets = tuple(self.targets)
        self.fingerprint = digest(self.model.params)
        self.load_seconds = time.time() - t0

    def _create(self, model: Optional[str], asked: dict) -> None:
        s = {**SETTINGS_DEFAULTS, **asked}
        if s["editor"] not in EDITORS:
            raise EditRefused(f"editor {s['editor']!r} cannot keep a model up to date; known: {list(EDITORS)}")
        if int(s["edits_per_turn"]) < 1 or int(s["sample_size"]) < 0:
            raise ValueError("edits_per_turn must be >= 1 and sample_size >= 0")
        spec = _model_spec(model)
        self._setup_model(spec, s["targets"], s["dtype"])
        s["lr"], s["alpha"] = _hparams_for(s["editor"], spec, s["lr"], s["alpha"])
        s["targets"] = list(self.targets)
        s["options"] = dict(s["options"] or {})
        self.settings, self.spec = s, spec
        try:
            self.editor = editors_lib.get(s["editor"], lr=s["lr"], alpha=s["alpha"], **s["options"])
        except TypeError as e:  # an option the editor's factory does not take
            raise ValueError(f"editor {s['editor']!r}: {e}") from None
        _, self.kernels = frozen_and_kernels(self.model.params, self.targets)
        self.editor_state = self.editor.init({t: tuple(k.shape) for t, k in self.kernels.items()})
        self.counters = {"invocations": 0, "edits": 0, "turns": 0}
        self.applied, self.sample, self.commit = [], [], 0

    def _resume(self, saved: dict, model: Optional[str], asked: dict) -> None:
        s = saved["settings"]
        diffs = {k: (s.get(k), _json_value(v)) for k, v in asked.items() if _json_value(v) != s.get(k)}
        if diffs:
            raise EditRefused(f"{self.directory}: settings differ from the ones the state was created with "
                              f"(saved, asked): {json.dumps(diffs)}")
        spec = saved["model"] if model is None else _model_spec(model)
        self._setup_model(spec, tuple(s["targets"]), s["dtype"])
        if self.fingerprint != saved["base_fingerprint"]:
            raise EditRefused(f"{self.directory}: the state was made on top of another base model ({saved['model']},"
                              f" parameter digest {saved['base_fingerprint'][:16]}…); {spec} has digest "
                              f"{self.fingerprint[:16]}…")
        self.settings, self.spec = s, saved["model"]
        self.editor = editors_lib.get(s["editor"], lr=s["lr"], alpha=s["alpha"], **s["options"])
        _, kernels = frozen_and_kernels(self.model.params, self.targets)
        like = {"kernels": kernels,
                "editor_state": self.editor.init({t: tuple(k.shape) for t, k in kernels.items()})}
        number = saved["commit"]
        got = checkpoint.load(os.path.join(self._commit_path(number), "state"), like)
        self.kernels, self.editor_state = got["kernels"], got["editor_state"]
        self.counters, self.applied, self.commit = dict(saved["counters"]), list(saved["applied"]), number
        with open(os.path.join(self._commit_path(number), "sample.jsonl"), encoding="utf-8") as f:
            self.sample = [json.loads(line) for line in f if line.strip()]
        self._repair_ledger()

    # -- the ledger ----------------------------------------------------------------------------------------
    @property
    def ledger_path(self) -> str:
        return os.path.join(self.directory, "ledger.jsonl")

    def history(self) -> list[dict]:
        """The ledger: one dict per applied batch, oldest first (see ``apply`` for the fields)."""
        return read_history(self.directory)

    def _repair_ledger(self) -> None:
        """Complete the ledger from the commits: drop a torn last line, append the entries of commits it lacks
        (a kill between a commit's rename and its ledger line)."""
        path = self.ledger_path
        raw = open(path, "rb").read() if os.path.exists(path) else b""
        if raw and not raw.endswith(b"\n"):
            raw = raw[:raw.rfind(b"\n") + 1]
            with open(path, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        have = {json.loads(line)["invocation"] for line in raw.decode("utf-8").splitlines() if line.strip()}
        for number in self._commits():
            entry = self._read_commit(number)["entry"]
            if entry["invocation"] not in have:
                self.log(f"{self.directory}: ledger line of invocation {entry['invocation']} restored from its commit")
                self._append_ledger(entry)

    def _append_ledger(self, entry: dict) -> None:
        with open(self.ledger_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- the edited model ----------------------------------------------------------------------------------
    @property
    def params(self):
        """The edited model's full parameters (the base with the edited target kernels)."""
        frozen, _ = frozen_and_kernels(self.model.params, self.targets)
        return join(frozen, self.kernels)

    # -- applying a batch ----------------------------------------------------------------------------------
    def _turn_fn(self, rows: int):
        s = self.settings
        return _chunk_fn(self.model.config, s["editor"], s["lr"], s["alpha"], json.dumps(s["options"], sort_keys=True),
                         self.targets, s["minibatch_size"], rows)

    def _max_length(self) -> int:
        """The longest probe accepted: the model's context (``lnjax run``'s ``max_probe_length``)."""
        from lnjax.app.run import RunConfig, max_probe_length
        return max_probe_length(RunConfig(), self.model)

    def _tokenize(self, edits: Sequence[Edit]):
        longest = self._max_length()
        enc = lambda p, a, e, field: data_lib.encode_probe(self.tokenizer, p, a, e.source, e.row, field, "target",
                                                           longest)
        pairs = [enc(e.prompt, e.target, e, "prompt") for e in edits]
        para = [(i, enc(e.paraphrase, e.target, e, "paraphrase")) for i, e in enumerate(edits) if e.paraphrase]
        return pairs, para

    def _accuracy(self, params, pairs) -> np.ndarray:
        """Teacher-forced token accuracy per pair [n] (the ES/GS protocol)."""
        if not pairs:
            return np.zeros((0,))
        batch = pack(pairs)
        return eval_lib.token_accuracy(self._predict(params, batch), np.asarray(batch.labels))

    def _predict(self, params, batch) -> np.ndarray:
        """Teacher-forced argmax [n, L] at the supervised positions (``lnjax.eval.predictions``)."""
        return eval_lib.predictions(self.model.apply, params, batch)

    def apply(self, edits: Sequence[Edit], *, probes: Optional[Sequence[tuple[str, str]]] = None,
              min_locality: Optional[float] = None, force: bool = False, source: str = "",
              progress: bool = True) -> dict:
        """Apply ``edits`` on top of the state, commit and return the ledger entry.

        ``probes``: facts ``(prompt, answer)`` that must not change; their locality is the fraction of answer
        positions where the edited model's teacher-forced argmax equals the base model's. With ``min_locality``
        it is measured after every turn and a turn that takes it below aborts the invocation
        (``LocalityGuardTripped``, nothing written). A batch applied before is refused (``EditRefused``) unless
        ``force``.

        The entry: ``invocation``, ``time`` (UTC), ``source``, ``sha256`` (``batch_hash``), ``edits``, ``turns``,
        ``padded_slots``, ``forced``, totals (``total_edits``, ``total_turns``), ``metrics`` (``efficacy`` and
        ``generalization`` of the new edits — teacher-forced, after the invocation; ``generalization_n``;
        ``retention`` and ``retention_n``: efficacy on the sample of earlier edits; ``locality``, ``locality_min``
        (over turns, with a guard) and ``locality_n``; ``rejected_turns``: turns with a non-finite shift that the
        editor rejected) and ``seconds`` (load, edit, evaluate).
        """
        if self._lock is None:
            raise RuntimeError("the session is closed")
        edits = list(edits)
        sha, before = self._check_batch(edits, probes, min_locality, force, source)
        t0 = time.time()
        pairs, para = self._tokenize(edits)
        locality = self._locality_fn(probes)
        E = int(self.settings["edits_per_turn"])
        n_turns = -(-len(pairs) // E)
        frozen, carry = init_carry(join(frozen_and_kernels(self.model.params, self.targets)[0], self.kernels),
                                   self.editor, self.targets, self.editor_state)
        rejected0 = int(self.editor_state.rejected)
        carry, loc_min = self._run_turns(pairs, frozen, carry, E, n_turns, locality, min_locality, source, progress)
        jax.block_until_ready(carry.kernels)
        t_edit = time.time() - t0
        params = join(frozen, carry.kernels)
        metrics, earlier = self._evaluate(params, pairs, para, edits, probes, locality, loc_min)
        metrics["rejected_turns"] = int(carry.editor_state.rejected) - rejected0
        t_eval = time.time() - t0 - t_edit
        invocation = self.counters["invocations"] + 1
        counters = {"invocations": invocation, "edits": self.counters["edits"] + len(edits),
                    "turns": self.counters["turns"] + n_turns}
        entry = {"invocation": invocation, "time": _now(), "source": source, "sha256": sha, "edits": len(edits),
                 "turns": n_turns, "padded_slots": n_turns * E - len(edits), "forced": before is not None,
                 "total_edits": counters["edits"], "total_turns": counters["turns"], "metrics": metrics,
                 "seconds": {"load": round(getattr(self, "load_seconds", 0.0), 2), "edit": round(t_edit, 2),
                             "evaluate": round(t_eval, 2)}}
        sample = self._next_sample(earlier, edits, invocation)
        applied = self.applied + [{"sha256": sha, "invocation": invocation, "time": entry["time"],
                                   "source": source}]
        self._commit(invocation, carry.kernels, carry.editor_state, counters, applied, sample, entry)
        self.kernels, self.editor_state, self.counters = carry.kernels, carry.editor_state, counters
        self.applied, self.sample, self.commit, self.load_seconds = applied, sample, invocation, 0.0
        return entry

    def _check_batch(self, edits: list, probes, min_locality, force: bool, source: str):
        """``(sha256, earlier application or None)`` of a batch ``apply`` may apply; raises as ``apply`` says."""
        if not edits:
            raise DataError(f"{source or 'edits'}: no edits to apply")
        sha = batch_hash(edits)
        before = next((a for a in self.applied if a["sha256"] == sha), None)
        if before is not None and not force:
            raise EditRefused(f"{source or 'this batch'}: the same {len(edits)} edits were applied in invocation "
                              f"{before['invocation']} ({before['time']}, {before['source']}); --force applies "
                              "them again")
        if min_locality is not None and not probes:
            raise ValueError("min_locality needs probes (--probe FILE)")
        return sha, before

    def _locality_fn(self, probes):
        """``params -> locality`` on ``probes`` against the base model's predictions (computed here)."""
        probe_batch = pack([data_lib.encode_probe(self.tokenizer, p, a, "probes", i, "prompt", "answer",
                                                  self._max_length())
                            for i, (p, a) in enumerate(probes or [])]) if probes else None
        base_probe = self._predict(self.model.params, probe_batch) if probes else None

        def locality(params) -> float:
            preds = self._predict(params, probe_batch)
            return float(eval_lib.agreement(preds, base_probe, np.asarray(probe_batch.labels)).mean())
        return locality

    def _run_turns(self, pairs, frozen, carry, E: int, n_turns: int, locality, min_locality, source: str,
                   progress: bool):
        """Run the edit turns; ``(carry, minimum locality over turns or None)``. Raises LocalityGuardTripped."""
        loc_min = None
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_turns, desc="edit turns", unit="turn")
        try:
            for t in range(n_turns):
                ex = pairs[t * E:(t + 1) * E]
                length = _round_up(max(probe_length(*e) for e in ex), LENGTH_BUCKET)
                batch, _ = pack_turns(ex, E, length)
                rows = _round_up(required_rows(batch), ROW_BUCKET)
                carry, _ = self._turn_fn(rows)(carry, frozen, slice_chunk(batch, np.zeros(1, bool), 0, 1))
                if min_locality is not None:
                    loc = locality(join(frozen, carry.kernels))
                    loc_min = loc if loc_min is None else min(loc_min, loc)
                    if loc < min_locality:
                        report = {"turn": t + 1, "turns": n_turns, "locality": loc, "min_locality": min_locality,
                                  "edits_in_turn": len(ex)}
                        raise LocalityGuardTripped(
                            f"{source or 'batch'}: turn {t + 1} of {n_turns} took the probe locality to {loc:.4f}, "
                            f"below --min-locality {min_locality}; the batch was rolled back (state unchanged)",
                            report)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return carry, loc_min

    def _evaluate(self, params, pairs, para, edits, probes, locality, loc_min):
        """``(metrics without rejected_turns, earlier sample)`` of the edited ``params``."""
        es = self._accuracy(params, pairs)
        gs = self._accuracy(params, [p for _, p in para])
        new_prompts = {e.prompt for e in edits}
        earlier = [s for s in self.sample if s["prompt"] not in new_prompts]  # superseded ones are not retention
        ret = self._accuracy(params, [data_lib.encode_probe(self.tokenizer, s["prompt"], s["target"], "sample", i,
                                                            "prompt", "target") for i, s in enumerate(earlier)])
        metrics = {"efficacy": float(es.mean()), "generalization": float(gs.mean()) if len(gs) else None,
                   "generalization_n": int(len(gs)), "retention": float(ret.mean()) if len(ret) else None,
                   "retention_n": int(len(ret)), "locality": locality(params) if probes else None,
                   "locality_min": loc_min, "locality_n": len(probes or [])}
        return metrics, earlier

    def _next_sample(self, earlier: list[dict], edits: Sequence[Edit], invocation: int) -> list[dict]:
        """The retention sample after this batch: the ``sample_size`` applied edits with the smallest content
        hashes (a uniform sample of every edit applied so far that does not depend on how they were batched),
        the latest edit of a prompt replacing earlier ones."""
        new = {}
        for e in edits:
            new[e.prompt] = {"prompt": e.prompt, "target": e.target, "paraphrase": e.paraphrase,
                             "invocation": invocation, "hash": _edit_hash(e.key())}
        pool = earlier + list(new.values())
        return sorted(pool, key=lambda s: s["hash"])[:int(self.settings["sample_size"])]

    def _commit(self, number: int, kernels, editor_state, counters, applied, sample, entry) -> None:
        tmp_root = os.path.join(self.directory, ".tmp")
        os.makedirs(tmp_root, exist_ok=True)
        tmp = _mkdtemp(prefix=f"c_{number:06d}.", dir=tmp_root)
        checkpoint.save(os.path.join(tmp, "state"), {"kernels": kernels, "editor_state": editor_state})
        with open(os.path.join(tmp, "sample.jsonl"), "w", encoding="utf-8") as f:
            for s in sample:
                f.write(json.dumps(s, ensure_ascii=False, sort_keys=True) + "\n")
        _write_json(os.path.join(tmp, "commit.json"),
                    {"commit": number, "settings": self.settings, "model": self.spec,
                     "base_fingerprint": self.fingerprint, "counters": counters, "applied": applied,
                     "entry": entry})
        _fsync_tree(tmp)
        commits = os.path.join(self.directory, "commits")
        os.rename(tmp, self._commit_path(number))   # the commit point
        _fsync_dir(commits)
        self._append_ledger(entry)
        for old in self._commits()[:-KEEP_COMMITS]:
            trash = tempfile.mkdtemp(prefix="old.", dir=tmp_root)
            os.rename(self._commit_path(old), os.path.join(trash, "c"))  # leaves commits/ in one step
            shutil.rmtree(trash, ignore_errors=True)

    # -- export --------------------------------------------------------------------------------------------
    def export(self, out_dir: str, force: bool = False) -> str:
        """Write the edited model to ``out_dir``: an HF checkpoint (``config.json``, safetensors,
        ``tokenizer.json``) that transformers loads, or — for models HF cannot hold (the default testbed's fact
        memory) — a world-model directory that ``lnjax edit/run --model`` loads. Plus ``lnjax_edit.json`` (the
        state it came from). Written to a temporary directory and renamed; an existing ``out_dir`` is replaced
        only when it holds an earlier export (or with ``force``)."""
        out_dir = os.path.abspath(out_dir)
        if os.path.exists(out_dir) and not force and not os.path.exists(os.path.join(out_dir, "lnjax_edit.json")):
            raise EditRefused(f"{out_dir}: exists and is not an lnjax edit export; remove it or choose another")
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = _mkdtemp(prefix=os.path.basename(out_dir) + ".tmp", dir=parent)
        try:
            params = self.params
            if self.model.config.memory_layers:
                from lnjax.world import world_model
                world_model.save(tmp, self.model.config, params, {"edited_by": "lnjax edit", "state": self.directory})
                fmt = "world_model"
            else:
                from lnjax.io import hf
                hf.save(self.model, params, tmp)
                fmt = "hf"
            self.tokenizer.save(tmp)
            for name in _HF_SIDE_FILES if fmt == "hf" and os.path.isdir(self.spec) else ():
                if os.path.exists(os.path.join(self.spec, name)):  # the source checkpoint's own, unchanged
                    shutil.copy2(os.path.join(self.spec, name), os.path.join(tmp, name))
            _write_json(os.path.join(tmp, "lnjax_edit.json"),
                        {"state": self.directory, "format": fmt, "base_model": self.spec,
                         "base_fingerprint": self.fingerprint, "edited_fingerprint": digest(self.kernels),
                         "settings": self.settings, "counters": self.counters, "commit": self.commit})
            _fsync_tree(tmp)
            if os.path.exists(out_dir):
                old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old", dir=parent)
                os.rename(out_dir, os.path.join(old, "x"))
                os.rename(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir


def _json_value(v):
    """A setting as the state's JSON holds it (tuples as lists)."""
    return json.loads(json.dumps(list(v) if isinstance(v, tuple) else v))


def format_history(entries: Sequence[dict]) -> str:
    """The ledger as a table: one row per invocation."""
    def num(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    head = (f"{'#':>3}  {'time (UTC)':<20} {'edits':>6} {'turns':>5} {'total':>7} {'ES':>6} {'GS':>6} "
            f"{'retain':>6} {'(n)':>5} {'loc':>6} {'sec':>6}  source")
    lines = [head, "-" * len(head)]
    for e in entries:
        m = e["metrics"]
        secs = sum(v for v in e["seconds"].values())
        lines.append(f"{e['invocation']:>3}  {e['time']:<20} {e['edits']:>6} {e['turns']:>5} {e['total_edits']:>7} "
                     f"{num(m['efficacy']):>6} {num(m['generalization']):>6} {num(m['retention']):>6} "
                     f"{m['retention_n']:>5} {num(m['locality']):>6} {secs:>6.1f}  "
                     f"{e['source']}{' (forced)' if e.get('forced') else ''}")
    return "\n".join(lines)


def plot_history(entries: Sequence[dict], path: str) -> str:
    """A PNG of the metrics over invocations: ES and GS of each batch's new edits, retention of the sample of
    earlier edits, probe locality; x = edits applied so far. Returns ``path``."""
    from lnjax.app.plots import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = [e["total_edits"] for e in entries]
    for key, label in (("retention", "retention (earlier edits)"), ("efficacy", "ES (new edits)"),
                       ("generalization", "GS (new edits)"), ("locality", "probe locality")):
        y = [np.nan if e["metrics"][key] is None else e["metrics"][key] for e in entries]
        ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel("edits applied so far")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("lnjax edit: each invocation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_history(directory: str) -> list[dict]:
    """The ledger of the state in ``directory``, completed (without writing) with the entries of commits whose
    ledger line a kill lost; a torn last line is ignored."""
    entries = {}
    path = os.path.join(directory, "ledger.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n") and line.strip():
                    e = json.loads(line)
                    entries[e["invocation"]] = e
    commits = os.path.join(directory, "commits")
    for name in sorted(os.listdir(commits)) if os.path.isdir(commits) else []:
        if _COMMIT.match(name):
            try:
                with open(os.path.join(commits, name, "commit.json"), encoding="utf-8") as f:
                    e = json.load(f)["entry"]
            except (OSError, json.JSONDecodeError, KeyError):
                continue
            entries.setdefault(e["invocation"], e)
    return [entries[k] for k in sorted(entries)]


def format_entry(entry: dict, state: str = "") -> str:
    """What an invocation prints: the ledger entry in words."""
    m, s = entry["metrics"], entry["seconds"]
    num = lambda v: "-" if v is None else f"{v:.3f}"
    padded = f" (the last padded with {entry['padded_slots']} empty slots)" if entry["padded_slots"] else ""
    lines = [f"applied {entry['edits']} edits from {entry['source'] or 'the batch'} in {entry['turns']} turn(s)"
             f"{padded}: invocation {entry['invocation']}, {entry['total_edits']} edits in all"
             f"{' (forced: applied before)' if entry['forced'] else ''}",
             f"  new edits:      ES {num(m['efficacy'])}  GS {num(m['generalization'])} "
             f"({m['generalization_n']} paraphrases)",
             f"  earlier edits:  retention {num(m['retention'])} on a sample of {m['retention_n']}",
             f"  probe facts:    locality {num(m['locality'])} ({m['locality_n']} facts"
             f"{', lowest after a turn ' + num(m['locality_min']) if m['locality_min'] is not None else ''})",
             "  seconds:        " + ", ".join(f"{k} {v:.1f}" for k, v in s.items())]
    if m["rejected_turns"]:
        lines.append(f"  {m['rejected_turns']} turn(s) had a non-finite shift and were skipped by the editor")
    if state:
        lines.append(f"state: {state}")
    return "\n".join(lines)


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--editor-option``; VALUE parsed as JSON when it is JSON (numbers, true/false)."""
    if "=" not in text:
        raise ValueError(f"--editor-option {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_cli(sub) -> None:
    """Register ``lnjax edit`` on the CLI's subparsers."""
    from lnjax.data import DATASETS
    e = sub.add_parser(
        "edit", help="apply a batch of corrections on top of the earlier ones kept in --state; export the model",
        description="Keep a model up to date: each invocation applies the edits of --edits on top of every earlier "
                    "invocation's, with the editor state (the lifelong-normalization statistics) kept in --state, "
                    "and reports ES/GS of the new edits, retention of earlier ones and the locality of --probe "
                    "facts. The editor settings are fixed when --state is created. Exit status: 0 applied, 1 "
                    "refused (bad input, a batch applied before, another base model or other settings), 3 rolled "
                    "back by --min-locality (the state unchanged).")
    e.add_argument("--state", required=True, metavar="DIR", help="state directory (created on first use)")
    e.add_argument("--model", default=None,
                   help="HF checkpoint directory, world-model directory, .gguf file, built-in name (smollm2) or "
                        "'testbed'; default: the state's model, for a new state the default testbed")
    e.add_argument("--edits", default=None, metavar="FILE",
                   help="the batch: JSON lines of prompt, target, paraphrase (optional), or a JSON array in any "
                        "reader's layout (" + ", ".join(DATASETS) + ")")
    e.add_argument("--format", default="auto", choices=("auto", "jsonl") + DATASETS,
                   help="layout of --edits (default: detected; --probe is always detected)")
    e.add_argument("--probe", default=None, metavar="FILE",
                   help="facts that must not change: JSON lines of prompt and answer (or a reader layout's "
                        "locality probes)")
    e.add_argument("--min-locality", type=float, default=None,
                   help="roll the batch back when a turn takes the probe locality below this")
    e.add_argument("--export", default=None, metavar="DIR",
                   help="write the edited model here (HF safetensors checkpoint; a world-model directory for the "
                        "default testbed)")
    e.add_argument("--force", action="store_true", help="apply a batch that was applied before")
    e.add_argument("--history", action="store_true", help="print the ledger and plot it (--plot)")
    e.add_argument("--plot", default=None, metavar="PNG", help="--history's figure (default DIR/history.png)")
    g = e.add_argument_group("settings fixed when the state is created (later invocations may repeat them)")
    g.add_argument("--editor", default=None, help=f"one of {', '.join(EDITORS)} (default ultraedit)")
    g.add_argument("--lr", type=float, default=None, help="editor learning rate (default: lnjax.app.hparams)")
    g.add_argument("--alpha", type=float, default=None, help="ridge strength (default: lnjax.app.hparams)")
    g.add_argument("--editor-option", action="append", default=None, metavar="KEY=VALUE",
                   help="extra editor factory option, e.g. whiten=false (repeatable)")
    g.add_argument("--targets", default=None, help="comma-separated HF module paths to edit (needed for an HF "
                                                   "directory; the testbed and built-in models have defaults)")
    g.add_argument("--edits-per-turn", type=int, default=None, help="edits per turn (default 100)")
    g.add_argument("--minibatch-size", type=int, default=None, help="edits per mini-batch in a turn (default 10)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="weights dtype (default float32)")
    g.add_argument("--sample-size", type=int, default=None,
                   help="earlier edits kept for the retention measurement (default 200)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def cli_main(args) -> int:
    """``lnjax edit``: see ``add_cli``. Refusals and bad input raise (ValueError family: ``lnjax.app.cli.main``
    prints them as one line, exit status 1); a rollback by the locality guard returns 3."""
    if not (args.edits or args.export or args.history):
        raise ValueError("edit: nothing to do: give --edits FILE, --export DIR or --history")
    if args.edits or args.export:
        rc = _apply_and_export(args)
        if rc:
            return rc
    if args.history:  # reads the state's files only: no model is loaded
        entries = read_history(args.state)
        if not entries:
            raise ValueError(f"{args.state}: no batch applied yet")
        print(format_history(entries))
        print(f"plot: {plot_history(entries, args.plot or os.path.join(args.state, 'history.png'))}")
    return 0


def _apply_and_export(args) -> int:
    from lnjax.core.cpu_threads import limit_lapack_threads_on_cpu
    limit_lapack_threads_on_cpu(1)  # as lnjax run does: SciPy's spinning LAPACK threads slow every turn
    asked = {"editor": args.editor, "lr": args.lr, "alpha": args.alpha,
             "options": dict(_option(o) for o in args.editor_option) if args.editor_option else None,
             "targets": tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None,
             "edits_per_turn": args.edits_per_turn, "minibatch_size": args.minibatch_size, "dtype": args.dtype,
             "sample_size": args.sample_size}
    try:
        edits = read_edits(args.edits, args.format) if args.edits else None
        probes = read_probes(args.probe) if args.probe else None
        with EditSession.open(args.state, model=args.model,
                              settings={k: v for k, v in asked.items() if v is not None}) as session:
            if edits is not None:
                entry = session.apply(edits, probes=probes, min_locality=args.min_locality, force=args.force,
                                      source=args.edits, progress=not args.quiet)
                print(format_entry(entry, session.directory))
            if args.export:
                print(f"exported the edited model ({session.counters['edits']} edits) to "
                      f"{session.export(args.export)}")
    except LocalityGuardTripped as e:  # a refusal the user asked for, not an error: its own exit status
        print(f"lnjax edit: {e}", file=sys.stderr)
        return 3
    return 0
