"""The editor protocol's shared rules (``lnjax.core.protocol``): the non-finite-turn guard ``reject_nonfinite``
and the target-layout check ``target_shapes``, on a toy editor whose proposals the test chooses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from lnjax.core.protocol import EditCounters, Editor, reject_nonfinite, target_shapes


@struct.dataclass
class ToyState(EditCounters):
    memory: jax.Array      # restored on a rejected turn
    frozen: jax.Array      # never changed by the update (passed through)
    note: jax.Array        # a diagnostic: kept either way


def _toy(diagnostics=("note",)) -> Editor:
    """update(features) proposes deltas ``{"w": features["d"]}``, ``memory + features["m"]`` and ``note = 7``."""

    def init(shapes):
        targets = target_shapes(shapes)
        return ToyState(memory=jnp.zeros(3), frozen=jnp.arange(4.0), note=jnp.zeros(()),
                        turns=jnp.zeros((), jnp.int32), rejected=jnp.zeros((), jnp.int32), targets=targets)

    def update(features, state, warmup=False):
        return {"w": features["d"]}, state.replace(memory=state.memory + features["m"], note=jnp.full((), 7.0))

    return reject_nonfinite(Editor(init=init, update=update), diagnostics=diagnostics)


def _feats(d=1.0, m=1.0):
    return {"d": jnp.full((2, 3), d, jnp.float32), "m": jnp.full((3,), m, jnp.float32)}


def test_a_finite_turn_is_applied_and_counted():
    ed = _toy()
    s0 = ed.init({"w": (2, 3)})
    d, s1 = ed.update(_feats(), s0)
    np.testing.assert_array_equal(np.asarray(d["w"]), np.ones((2, 3)))
    np.testing.assert_array_equal(np.asarray(s1.memory), np.ones(3))
    assert (int(s1.turns), int(s1.rejected)) == (1, 0)
    assert s1.frozen is s0.frozen          # a passed-through leaf is neither checked nor selected


@pytest.mark.parametrize("feats", [_feats(d=np.nan), _feats(d=np.inf), _feats(m=np.inf)],
                         ids=["nan delta", "inf delta", "finite delta, non-finite state"])
def test_a_non_finite_turn_is_rejected_whole_under_jit(feats):
    ed = _toy()
    s0 = ed.init({"w": (2, 3)})
    _, s1 = ed.update(_feats(), s0)
    d, s2 = jax.jit(ed.update)(feats, s1)
    assert float(jnp.abs(d["w"]).max()) == 0.0 and d["w"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s2.memory), np.asarray(s1.memory))
    assert (int(s2.turns), int(s2.rejected)) == (1, 1)
    assert float(s2.note) == 7.0           # the diagnostic reports the attempt


def test_in_a_scan_only_the_bad_turn_is_rejected():
    ed = _toy(diagnostics=())
    xs = jax.tree_util.tree_map(lambda *a: jnp.stack(a), _feats(), _feats(m=np.nan), _feats(d=2.0))

    def body(state, f):
        d, state = ed.update(f, state)
        return state, d["w"].sum()

    state, sums = jax.lax.scan(body, ed.init({"w": (2, 3)}), xs)
    np.testing.assert_array_equal(np.asarray(sums), [6.0, 0.0, 12.0])
    np.testing.assert_array_equal(np.asarray(state.memory), np.full(3, 2.0))
    assert (int(state.turns), int(state.rejected)) == (2, 1)
    assert float(state.note) == 7.0        # not a diagnostic here, but finite: accepted on the accepted turns


def test_target_shapes_is_the_one_layout_check():
    assert target_shapes({"a": (4, 3), "b": [2, 5]}) == (("a", 4, 3), ("b", 2, 5))
    for bad in ((3,), (0, 2), (2, 3, 4)):
        with pytest.raises(ValueError, match=r"target 'x': shape must be \(d_in, d_out\) with positive sizes"):
            target_shapes({"x": bad})
