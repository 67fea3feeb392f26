"""The editor protocol every lnjax editor follows (docs/method.md §7), and the feature checks and statistics fold
the editors over features share. ``lnjax.editors`` (the LN family and the registry), ``lnjax.editors.hypernet``,
``lnjax.editors.ft`` and ``lnjax.editors.locate`` build on this module; it imports none of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lnjax.core import ln
from lnjax.core.features import Features, is_concrete, resolved


@struct.dataclass
class EditCounters:
    """What every editor state carries (an immutable pytree): ``turns`` updates applied and ``rejected`` turns
    whose shift was non-finite and therefore not applied (int32 scalars, read by the engine's diagnostics), and
    the static ``targets``, one tuple per target starting with its name, in a fixed order. Editor states extend it.
    """

    turns: jax.Array
    rejected: jax.Array
    targets: tuple = struct.field(pytree_node=False)

    def target_names(self) -> tuple[str, ...]:
        return tuple(t[0] for t in self.targets)


@struct.dataclass
class EditorState(EditCounters):
    """State of the editors over features: the counters, ``targets`` as ``(name, d_in, d_out, group)``, and
    ``stats``: group name -> ``ln.LNStats`` (empty without normalization)."""

    stats: dict


NEEDS = ("features", "params", "turn", "max_rows")


class Editor(NamedTuple):
    """An editor (the protocol of docs/method.md §7): ``init(shapes) -> state`` with ``shapes`` {target:
    (d_in, d_out)}, and ``update(features, state, *, warmup=False, params=None, turn=None) -> (deltas, state)``
    with ``deltas`` {target: (d_in, d_out) float32}.

    ``needs`` (a subset of ``NEEDS``) says what the engine computes for ``update``: ``"features"`` the turn's
    ``{target: Features}`` from ``lnjax.models.probe.turn_features`` on the pre-turn model (else ``features`` is None
    and the probe is skipped), ``"params"`` the full pre-turn parameters, ``"turn"`` the turn's arrays as an
    ``lnjax.core.turns.EditTurn``, ``"max_rows"`` the static bound (an int, or None) on the supervised positions of
    any turn, for editors that project only those onto the vocabulary. The state keeps int32 counters ``turns``
    and ``rejected``.
    """

    init: Callable[[Mapping[str, tuple[int, int]]], EditorState]
    update: Callable[..., tuple[dict, EditorState]]
    config: Any = None
    needs: frozenset = frozenset({"features"})


def target_shapes(shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[str, int, int], ...]:
    """``(name, d_in, d_out)`` per target of ``shapes`` {target: (d_in, d_out)}, in the given order: the one check
    of the target layout every editor's ``init`` makes (ValueError naming the target whose shape is not two
    positive sizes)."""
    out = []
    for name, shape in shapes.items():
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"target {name!r}: shape must be (d_in, d_out) with positive sizes, got {shape}")
        out.append((name, int(shape[0]), int(shape[1])))
    return tuple(out)


COUNTERS = ("turns", "rejected")


def _guarded_fields(state: EditCounters, diagnostics: Sequence[str]) -> dict:
    """The fields of ``state`` a rejected turn restores: every pytree field but the counters and ``diagnostics``."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.metadata.get("pytree_node", True) and f.name not in COUNTERS and f.name not in diagnostics}


def guard_turn(old: EditCounters, deltas: dict, proposed: EditCounters,
               diagnostics: Sequence[str] = ()) -> tuple[dict, EditCounters]:
    """One turn's outcome under ``reject_nonfinite``: ``(deltas, proposed)`` with ``turns`` counted when every
    delta and every floating-point leaf the turn changed in ``proposed`` is finite; otherwise zero deltas,
    ``old``'s fields back (``diagnostics`` fields excepted) and ``rejected`` counted. Traceable (jit, scan)."""
    new_fields, old_fields = _guarded_fields(proposed, diagnostics), _guarded_fields(old, diagnostics)
    new_leaves, tree = jax.tree_util.tree_flatten(new_fields)
    old_leaves, old_tree = jax.tree_util.tree_flatten(old_fields)
    if tree != old_tree:
        raise ValueError(f"an editor's update changed its state's structure: {old_tree} -> {tree}")
    # A leaf the update passed through (the same object, e.g. a frozen hypernetwork's θ) needs no check or select.
    changed = [i for i, (a, b) in enumerate(zip(new_leaves, old_leaves)) if a is not b]
    # A shift whose entries are finite but whose squared norm overflows float32 (a huge lr: entries ~1e30) is no
    # edit either: it would leave weights that no later turn can correct, so it is rejected like an inf.
    checks = [jnp.isfinite(jnp.sum(jnp.square(d.astype(jnp.float32)))) for d in deltas.values()]
    checks += [jnp.all(jnp.isfinite(new_leaves[i])) for i in changed
               if jnp.issubdtype(jnp.result_type(new_leaves[i]), jnp.inexact)]
    finite = jnp.all(jnp.stack(checks))
    kept = list(old_leaves)
    for i in changed:
        kept[i] = jnp.where(finite, new_leaves[i], old_leaves[i])
    state = proposed.replace(**jax.tree_util.tree_unflatten(tree, kept),
                             turns=old.turns + finite.astype(jnp.int32),
                             rejected=old.rejected + (~finite).astype(jnp.int32))
    return {n: jnp.where(finite, d, 0.0) for n, d in deltas.items()}, state


def reject_nonfinite(editor: Editor, *, diagnostics: Sequence[str] = ()) -> Editor:
    """``editor`` with every turn guarded against non-finite numbers: the one home of lnjax's non-finite-turn
    rule, after optax's ``apply_if_finite`` (which skips an optimizer step whose updates are not finite).

    The wrapped ``editor.update(features, state, ...)`` proposes ``(deltas, state')`` and leaves the counters
    ``turns`` and ``rejected`` (``EditCounters``) alone. The guard then decides, inside the trace (a
    ``jnp.where``, no Python branch, so it works under ``jit`` and in the engine's ``lax.scan``):

    - **accepted** when every delta (and its squared norm: a shift too large for float32, from a huge lr, is no
      edit) and every floating-point leaf of ``state'`` that the update changed is finite: ``(deltas, state')``
      with ``turns + 1``;
    - **rejected** otherwise, whole: zero deltas (same shapes and dtypes), every field of the old ``state`` back
      (statistics, caches, ...), ``turns`` unchanged and ``rejected + 1``. The fields named in
      ``diagnostics`` (e.g. FT's ``loss``, MEMIT's ``z_loss``) report what the turn tried and are kept either way.

    Unlike ``apply_if_finite`` there is no limit on consecutive rejections here: the engine's
    ``on_nonfinite="stop"`` (``lnjax.engine.sequence.edit_sequence``) halts a run at the first one, which it
    sees as ``rejected`` growing. Leaves the update passes through unchanged (the same object, e.g. a frozen
    hypernetwork's θ) are neither checked nor selected, so the guard costs nothing for them. The wrapper keeps
    ``editor``'s ``init``, ``config`` and ``needs``; ``guard_turn`` is the same rule for one proposal.
    """
    inner = editor.update

    def update(features, state, *args, **kwargs):
        deltas, proposed = inner(features, state, *args, **kwargs)
        return guard_turn(state, deltas, proposed, diagnostics)

    return editor._replace(update=update)


def check_features(features: Mapping[str, Features], state: EditorState) -> dict:
    """Validate names, shapes and (when concrete) finiteness; returns name -> (mask, segment, num_segments)."""
    known = state.target_names()
    unknown = [n for n in features if n not in known]
    if unknown:
        raise ValueError(f"features for unknown target(s) {unknown}; the editor state knows {list(known)}")
    missing = [n for n in known if n not in features]
    if missing:
        raise ValueError(f"no features for target(s) {missing}")
    out = {}
    for name, d_in, d_out, _ in state.targets:
        f = features[name]
        mask, segment, num = resolved(name, f)
        if f.keys.shape[1] != d_in:
            raise ValueError(f"target {name!r}: keys have width {f.keys.shape[1]}, the state expects d_in={d_in}")
        if f.value_grads.shape[1] != d_out:
            raise ValueError(f"target {name!r}: value_grads have width {f.value_grads.shape[1]}, "
                             f"the state expects d_out={d_out}")
        for field in ("keys", "value_grads"):
            arr = getattr(f, field)
            if is_concrete(arr) and is_concrete(mask):
                bad = ~np.isfinite(np.asarray(arr, np.float32)) & np.asarray(mask)[:, None]
                if bad.any():
                    row = int(np.argwhere(bad)[0][0])
                    raise ValueError(f"target {name!r}: {field} has {int(bad.sum())} non-finite entries "
                                     f"(first at row {row}); state left untouched")
        out[name] = (mask, segment, num)
    return out


def group_members(targets: tuple) -> dict[str, list[str]]:
    """Group name -> its target names in target order, from ``(name, d_in, d_out, group)`` tuples."""
    members: dict[str, list] = {}
    for name, _, _, group in targets:
        members.setdefault(group, []).append(name)
    return members


def fold_group_features(stats: ln.LNStats, features: Mapping[str, Features], rows: dict, names: list,
                        variance: str) -> ln.LNStats:
    """``stats`` with one turn's rows of the targets ``names`` (one shape group) folded in.

    Rows are merged one (mini-batch, target) block at a time in the reference's order (mini-batch outer, target
    inner, docs/method.md §3); ``rows`` is ``check_features``' name -> (mask, segment, num_segments).
    """
    n_members = len(names)
    num = max(rows[n][2] for n in names)
    z = jnp.concatenate([jnp.concatenate([features[n].keys, features[n].value_grads], axis=1)
                         .astype(jnp.float32) for n in names], axis=0)
    mask = jnp.concatenate([rows[n][0] for n in names])
    seg = jnp.concatenate([rows[n][1] * n_members + j for j, n in enumerate(names)])
    return ln.update(stats, z, mask, seg, num * n_members, variance)
