"""The pure scan engine of a run of sequential edits: carry, turn function, chunk function, schedule.

Everything here is a pure function of arrays (no files, no progress bars): ``make_turn_fn`` is the ``lax.scan``
body of one turn, ``make_chunk_fn`` jits a scan over a fixed number of turns, ``init_carry`` builds the carry and
``slice_chunk`` cuts the host arrays of one chunk. ``lnjax.engine.sequence.edit_sequence`` is the host loop around it;
benchmarks and custom drivers can use the engine directly:

    frozen, carry = init_carry(model.params, editor, targets)
    chunk = make_chunk_fn(make_turn_fn(model.apply, editor, targets, max_rows=required_rows(batches)))
    carry, diagnostics = chunk(carry, frozen, slice_chunk(batches, np.zeros(T, bool), 0, T))

How the turn function serves an editor is the protocol of docs/method.md §7: it runs the probe only for editors
whose ``needs`` hold ``"features"`` and passes the pre-turn ``params`` and the turn's arrays (``EditTurn``) to
editors that ask for them.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lnjax.core.turns import IGNORE, REFERENCE_MINIBATCH_SIZE, EditTurn, TurnBatch
from lnjax.core.metrics import token_accuracy
from lnjax.core.protocol import NEEDS, Editor, EditorState
from lnjax.core.tree import frozen_and_kernels, get_module, join, with_module_leaf  # noqa: F401  (re-exported)
from lnjax.models.probe import supervised_argmax, turn_features, turn_loss

WARMUP_POSITIONS = ("start", "q1", "middle", "q3", "end", "none")


@struct.dataclass
class RunCarry:
    """What the scan carries from turn to turn: edited ``kernels`` (model dtype), ``editor_state``,
    ``prev_deltas`` (float32, the last applied shift per target, for the consecutive-shift cosine) and
    ``halted`` (set by a rejected turn when the run stops on non-finite shifts; later turns are then no-ops)."""

    kernels: dict
    editor_state: EditorState
    prev_deltas: dict
    halted: jax.Array


def edit_batch(batches) -> TurnBatch:
    """The edit arrays of ``batches`` (a TurnBatch, or an EditTurn's ``edit``)."""
    return batches.edit if isinstance(batches, EditTurn) else batches


def warmup_position(where: str, n_turns: int) -> Optional[int]:
    """Index of the target turn before which the warm-up block goes (docs/method.md §6); None for ``"none"``."""
    if where not in WARMUP_POSITIONS:
        raise ValueError(f"warmup_at must be one of {WARMUP_POSITIONS}, got {where!r}")
    return {"start": 0, "q1": n_turns // 4, "middle": n_turns // 2, "q3": 3 * n_turns // 4,
            "end": max(n_turns - 1, 0), "none": None}[where]


def schedule_indices(n_turns: int, n_warmup: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn order of a run with ``n_turns`` edit turns and a block of ``n_warmup`` warm-up turns at ``where``:
    (is_warmup [S] bool, target_turn [S] int, -1 for warm-up turns)."""
    target_index = np.arange(n_turns)
    pos = warmup_position(where, n_turns)
    if n_warmup == 0 or pos is None:
        return np.zeros(n_turns, bool), target_index
    flags = np.concatenate([np.zeros(pos, bool), np.ones(n_warmup, bool), np.zeros(n_turns - pos, bool)])
    return flags, np.concatenate([target_index[:pos], -np.ones(n_warmup, int), target_index[pos:]])


def schedule(batches, warmup, warmup_at: str):
    """Turn order of a run: (turns [S, E, ...] of the type of ``batches``, is_warmup [S] bool, target_turn [S]
    int, -1 for warm-up). ``batches`` and ``warmup`` are both TurnBatch or both EditTurn with the same fields."""
    T = edit_batch(batches).input_ids.shape[0]
    R = 0 if warmup is None else edit_batch(warmup).input_ids.shape[0]
    flags, target_turn = schedule_indices(T, R, warmup_at)
    if not flags.any():
        return batches, flags, target_turn
    if jax.tree_util.tree_structure(warmup) != jax.tree_util.tree_structure(batches):
        raise ValueError("warm-up turns must have the type and fields of the edit turns (both TurnBatch, or both "
                         "EditTurn with the same optional fields)")
    if edit_batch(warmup).input_ids.shape[1:] != edit_batch(batches).input_ids.shape[1:]:
        raise ValueError(f"warm-up turns have shape {edit_batch(warmup).input_ids.shape[1:]}, edit turns "
                         f"{edit_batch(batches).input_ids.shape[1:]}: pack both with the same edits per turn and "
                         "length")
    pos = int(np.argmax(flags))
    cat = lambda a, w: np.concatenate([np.asarray(a)[:pos], np.asarray(w), np.asarray(a)[pos:]], axis=0)
    return jax.tree_util.tree_map(cat, batches, warmup), flags, target_turn


def required_rows(batches) -> int:
    """The most supervised positions any one turn has: the row slots a turn needs (at least 1)."""
    labels = np.asarray(edit_batch(batches).labels)
    per_turn = (labels != IGNORE).reshape(labels.shape[0], -1).sum(axis=1)
    return max(int(per_turn.max()) if per_turn.size else 1, 1)


def edit_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced token accuracy per edit [E] and which edits have supervision [E]."""
    return token_accuracy(jnp.argmax(logits, axis=-1), labels), jnp.sum(labels != IGNORE, axis=1) > 0


def editor_inputs(apply: Callable, editor: Editor, params, targets: Sequence[str], turn: EditTurn, *,
                  minibatch_size: int, max_rows: Optional[int]):
    """What ``editor.update`` gets for one turn, by its ``needs``: ``(features or None, keyword arguments,
    loss, supervised rows)``. The probe (forward + backward) runs only for editors that need features; the
    others get the loss from one forward pass, for the diagnostics."""
    needs = editor.needs
    if "features" in needs:
        features, loss, n_rows = turn_features(apply, params, targets, turn.edit, minibatch_size=minibatch_size,
                                               max_rows=max_rows, stream=turn.stream, stream_start=turn.stream_start)
    else:
        features = None
        loss, n_rows = turn_loss(apply, params, turn.edit, minibatch_size=minibatch_size)
    kwargs = {}
    if "params" in needs:
        kwargs["params"] = params
    if "turn" in needs:
        kwargs["turn"] = turn
    if "max_rows" in needs:
        kwargs["max_rows"] = max_rows
    return features, kwargs, loss, n_rows


def _shift_diagnostics(deltas: dict, prev: dict, targets: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """‖ΔW‖_F per target and the cosine with the previous applied shift (0 when either is zero)."""
    norms, cosines = [], []
    for t in targets:
        d, p = deltas[t], prev[t]
        nd, np_ = jnp.linalg.norm(d), jnp.linalg.norm(p)
        norms.append(nd)
        cosines.append(jnp.where((nd > 0) & (np_ > 0), jnp.sum(d * p) / jnp.maximum(nd * np_, 1e-30), 0.0))
    return jnp.stack(norms), jnp.stack(cosines)


def _check_needs(editor: Editor) -> None:
    unknown = set(editor.needs) - set(NEEDS)
    if unknown or not editor.needs:
        raise ValueError(f"editor needs {sorted(editor.needs)}: must be a non-empty subset of {sorted(NEEDS)}")


def make_turn_fn(apply: Callable, editor: Editor, targets: Sequence[str], *,
                 minibatch_size: int = REFERENCE_MINIBATCH_SIZE, max_rows: Optional[int] = None,
                 track_accuracy: bool = False, stop_on_nonfinite: bool = False) -> Callable:
    """The scan body ``turn(carry, frozen, (batch, is_warmup, active)) -> (carry, diagnostics)``.

    ``batch`` is one turn as a TurnBatch [E, L] or an EditTurn. One turn: the editor's inputs on the pre-turn
    model (``editor_inputs``), ``editor.update``, shifts added in the kernels' dtype. An inactive (padding) turn
    leaves the carry bit for bit unchanged. Diagnostics per turn: ``delta_norm`` and ``cosine`` [n_targets],
    ``count`` [n_groups] (empty for editors without LN statistics), ``loss``, ``rows``, ``rejected``, ``active``
    and, with ``track_accuracy``, ``accuracy`` (the turn's own teacher-forced edit accuracy right after its
    shift, one more forward pass). A turn whose shift is non-finite is rejected by the editor (nothing changes);
    with ``stop_on_nonfinite`` it also halts the run, so every later turn is inactive.
    """
    targets = tuple(targets)
    _check_needs(editor)

    def turn(carry: RunCarry, frozen, xs):
        batch, is_warmup, active = xs
        turn_in = EditTurn.of(batch)
        active = active & ~carry.halted
        # Named scopes label each part of the turn in profiles (experiments/bench_engine.py reads them).
        with jax.named_scope("features"):
            features, kwargs, loss, n_rows = editor_inputs(apply, editor, join(frozen, carry.kernels), targets,
                                                           turn_in, minibatch_size=minibatch_size,
                                                           max_rows=max_rows)
        with jax.named_scope("update"):
            deltas, est = editor.update(features, carry.editor_state, warmup=is_warmup, **kwargs)
        with jax.named_scope("apply"):
            return _apply_turn(carry, frozen, turn_in, deltas, est, active, loss, n_rows)

    def _apply_turn(carry, frozen, turn_in, deltas, est, active, loss, n_rows):
        kernels = {t: carry.kernels[t] + deltas[t].astype(carry.kernels[t].dtype) for t in targets}
        norms, cosines = _shift_diagnostics(deltas, carry.prev_deltas, targets)
        rejected_now = est.rejected > carry.editor_state.rejected
        new = RunCarry(kernels=kernels, editor_state=est,
                       prev_deltas={t: jnp.where(jnp.linalg.norm(deltas[t]) > 0, deltas[t], carry.prev_deltas[t])
                                    for t in targets},
                       halted=carry.halted | (rejected_now & stop_on_nonfinite))
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, carry)
        stats = getattr(est, "stats", None)
        diag = {"delta_norm": norms, "cosine": cosines, "loss": loss, "rows": n_rows,
                "count": jnp.stack([s.count for s in stats.values()]) if stats else jnp.zeros((0,), jnp.int32),
                "rejected": est.rejected, "active": active}
        if track_accuracy:
            with jax.named_scope("evaluation"):
                e = turn_in.edit
                pred = supervised_argmax(apply, join(frozen, kernels), e, e.labels.size if max_rows is None
                                         else max_rows, turn_in.stream, turn_in.stream_start)
                acc = token_accuracy(pred, e.labels)
                has = jnp.sum(e.labels != IGNORE, axis=1) > 0
                diag["accuracy"] = jnp.sum(acc * has) / jnp.maximum(jnp.sum(has), 1)
        return new, diag

    return turn


def init_carry(params, editor: Editor, targets: Sequence[str], editor_state: Optional[EditorState] = None):
    """Initial ``(frozen, carry)`` for a run over ``targets`` of ``params``.

    The carry owns fresh copies of the kernels and editor state: runs donate the carry, and the caller's
    ``params`` and ``editor_state`` must stay valid.
    """
    frozen, kernels = frozen_and_kernels(params, targets)
    if editor_state is None:
        editor_state = editor.init({t: tuple(k.shape) for t, k in kernels.items()})
    prev = {t: jnp.zeros(k.shape, jnp.float32) for t, k in kernels.items()}
    carry = RunCarry(kernels=kernels, editor_state=editor_state, prev_deltas=prev, halted=jnp.zeros((), bool))
    return frozen, jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), carry)


def make_chunk_fn(turn: Callable) -> Callable:
    """Jitted ``chunk(carry, frozen, xs) -> (carry, diagnostics [K, ...])`` scanning ``turn``; carry donated."""

    def chunk(carry, frozen, xs):
        return jax.lax.scan(lambda c, x: turn(c, frozen, x), carry, xs)

    return jax.jit(chunk, donate_argnums=(0,))


def slice_chunk(batches, flags: np.ndarray, start: int, size: int):
    """Turns [start, start+size) of ``batches`` (TurnBatch or EditTurn, leading axis = turns) as the scan input
    ``(turns [size, ...], is_warmup [size] bool, active [size] bool)``, padded with inactive turns (no
    supervised position) to ``size`` so that every chunk has the compiled shape."""
    stop = min(start + size, edit_batch(batches).input_ids.shape[0])
    n, pad = stop - start, size - (stop - start)

    def take(a):
        a = np.asarray(a)[start:stop]
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a

    def unsupervised_padding(x):
        if not isinstance(x, TurnBatch):
            return x
        return x.replace(labels=np.where(np.arange(size).reshape((size,) + (1,) * (x.labels.ndim - 1)) < n,
                                         x.labels, IGNORE))

    tb = jax.tree_util.tree_map(take, batches)
    tb = jax.tree_util.tree_map(unsupervised_padding, tb, is_leaf=lambda x: isinstance(x, TurnBatch))
    return tb, np.concatenate([flags[start:stop], np.zeros(pad, bool)]), np.arange(size) < n
