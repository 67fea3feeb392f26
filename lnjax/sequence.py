"""``edit_sequence``: a whole run of sequential edits as one compiled ``lax.scan`` over turns.

The scan carry holds only the edited kernels, the editor state and the previous shifts (for the cosine
diagnostic); the frozen weights are a separate, non-donated argument. Turns run in chunks of ``chunk`` turns
(the last chunk padded with inactive turns) so that one compiled program serves every chunk and a progress bar,
checkpoints or evaluation can run between chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .editors import Editor, EditorState
from .models import get_module, with_module_leaf
from .probe import IGNORE, TurnBatch, token_log_likelihood, turn_features

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


@dataclasses.dataclass
class SequenceResult:
    """Outcome of ``edit_sequence``: final ``params``, ``editor_state``, the final ``carry`` and per-turn
    ``diagnostics`` (numpy arrays over all scheduled turns, warm-up included; see ``turn_diagnostics``)."""

    params: Any
    editor_state: EditorState
    carry: RunCarry
    diagnostics: dict
    targets: tuple


def warmup_position(where: str, n_turns: int) -> Optional[int]:
    """Index of the target turn before which the warm-up block goes (REFERENCE.md §6); None for ``"none"``."""
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


def schedule(batches: TurnBatch, warmup: Optional[TurnBatch], warmup_at: str):
    """Turn order of a run: (TurnBatch [S, E, L], is_warmup [S] bool, target_turn [S] int, -1 for warm-up)."""
    T = batches.input_ids.shape[0]
    R = 0 if warmup is None else warmup.input_ids.shape[0]
    flags, target_turn = schedule_indices(T, R, warmup_at)
    if not flags.any():
        return batches, flags, target_turn
    if warmup.input_ids.shape[1:] != batches.input_ids.shape[1:]:
        raise ValueError(f"warm-up turns have shape {warmup.input_ids.shape[1:]}, edit turns "
                         f"{batches.input_ids.shape[1:]}: pack both with the same edits per turn and length")
    pos = int(np.argmax(flags))
    cat = lambda a, w: np.concatenate([np.asarray(a)[:pos], np.asarray(w), np.asarray(a)[pos:]], axis=0)
    return jax.tree_util.tree_map(cat, batches, warmup), flags, target_turn


def required_rows(batches: TurnBatch) -> int:
    """The most supervised positions any one turn has: the row slots a turn needs (at least 1)."""
    labels = np.asarray(batches.labels)
    per_turn = (labels != IGNORE).reshape(labels.shape[0], -1).sum(axis=1)
    return max(int(per_turn.max()) if per_turn.size else 1, 1)


def frozen_and_kernels(params, targets: Sequence[str]):
    """Split ``params`` into (frozen params with target kernels removed, name -> kernel)."""
    kernels = {t: get_module(params, t)["kernel"] for t in targets}
    frozen = params
    for t in targets:
        frozen = with_module_leaf(frozen, t, "kernel", None)
    return frozen, kernels


def join(frozen, kernels: dict):
    """Full parameters from frozen params and edited kernels."""
    params = frozen
    for t, k in kernels.items():
        params = with_module_leaf(params, t, "kernel", k)
    return params


def edit_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced token accuracy per edit [E] and which edits have supervision [E]."""
    sup = labels != IGNORE
    hit = (jnp.argmax(logits, axis=-1) == labels) & sup
    n = jnp.sum(sup, axis=1)
    return jnp.sum(hit, axis=1) / jnp.maximum(n, 1), n > 0


def make_turn_fn(apply: Callable, editor: Editor, targets: Sequence[str], *, minibatch_size: int = 10,
                 max_rows: Optional[int] = None, track_accuracy: bool = False,
                 stop_on_nonfinite: bool = False) -> Callable:
    """The scan body ``turn(carry, frozen, (batch, is_warmup, active)) -> (carry, diagnostics)``.

    One turn: features on the pre-turn model, editor update, shifts added in the kernels' dtype. An inactive
    (padding) turn leaves the carry bit for bit unchanged. Diagnostics per turn: ``delta_norm`` and ``cosine``
    [n_targets], ``count`` [n_groups], ``loss``, ``rows``, ``rejected`` and, with ``track_accuracy``,
    ``accuracy`` (the turn's own teacher-forced edit accuracy right after its shift, one more forward pass).
    A turn whose shift is non-finite is rejected by the editor (nothing changes); with ``stop_on_nonfinite`` it
    also halts the run, so every later turn is inactive.
    """
    targets = tuple(targets)

    def turn(carry: RunCarry, frozen, xs):
        batch, is_warmup, active = xs
        active = active & ~carry.halted
        params = join(frozen, carry.kernels)
        feats, loss, n_rows = turn_features(apply, params, targets, batch, minibatch_size=minibatch_size,
                                            max_rows=max_rows)
        deltas, est = editor.update(feats, carry.editor_state, warmup=is_warmup)
        kernels = {t: carry.kernels[t] + deltas[t].astype(carry.kernels[t].dtype) for t in targets}
        norms, cosines = [], []
        for t in targets:
            d, p = deltas[t], carry.prev_deltas[t]
            nd, np_ = jnp.linalg.norm(d), jnp.linalg.norm(p)
            norms.append(nd)
            cosines.append(jnp.where((nd > 0) & (np_ > 0), jnp.sum(d * p) / jnp.maximum(nd * np_, 1e-30), 0.0))
        rejected_now = est.rejected > carry.editor_state.rejected
        new = RunCarry(kernels=kernels, editor_state=est,
                       prev_deltas={t: jnp.where(jnp.linalg.norm(deltas[t]) > 0, deltas[t], carry.prev_deltas[t])
                                    for t in targets},
                       halted=carry.halted | (rejected_now & stop_on_nonfinite))
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, carry)
        diag = {
            "delta_norm": jnp.stack(norms), "cosine": jnp.stack(cosines), "loss": loss, "rows": n_rows,
            "count": jnp.stack([s.count for s in est.stats.values()]) if est.stats else jnp.zeros((0,), jnp.int32),
            "rejected": est.rejected, "active": active,
        }
        if track_accuracy:
            logits = apply(join(frozen, kernels), batch.input_ids, batch.attention_mask)
            acc, has = edit_accuracy(logits, batch.labels)
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


def _slice_chunk(batch: TurnBatch, flags, start: int, size: int):
    """Turns [start, start+size) as device arrays, padded with inactive turns to ``size``."""
    stop = min(start + size, batch.input_ids.shape[0])
    pad = size - (stop - start)

    def take(a):
        a = np.asarray(a)[start:stop]
        return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a

    tb = jax.tree_util.tree_map(take, batch)
    tb = tb.replace(labels=np.where(np.arange(size)[:, None, None] < stop - start, tb.labels, IGNORE))
    active = np.arange(size) < stop - start
    return tb, np.concatenate([flags[start:stop], np.zeros(pad, bool)]), active


class NonFiniteShift(RuntimeError):
    """A run stopped because a turn's shift was non-finite (``on_nonfinite="stop"``)."""


def fingerprint(batches: TurnBatch, flags: np.ndarray, targets: Sequence[str], editor: Editor, chunk: int,
                minibatch_size: int) -> dict:
    """What must match for a checkpoint to be resumed: data digest, schedule, targets, editor config, chunking."""
    h = hashlib.sha256()
    for a in (batches.input_ids, batches.attention_mask, batches.labels, flags):
        arr = np.ascontiguousarray(np.asarray(a))
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return {"data_sha256": h.hexdigest(), "targets": list(targets), "editor": repr(editor.config),
            "chunk": chunk, "minibatch_size": minibatch_size}


def edit_sequence(model, editor: Editor, batches: TurnBatch, targets: Sequence[str], *,
                  warmup: Optional[TurnBatch] = None, warmup_at: str = "start", chunk: int = 10,
                  minibatch_size: int = 10, max_rows: Optional[int] = None, track_accuracy: bool = False,
                  editor_state: Optional[EditorState] = None, progress: bool = True,
                  callback: Optional[Callable[[int, RunCarry, dict], None]] = None,
                  checkpoint_dir: Optional[str] = None, checkpoint_every: int = 1, resume: bool = False,
                  host_state: Optional[dict] = None, run_config: Optional[dict] = None,
                  on_nonfinite: str = "skip", log: Callable[[str], None] = print,
                  mesh=None) -> SequenceResult:
    """Apply ``batches`` ([T, E, L] arrays) one turn after another to ``model`` (``.params``, ``.apply``).

    ``warmup`` ([R, E, L]) is inserted as a block at ``warmup_at`` (start | q1 | middle | q3 | end | none);
    warm-up turns update statistics and weights but ``editor.update`` gets ``warmup=True``. ``max_rows`` defaults
    to the most supervised positions of any turn. ``callback(turns_done, carry, chunk_diagnostics)`` runs on the
    host after each chunk (``chunk_diagnostics``: that chunk's turns only).

    With ``checkpoint_dir`` the run state (carry, cursor, and the JSON-able ``host_state`` dict that callbacks may
    update) is saved every ``checkpoint_every`` chunks and at the end, and every chunk's diagnostics are
    appended to ``checkpoint_dir/diagnostics`` as it finishes (cost per checkpoint independent of the turn);
    ``resume=True`` continues from the newest good checkpoint there (refusing one saved for other data, targets,
    editor or ``run_config``).
    ``on_nonfinite``: ``"skip"`` rejects a turn with a non-finite shift and goes on; ``"stop"`` halts the run at
    that turn and raises ``NonFiniteShift`` (after checkpointing). With a ``mesh`` (``lnjax.sharding``), weights
    are split over its ``model`` axis and each turn's edits over its ``data`` axis.

    Returns a ``SequenceResult``; diagnostics also carry ``warmup`` [S] and ``target_turn`` [S] (-1 for warm-up).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if on_nonfinite not in ("skip", "stop"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}")
    batches = jax.tree_util.tree_map(np.asarray, batches)
    if warmup is not None:
        warmup = jax.tree_util.tree_map(np.asarray, warmup)
    sched, flags, target_turn = schedule(batches, warmup, warmup_at)
    need = required_rows(sched)
    if max_rows is None:
        max_rows = need
    elif max_rows < need:
        raise ValueError(f"max_rows={max_rows} is smaller than the {need} supervised positions of the largest turn")
    turn = make_turn_fn(model.apply, editor, targets, minibatch_size=minibatch_size, max_rows=max_rows,
                        track_accuracy=track_accuracy, stop_on_nonfinite=on_nonfinite == "stop")
    chunk_fn = make_chunk_fn(turn)
    frozen, carry = init_carry(model.params, editor, targets, editor_state)
    if mesh is not None:
        from .sharding import replicate, shard_params
        frozen = shard_params(frozen, mesh)
        carry = carry.replace(kernels=shard_params(carry.kernels, mesh),
                              prev_deltas=shard_params(carry.prev_deltas, mesh),
                              editor_state=replicate(carry.editor_state, mesh), halted=replicate(carry.halted, mesh))
    total = sched.input_ids.shape[0]
    collected: list[dict] = []
    host_state = host_state if host_state is not None else {}
    ckpt, fp, first = None, None, 0
    if checkpoint_dir is not None:
        from .checkpoint import RunCheckpointer
        ckpt = RunCheckpointer(checkpoint_dir)
        fp = {**fingerprint(sched, flags, targets, editor, chunk, minibatch_size), **(run_config or {})}
        if resume:
            got = ckpt.latest(carry, fp, log=log)
            if got is not None:
                first, carry, saved_diag, saved_host = got
                collected = [saved_diag] if saved_diag else []
                host_state.clear()
                host_state.update(saved_host)
                log(f"resuming after {first} of {total} turns from {ckpt.path(first)}")
    bar = _progress(total, progress, first)
    for i, start in enumerate(range(first, total, chunk)):
        xs = _slice_chunk(sched, flags, start, chunk)
        if mesh is not None:
            from .sharding import shard_turns
            xs = (shard_turns(xs[0], mesh), xs[1], xs[2])
        carry, diag = chunk_fn(carry, frozen, xs)
        n = min(chunk, total - start)
        part = jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], diag)
        collected.append(part)
        if ckpt is not None:
            ckpt.diagnostics.append(start, part)
        if bar is not None:
            bar.update(n)
        if callback is not None:
            callback(start + n, carry, part)
        halted = bool(carry.halted)
        if ckpt is not None and ((i + 1) % checkpoint_every == 0 or start + n == total or halted):
            ckpt.save(start + n, carry, fp, host_state)
        if halted:
            bad = int(np.argmax(np.diff(np.concatenate([[0], _concat(collected)["rejected"]])) > 0))
            raise NonFiniteShift(f"turn {bad} produced a non-finite shift; the run stopped there "
                                 "(weights and statistics are those after the turn before it)")
    if bar is not None:
        bar.close()
    diagnostics = _concat(collected)
    diagnostics["warmup"] = flags
    diagnostics["target_turn"] = target_turn
    return SequenceResult(params=join(frozen, carry.kernels), editor_state=carry.editor_state, carry=carry,
                          diagnostics=diagnostics, targets=tuple(targets))


def _concat(parts: list) -> dict:
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def _progress(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="edit turns", unit="turn")
