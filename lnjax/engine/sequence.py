"""``edit_sequence``: the host loop of a run of sequential edits, around the pure engine of ``lnjax.engine``.

The engine compiles one chunk of ``chunk`` turns (a ``lax.scan``; the last chunk padded with inactive turns) and
the loop here calls it chunk after chunk. Between chunks it runs *hooks* on the host, in order: a progress bar,
the caller's hooks (e.g. ``Evaluation``), a plain ``callback`` and ``Checkpointing`` (last, so that it saves
what the other hooks recorded in ``host_state``). The scan carry holds only the edited kernels, the editor state
and the previous shifts; the frozen weights are a separate, non-donated argument.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from lnjax.core.placement import to_host
from lnjax.core.options import fold
from lnjax.core.turns import REFERENCE_MINIBATCH_SIZE
from lnjax.editors import Editor, EditorState
from lnjax.engine import (WARMUP_POSITIONS, RunCarry, edit_accuracy, edit_batch, frozen_and_kernels,  # noqa: F401
                     init_carry, join, make_chunk_fn, make_turn_fn, required_rows, schedule, schedule_indices,
                     slice_chunk, warmup_position)


@dataclasses.dataclass
class SequenceResult:
    """Outcome of ``edit_sequence``: final ``params``, ``editor_state``, the final ``carry`` and per-turn
    ``diagnostics`` (numpy arrays over all scheduled turns, warm-up included; see ``make_turn_fn``)."""

    params: Any
    editor_state: EditorState
    carry: RunCarry
    diagnostics: dict
    targets: tuple


class NonFiniteShift(RuntimeError):
    """A run stopped because a turn's shift was non-finite (``on_nonfinite="stop"``)."""


@dataclasses.dataclass
class Run:
    """The host-side state of a run between chunks, as hooks see it.

    ``turns`` [S, ...] (TurnBatch or EditTurn, warm-up included), ``is_warmup`` and ``target_turn`` [S] (-1 for
    warm-up turns), ``carry`` and ``frozen`` (the engine's arguments), ``first`` (the turn the loop starts at;
    a resuming hook moves it), ``collected`` (diagnostics of the chunks done), ``host_state`` (JSON-able, saved
    with checkpoints), ``fingerprint`` inputs (``editor``, ``targets``, ``chunk``, ``minibatch_size``) and ``log``.
    """

    turns: Any
    is_warmup: np.ndarray
    target_turn: np.ndarray
    carry: RunCarry
    frozen: Any
    editor: Editor
    targets: tuple
    chunk: int
    minibatch_size: int
    host_state: dict
    log: Callable[[str], None] = print
    first: int = 0
    collected: list = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.is_warmup)


@dataclasses.dataclass
class ChunkEnd:
    """What a hook's ``chunk`` sees after each chunk: turns ``[start, turns_done)`` of ``run`` just ran,
    ``diagnostics`` holds theirs, and ``applied_turns`` edit (not warm-up) turns have been applied so far."""

    run: Run
    start: int
    turns_done: int
    diagnostics: dict

    @property
    def applied_turns(self) -> int:
        return int(np.sum(self.run.target_turn[:self.turns_done] >= 0))

    @property
    def applied_before(self) -> int:
        """Edit (not warm-up) turns applied before this chunk."""
        return int(np.sum(self.run.target_turn[:self.start] >= 0))

    @property
    def carry(self) -> RunCarry:
        return self.run.carry

    @property
    def host_state(self) -> dict:
        return self.run.host_state

    def params(self):
        """The full edited parameters after this chunk."""
        params = join(self.run.frozen, self.run.carry.kernels)
        # several processes: whole arrays on each, so that hooks evaluate on their own devices
        return to_host(params) if jax.process_count() > 1 else params


class Hook:
    """A host-side hook of ``edit_sequence``: ``start(run)`` before the first chunk, ``chunk(end)`` after each,
    ``finish(run)`` after the last. The base class does nothing; subclasses override what they need."""

    def start(self, run: Run) -> None:
        pass

    def chunk(self, end: ChunkEnd) -> None:
        pass

    def finish(self, run: Run) -> None:
        pass


class ProgressBar(Hook):
    """A tqdm bar over the run's turns (opened at the first chunk, so that it starts where a resume starts)."""

    bar = None

    def chunk(self, end: ChunkEnd) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=end.run.total, initial=end.start, desc="edit turns", unit="turn")
        self.bar.update(end.turns_done - end.start)

    def finish(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()


class Callback(Hook):
    """``fn(turns_done, carry, chunk_diagnostics)`` after each chunk (the ``callback`` of ``edit_sequence``)."""

    def __init__(self, fn: Callable[[int, RunCarry, dict], None]):
        self.fn = fn

    def chunk(self, end: ChunkEnd) -> None:
        self.fn(end.turns_done, end.carry, end.diagnostics)


class Evaluation(Hook):
    """Periodic evaluation of the edited model, recorded in ``host_state[key]`` (so it survives a resume).

    After each chunk in which at least one edit turn has been applied, ``evaluate(params, applied_turns)``
    runs on the full edited parameters; a dict it returns is appended to ``host_state[key]``, None records
    nothing (e.g. between milestones). ``lnjax run`` and the experiments use this one hook.
    """

    def __init__(self, evaluate: Callable[[Any, int], Optional[dict]], key: str = "curve"):
        self.evaluate, self.key = evaluate, key

    def chunk(self, end: ChunkEnd) -> None:
        applied = end.applied_turns
        if applied == 0:
            return
        point = self.evaluate(end.params(), applied)
        if point is not None:
            end.host_state.setdefault(self.key, []).append(point)


def fingerprint(batches, flags: np.ndarray, targets: Sequence[str], editor: Editor, chunk: int,
                minibatch_size: int) -> dict:
    """What must match for a checkpoint to be resumed: data digest, schedule, targets, editor config, chunking."""
    h = hashlib.sha256()
    for a in jax.tree_util.tree_leaves(batches) + [flags]:
        arr = np.ascontiguousarray(np.asarray(a))
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return {"data_sha256": h.hexdigest(), "targets": list(targets), "editor": repr(editor.config),
            "chunk": chunk, "minibatch_size": minibatch_size}


class Checkpointing(Hook):
    """Run checkpoints in ``directory`` (``lnjax.io.checkpoint.RunCheckpointer``): the carry, cursor and
    ``host_state`` every ``every`` chunks, at the end and when the run halts; every chunk's diagnostics are
    appended to ``directory/diagnostics`` as it finishes. With ``resume`` the run continues from the newest good
    checkpoint there, refusing one saved for other data, targets, editor or ``run_config``."""

    def __init__(self, directory: str, every: int = 1, resume: bool = False, run_config: Optional[dict] = None):
        self.directory, self.every, self.resume, self.run_config = directory, every, resume, run_config

    def start(self, run: Run) -> None:
        from lnjax.io.checkpoint import RunCheckpointer
        self.ckpt, self.chunks = RunCheckpointer(self.directory), 0
        self.fp = {**fingerprint(run.turns, run.is_warmup, run.targets, run.editor, run.chunk, run.minibatch_size),
                   **(self.run_config or {})}
        got = self.ckpt.latest(run.carry, self.fp, log=run.log) if self.resume else None
        if got is not None:
            run.first, run.carry, saved_diag, saved_host = got
            run.collected = [saved_diag] if saved_diag else []
            run.host_state.clear()
            run.host_state.update(saved_host)
            run.log(f"resuming after {run.first} of {run.total} turns from {self.ckpt.path(run.first)}")

    def chunk(self, end: ChunkEnd) -> None:
        self.ckpt.diagnostics.append(end.start, end.diagnostics)
        self.chunks += 1
        if self.chunks % self.every == 0 or end.turns_done == end.run.total or bool(end.carry.halted):
            self.ckpt.save(end.turns_done, end.carry, self.fp, end.host_state)


def compiled_chunk_fn(apply: Callable, editor: Editor, targets: tuple, minibatch_size: int, max_rows: int,
                      track_accuracy: bool, stop_on_nonfinite: bool) -> Callable:
    """The jitted chunk function of a run (``make_chunk_fn`` of ``make_turn_fn``), one per distinct arguments:
    runs of the same editor object on turns of the same shapes (e.g. several edit seeds) compile once. An
    argument that cannot be hashed (an editor holding a list, say) gets a fresh function every time."""
    try:
        return _cached_chunk_fn(apply, editor, targets, minibatch_size, max_rows, track_accuracy, stop_on_nonfinite)
    except TypeError:  # unhashable: no cache
        return _build_chunk_fn(apply, editor, targets, minibatch_size, max_rows, track_accuracy, stop_on_nonfinite)


def _build_chunk_fn(apply, editor, targets, minibatch_size, max_rows, track_accuracy, stop_on_nonfinite):
    return make_chunk_fn(make_turn_fn(apply, editor, targets, minibatch_size=minibatch_size, max_rows=max_rows,
                                      track_accuracy=track_accuracy, stop_on_nonfinite=stop_on_nonfinite))


_cached_chunk_fn = functools.lru_cache(maxsize=16)(_build_chunk_fn)


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
    """How ``edit_sequence`` (and ``prepare``) run a sequence: everything but the model, the editor, the edits and
    the targets. ``edit_sequence(model, editor, batches, targets, SequenceOptions(chunk=2))`` and
    ``edit_sequence(model, editor, batches, targets, chunk=2)`` are the same call: keyword arguments are folded
    into the options (over the given ones). See ``edit_sequence`` for what each field does."""

    warmup: Any = None
    warmup_at: str = "start"
    chunk: int = 10
    minibatch_size: int = REFERENCE_MINIBATCH_SIZE
    max_rows: Optional[int] = None
    track_accuracy: bool = False
    editor_state: Optional[EditorState] = None
    on_nonfinite: str = "skip"
    mesh: Any = None
    host_state: Optional[dict] = None
    log: Callable[[str], None] = print
    progress: bool = True
    callback: Optional[Callable[[int, RunCarry, dict], None]] = None
    hooks: Sequence[Hook] = ()
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 1
    resume: bool = False
    run_config: Optional[dict] = None

    def __post_init__(self):
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}")


def prepare(model, editor: Editor, batches, targets: Sequence[str], options: Optional[SequenceOptions] = None,
            **overrides) -> tuple[Run, Callable]:
    """The ``Run`` (schedule, initial carry, placed on ``mesh`` when given) and the compiled chunk function of
    ``edit_sequence`` (same arguments; of the options it reads the run's setup: ``warmup``, ``warmup_at``,
    ``chunk``, ``minibatch_size``, ``max_rows``, ``track_accuracy``, ``editor_state``, ``on_nonfinite``, ``mesh``,
    ``host_state``, ``log``); nothing runs yet."""
    o = fold(SequenceOptions, options, overrides, "prepare")
    warmup, max_rows, mesh = o.warmup, o.max_rows, o.mesh
    batches = jax.tree_util.tree_map(np.asarray, batches)
    warmup = None if warmup is None else jax.tree_util.tree_map(np.asarray, warmup)
    turns, flags, target_turn = schedule(batches, warmup, o.warmup_at)
    need = required_rows(turns)
    if max_rows is None:
        max_rows = need
    elif max_rows < need:
        raise ValueError(f"max_rows={max_rows} is smaller than the {need} supervised positions of the largest turn")
    chunk_fn = compiled_chunk_fn(model.apply, editor, tuple(targets), o.minibatch_size, max_rows, o.track_accuracy,
                                 o.on_nonfinite == "stop")
    frozen, carry = init_carry(model.params, editor, targets, o.editor_state)
    if mesh is not None:
        from lnjax.engine.sharding import replicate, shard_params
        frozen = shard_params(frozen, mesh)
        carry = carry.replace(kernels=shard_params(carry.kernels, mesh),
                              prev_deltas=shard_params(carry.prev_deltas, mesh),
                              editor_state=replicate(carry.editor_state, mesh), halted=replicate(carry.halted, mesh))
    run = Run(turns=turns, is_warmup=flags, target_turn=target_turn, carry=carry, frozen=frozen, editor=editor,
              targets=tuple(targets), chunk=o.chunk, minibatch_size=o.minibatch_size,
              host_state=o.host_state if o.host_state is not None else {}, log=o.log)
    return run, chunk_fn


def run_chunks(run: Run, chunk_fn: Callable, hooks: Sequence[Hook] = (), mesh=None) -> Run:
    """Run every chunk of ``run`` from ``run.first`` (after the hooks' ``start``), calling the hooks after each;
    raises ``NonFiniteShift`` (after the hooks) when the run halted on a non-finite shift."""
    for h in hooks:
        h.start(run)
    for start in range(run.first, run.total, run.chunk):
        xs = slice_chunk(run.turns, run.is_warmup, start, run.chunk)
        if mesh is not None:
            from lnjax.engine.sharding import shard_turns
            xs = (shard_turns(xs[0], mesh), xs[1], xs[2])
        run.carry, diag = chunk_fn(run.carry, run.frozen, xs)
        n = min(run.chunk, run.total - start)
        part = jax.tree_util.tree_map(lambda a: a[:n], to_host(diag))
        run.collected.append(part)
        end = ChunkEnd(run=run, start=start, turns_done=start + n, diagnostics=part)
        for h in hooks:
            h.chunk(end)
        if bool(run.carry.halted):
            bad = int(np.argmax(np.diff(np.concatenate([[0], _concat(run.collected)["rejected"]])) > 0))
            raise NonFiniteShift(f"turn {bad} produced a non-finite shift; the run stopped there "
                                 "(weights and statistics are those after the turn before it)")
    for h in hooks:
        h.finish(run)
    return run


def edit_sequence(model, editor: Editor, batches, targets: Sequence[str],
                  options: Optional[SequenceOptions] = None, **overrides) -> SequenceResult:
    """Apply ``batches`` one turn after another to ``model`` (``.params``, ``.apply``).

    ``batches``: a TurnBatch [T, E, L], or an ``EditTurn`` with leading axis T for editors whose ``needs`` hold
    ``"turn"``. ``warmup`` (same type, [R, ...]) is inserted as a block at ``warmup_at`` (start | q1 | middle |
    q3 | end | none); warm-up turns update statistics and weights but ``editor.update`` gets ``warmup=True``.
    ``max_rows`` defaults to the most supervised positions of any turn. ``minibatch_size``: edits per mini-batch
    of the features' loss (``REFERENCE_MINIBATCH_SIZE``); ``chunk``: turns per compiled chunk; ``editor_state``:
    start from this state instead of ``editor.init``; ``track_accuracy``: each turn's edit accuracy after its shift.

    Hooks after each chunk, in order: a progress bar (``progress``), ``hooks`` (e.g. ``Evaluation``),
    ``callback(turns_done, carry, chunk_diagnostics)`` and, with ``checkpoint_dir``, ``Checkpointing`` (every
    ``checkpoint_every`` chunks and at the end, with the JSON-able ``host_state`` that hooks update;
    ``resume=True`` continues from the newest good checkpoint, refusing one saved for other data, targets, editor
    or ``run_config``). ``on_nonfinite``: ``"skip"`` rejects a turn with a non-finite shift and goes on;
    ``"stop"`` halts the run at that turn and raises ``NonFiniteShift`` (after checkpointing). With a ``mesh``
    (``lnjax.engine.sharding``), weights are split over its ``model`` axis and each turn's edits over its ``data`` axis.

    Every setting is a field of ``options`` (``SequenceOptions``) and may be given as a keyword argument instead
    (``edit_sequence(model, editor, batches, targets, chunk=2, progress=False)``), which wins over ``options``.

    Returns a ``SequenceResult``; diagnostics also carry ``warmup`` [S] and ``target_turn`` [S] (-1 for warm-up).
    """
    o = fold(SequenceOptions, options, overrides, "edit_sequence")
    run, chunk_fn = prepare(model, editor, batches, targets, o)
    all_hooks = ([ProgressBar()] if o.progress else []) + list(o.hooks) + \
        ([Callback(o.callback)] if o.callback else [])
    if o.checkpoint_dir is not None:
        all_hooks.append(Checkpointing(o.checkpoint_dir, o.checkpoint_every, o.resume, o.run_config))
    run_chunks(run, chunk_fn, all_hooks, o.mesh)
    diagnostics = _concat(run.collected)
    diagnostics["warmup"] = run.is_warmup
    diagnostics["target_turn"] = run.target_turn
    return SequenceResult(params=join(run.frozen, run.carry.kernels), editor_state=run.carry.editor_state,
                          carry=run.carry, diagnostics=diagnostics, targets=run.targets)


def _concat(parts: list) -> dict:
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
