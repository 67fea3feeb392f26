"""Orbax checkpoints of editor state and of whole runs (v1 API).

- ``save(path, tree)`` / ``load(path, like)``: any pytree (an ``EditorState``, a ``RunCarry``), restored into the
  structure, shapes and dtypes of ``like``; a mismatch or a damaged checkpoint raises ``CheckpointError``.
- ``RunCheckpointer``: numbered checkpoints of a run (carry + cursor + config + host state) in one directory,
  written atomically (Orbax writes to a temporary name and renames on success, so a crash mid-save never
  leaves a checkpoint that loads), the newest ``keep`` kept; ``latest`` falls back to the previous good one when
  the newest is damaged.
- ``DiagnosticsLog``: the per-turn diagnostics streamed to disk chunk by chunk (one small ``.npz`` per chunk),
  so a checkpoint costs the same at turn 20,000 as at turn 10; a resume drops the chunks written after the
  checkpoint it continues from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Any, Optional

import jax
import numpy as np

from lnjax.core.placement import put, to_host


from lnjax.core.errors import CheckpointError  # noqa: F401  (raised here; its home is lnjax.core.errors)


def _ocp():
    from orbax.checkpoint import v1 as ocp
    return ocp


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): v for p, v in leaves}


def save(path: str, tree: Any, metadata: Optional[dict] = None) -> str:
    """Save ``tree`` (leaves: arrays or numpy arrays) at ``path``, replacing what is there; returns ``path``."""
    path = os.path.abspath(path)
    flat = to_host(_flat(tree))  # whole arrays, also those split over several processes' devices
    _ocp().save(path, {"leaves": flat}, overwrite=True, custom_metadata=metadata or {})
    return path


def _load_flat(path: str) -> dict:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no checkpoint here")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _ocp().load(path)["leaves"]
    except Exception as e:  # Orbax raises many types for damaged directories
        raise CheckpointError(f"{path}: damaged or incomplete checkpoint ({type(e).__name__}: {e})") from None


def load(path: str, like: Any) -> Any:
    """Load the checkpoint at ``path`` into the structure of ``like`` (shapes and dtypes checked)."""
    flat = _load_flat(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    out = []
    for p, ref in leaves:
        key = jax.tree_util.keystr(p)
        if key not in flat:
            raise CheckpointError(f"{path}: item {key} is missing")
        arr = np.asarray(flat[key])
        want_shape, want_dtype = tuple(np.shape(ref)), np.dtype(getattr(ref, "dtype", arr.dtype))
        if arr.shape != want_shape or arr.dtype != want_dtype:
            raise CheckpointError(f"{path}: item {key} has shape {arr.shape} {arr.dtype}, expected "
                                  f"{want_shape} {want_dtype}")
        # placed as ``like`` is (in a multi-process run, each process builds its own shards)
        out.append(put(arr, ref.sharding) if isinstance(ref, jax.Array) else jax.numpy.asarray(arr))
    extra = set(flat) - {jax.tree_util.keystr(p) for p, _ in leaves}
    if extra:
        raise CheckpointError(f"{path}: unexpected items {sorted(extra)[:5]}")
    return jax.tree_util.tree_unflatten(treedef, out)


def metadata(path: str) -> dict:
    """The custom metadata saved with the checkpoint at ``path``."""
    try:
        meta = _ocp().metadata(os.path.abspath(path))
        return dict(meta.custom_metadata or {})
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None


def _numbered(directory: str, pattern: re.Pattern) -> list[tuple[int, ...]]:
    """The integer groups of every entry of ``directory`` whose name matches ``pattern``, sorted."""
    found = (pattern.match(name) for name in os.listdir(directory))
    return sorted(tuple(int(g) for g in m.groups()) for m in found if m)


class DiagnosticsLog:
    """Per-turn diagnostics of a run as one ``diag_<start>_<stop>.npz`` per chunk in ``directory``."""

    PATTERN = re.compile(r"^diag_(\d{8})_(\d{8})\.npz$")

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)

    def spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` turn spans of the chunks on disk, in order."""
        return _numbered(self.directory, self.PATTERN)

    def _file(self, start: int, stop: int) -> str:
        return os.path.join(self.directory, f"diag_{start:08d}_{stop:08d}.npz")

    def append(self, start: int, diagnostics: dict) -> None:
        """Write the diagnostics of turns ``[start, start + n)`` (arrays with leading axis n), atomically."""
        if jax.process_index() != 0:  # multi-host: one writer for the shared directory
            return
        n = len(next(iter(diagnostics.values()))) if diagnostics else 0
        path = self._file(start, start + n)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in diagnostics.items()})
        os.replace(tmp, path)

    def truncate(self, turns_done: int) -> None:
        """Delete chunks that end after ``turns_done`` (written after the checkpoint being resumed)."""
        for start, stop in self.spans():
            if stop > turns_done:
                os.remove(self._file(start, stop))

    def read(self, turns_done: int) -> dict:
        """The diagnostics of turns ``[0, turns_done)`` concatenated; CheckpointError if a chunk is missing."""
        parts, cursor = [], 0
        for start, stop in self.spans():
            if stop > turns_done:
                break
            if start != cursor:
                raise CheckpointError(f"{self.directory}: diagnostics of turns {cursor}..{start} are missing")
            try:
                with np.load(self._file(start, stop)) as z:
                    parts.append({k: z[k] for k in z.files})
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self._file(start, stop)}: unreadable diagnostics ({e})") from None
            cursor = stop
        if cursor != turns_done:
            raise CheckpointError(f"{self.directory}: diagnostics stop at turn {cursor}, the checkpoint is at "
                                  f"{turns_done}")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


class RunCheckpointer:
    """Checkpoints ``turn_<n>`` of one run in ``directory`` and its ``diagnostics`` log; see the module
    docstring."""

    PATTERN = re.compile(r"^turn_(\d{8})$")

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        os.makedirs(self.directory, exist_ok=True)
        self.diagnostics = DiagnosticsLog(os.path.join(self.directory, "diagnostics"))

    def steps(self) -> list[int]:
        """Turn counts of the checkpoints present, oldest first."""
        return [n for (n,) in _numbered(self.directory, self.PATTERN)]

    def path(self, turns_done: int) -> str:
        return os.path.join(self.directory, f"turn_{turns_done:08d}")

    def save(self, turns_done: int, carry: Any, config: dict, host_state: Optional[dict] = None) -> str:
        """Save the run after ``turns_done`` scheduled turns (with the JSON-able ``host_state``; diagnostics go
        to ``self.diagnostics`` chunk by chunk); prune all but the newest ``keep``."""
        path = save(self.path(turns_done), {"carry": carry}, {"turns_done": turns_done, "config": config,
                                                              "host_state": host_state or {}})
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return path

    def drop_states(self) -> None:
        """Delete every ``turn_<n>`` checkpoint, keeping the diagnostics: for a run that is finished and saved
        elsewhere, whose resume states would only take disk (a meta-training's are 1-5 GB)."""
        for step in self.steps():
            shutil.rmtree(self.path(step), ignore_errors=True)

    def latest(self, like_carry: Any, config: dict, log=print) -> Optional[tuple[int, Any, dict, dict]]:
        """``(turns_done, carry, diagnostics, host_state)`` of the newest loadable checkpoint, or None.

        A checkpoint saved with a different ``config`` is refused with the differences listed (CheckpointError);
        a damaged one is reported through ``log`` and the previous one is tried. Diagnostics chunks written after
        the returned checkpoint are deleted.
        """
        for step in reversed(self.steps()):
            path = self.path(step)
            try:
                meta = metadata(path)
                saved = meta.get("config")
                if saved is not None and saved != config:
                    diffs = {k: (saved.get(k), config.get(k)) for k in sorted(set(saved) | set(config))
                             if saved.get(k) != config.get(k)}
                    raise ConfigMismatch(f"{path}: the run was saved with a different config; differences "
                                         f"(saved, now): {json.dumps(diffs)}")
                tree = load(path, {"carry": like_carry})
                turns_done = int(meta["turns_done"])
                diagnostics = self.diagnostics.read(turns_done)
                self.diagnostics.truncate(turns_done)
                return turns_done, tree["carry"], diagnostics, dict(meta.get("host_state") or {})
            except ConfigMismatch:
                raise
            except (CheckpointError, KeyError) as e:
                log(f"checkpoint {path} is not usable ({e}); trying an older one")
        return None


class ConfigMismatch(CheckpointError):
    """A resume asked for with a config other than the one the checkpoint was saved with."""


# The resume protocol of ``lnjax run`` (one directory per run, one sub-directory per editor):
#   <dir>/config.json            the run's config, written before the first editor starts
#   <dir>/<editor>/turn_*        RunCheckpointer checkpoints of the editor being run
#   <dir>/<editor>/done.json     written when an editor finished: its metrics, timings and diagnostics lines
CONFIG_FILE = "config.json"
DONE_FILE = "done.json"


def save_run_config(directory: str, config: dict) -> str:
    """Write the run's JSON ``config`` as ``directory/config.json``; returns the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path


def resume_config(directory: str, given: dict, defaults: dict) -> dict:
    """The config saved for the run checkpointed in ``directory``, checked against a resume request.

    ``given`` is the config the resume was asked with and ``defaults`` the config of no options: every value of
    ``given`` that differs from ``defaults`` was asked for explicitly and must equal the saved one
    (``ConfigMismatch`` listing the differences otherwise). CheckpointError when no run is saved there.
    """
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no checkpointed run there")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        raise CheckpointError(f"{path}: unreadable saved config ({e})") from None
    asked = {k: v for k, v in given.items() if v != defaults.get(k)}
    diffs = {k: (saved.get(k), v) for k, v in asked.items() if saved.get(k) != v}
    if diffs:
        raise ConfigMismatch(f"{directory}: flags differ from the saved run (saved, given): {diffs}")
    return saved


def finished(directory: Optional[str]) -> Optional[dict]:
    """The record ``mark_finished`` left in ``directory``, or None when the editor there has not finished."""
    path = os.path.join(directory, DONE_FILE) if directory else None
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def mark_finished(directory: str, record: dict) -> str:
    """Write ``record`` (JSON-able) as ``directory/done.json``, atomically; returns its path."""
    path = os.path.join(directory, DONE_FILE)
    if jax.process_index() != 0:  # multi-host: one writer for the shared directory
        return path
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    return path
