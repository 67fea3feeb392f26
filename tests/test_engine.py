"""The editor protocol inside the scan engine: what an editor's ``needs`` make the engine compute and pass."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax as lx
from lnjax.core.turns import EditTurn, pack_turns
from lnjax.editors import Editor, EditorState
from lnjax.engine import slice_chunk
from lnjax.models import get_module
from lnjax.engine.sequence import Evaluation, edit_sequence

from fixtures import TARGETS, random_examples as _examples, tiny_model

EPS = 1e-3


def _scale(subject_last):
    return EPS * jnp.sum(subject_last + 1).astype(jnp.float32)


def shrink_editor():
    """Needs params and the turn, not features: ΔW = EPS·Σ(subject_last+1)·W/‖W‖ for each target's current W."""

    def init(shapes):
        return EditorState(stats={}, turns=jnp.zeros((), jnp.int32), rejected=jnp.zeros((), jnp.int32),
                           targets=tuple((n, s[0], s[1], n) for n, s in shapes.items()))

    @chex.assert_max_traces(n=1)
    def update(features, state, *, warmup=False, params=None, turn=None):
        assert features is None and params is not None and isinstance(turn, EditTurn)
        deltas = {}
        for name in state.target_names():
            w = get_module(params, name)["kernel"].astype(jnp.float32)
            deltas[name] = _scale(turn.subject_last) * w / jnp.linalg.norm(w)
        return deltas, state.replace(turns=state.turns + 1)

    return Editor(init=init, update=update, needs=frozenset({"params", "turn"}))


def _edit_turns(n_turns, per_turn, seed=0):
    tb, _ = pack_turns(_examples(n_turns * per_turn, seed), per_turn)
    para, _ = pack_turns(_examples(n_turns * per_turn, seed + 1), per_turn)
    subject_last = np.random.default_rng(seed).integers(-1, 4, (n_turns, per_turn)).astype(np.int32)
    return EditTurn(edit=tb, paraphrase=para, locality=None, subject_last=subject_last)


def test_params_and_turn_reach_the_editor_inside_one_compiled_scan():
    chex.clear_trace_counter()
    model = tiny_model(0)
    turns = _edit_turns(7, 3)
    res = edit_sequence(model, shrink_editor(), turns, TARGETS, chunk=3, progress=False, track_accuracy=True)
    for name in TARGETS:   # the same rule applied turn by turn on the host
        w = np.asarray(get_module(model.params, name)["kernel"], np.float64)
        for t in range(7):
            w = w + float(_scale(turns.subject_last[t])) * w / np.linalg.norm(w)
        np.testing.assert_allclose(np.asarray(get_module(res.params, name)["kernel"]), w, rtol=1e-5)
    assert int(res.editor_state.turns) == 7 and res.diagnostics["count"].shape == (7, 0)
    assert np.isfinite(res.diagnostics["loss"]).all() and (res.diagnostics["rows"] > 0).all()
    chex.clear_trace_counter()


def test_plain_turn_batches_reach_a_turn_editor_with_unknown_subjects():
    chex.clear_trace_counter()
    model = tiny_model(3)
    res = edit_sequence(model, shrink_editor(), _edit_turns(2, 3).edit, TARGETS, chunk=2, progress=False)
    for name in TARGETS:   # subject_last = -1 everywhere: the shift's scale is 0
        np.testing.assert_array_equal(np.asarray(get_module(res.params, name)["kernel"]),
                                      np.asarray(get_module(model.params, name)["kernel"]))
    chex.clear_trace_counter()


def test_needs_select_what_the_engine_computes():
    model = tiny_model(1)
    tb, _ = pack_turns(_examples(12), 4)
    seen = {}

    def update(features, state, *, warmup=False, **kwargs):
        seen.update(features=features is not None, kwargs=sorted(kwargs))
        return {t: jnp.zeros(get_module(model.params, t)["kernel"].shape) for t in TARGETS}, state

    base = lx.editors.ultraedit()
    editor = Editor(init=base.init, update=update, needs=frozenset({"features", "params"}))
    edit_sequence(model, editor, tb, TARGETS, chunk=3, progress=False)
    assert seen == {"features": True, "kwargs": ["params"]}
    # the static row bound reaches the editors that ask for it, as the int the engine sized the turn with
    edit_sequence(model, editor._replace(needs=frozenset({"features", "max_rows"})), tb, TARGETS, chunk=3,
                  progress=False)
    assert seen["kwargs"] == ["max_rows"]
    # needs outside the protocol are refused before anything is traced
    with pytest.raises(ValueError, match="subset of"):
        edit_sequence(model, editor._replace(needs=frozenset({"weights"})), tb, TARGETS, progress=False)


def test_slice_chunk_pads_every_turn_batch_without_supervision():
    turns = _edit_turns(3, 2)
    xs, flags, active = slice_chunk(turns, np.array([True, False, False]), 2, 4)
    assert active.tolist() == [True, False, False, False] and flags.tolist() == [False] * 4
    for tb in (xs.edit, xs.paraphrase):
        assert tb.labels.shape[0] == 4 and (tb.labels[1:] == -100).all()
    assert xs.subject_last.shape == (4, 2)


def test_evaluation_hook_records_points_after_applied_turns():
    model = tiny_model(2)
    tb, _ = pack_turns(_examples(12), 2)
    warm, _ = pack_turns(_examples(4, 5), 2, length=tb.input_ids.shape[2])
    host = {}
    hook = Evaluation(lambda params, applied: {"applied": applied} if applied % 2 == 0 else None)
    edit_sequence(model, lx.editors.stableedit(lr=0.01), tb, TARGETS, warmup=warm, chunk=2, progress=False,
                  hooks=[hook], host_state=host)
    # schedule: 2 warm-up turns, then 6 edit turns, in chunks of 2 -> applied 0 (skipped), 2, 4, 6
    assert host["curve"] == [{"applied": 2}, {"applied": 4}, {"applied": 6}]
