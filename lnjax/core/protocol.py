"""The editor protocol every lnjax editor follows (docs/method.md §7), and the feature checks and statistics fold
the editors over features share. ``lnjax.editors`` (the LN family and the registry), ``lnjax.editors.hypernet``,
``lnjax.editors.ft`` and ``lnjax.editors.locate`` build on this module; it imports none of them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

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


NEEDS = ("features", "params", "turn")


class Editor(NamedTuple):
    """An editor (the protocol of docs/method.md §7): ``init(shapes) -> state`` with ``shapes`` {target:
    (d_in, d_out)}, and ``update(features, state, *, warmup=False, params=None, turn=None) -> (deltas, state)``
    with ``deltas`` {target: (d_in, d_out) float32}.

    ``needs`` (a subset of ``NEEDS``) says what the engine computes for ``update``: ``"features"`` the turn's
    ``{target: Features}`` from ``lnjax.models.probe.turn_features`` on the pre-turn model (else ``features`` is None
    and the probe is skipped), ``"params"`` the full pre-turn parameters, ``"turn"`` the turn's arrays as an
    ``lnjax.core.turns.EditTurn``. The state keeps int32 counters ``turns`` and ``rejected``.
    """

    init: Callable[[Mapping[str, tuple[int, int]]], EditorState]
    update: Callable[..., tuple[dict, EditorState]]
    config: Any = None
    needs: frozenset = frozenset({"features"})


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
