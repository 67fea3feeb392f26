"""Config objects of the functions with many settings (``lnjax.core.options.fold``): ``edit_sequence`` /
``prepare`` (``SequenceOptions``) and ``trained_editor`` / ``training_plan`` (``TrainingOptions``) take an options
object, their old keyword arguments, or both (keywords win), with the same result."""

import dataclasses

import jax
import numpy as np
import pytest

import lnjax as lx
from lnjax.core.options import fold
from lnjax.core.turns import REFERENCE_MINIBATCH_SIZE, pack_turns
from lnjax.engine.sequence import SequenceOptions, prepare

from fixtures import TARGETS, random_examples, tiny_model


@dataclasses.dataclass(frozen=True)
class Opts:
    a: int = 1
    b: str = "x"


def test_fold_defaults_overrides_and_unknown_keywords():
    assert fold(Opts, None, {}, "f") == Opts()
    assert fold(Opts, Opts(a=2), {"b": "y"}, "f") == Opts(a=2, b="y")
    assert fold(Opts, Opts(a=2), {"a": 3}, "f") == Opts(a=3)       # keywords win
    with pytest.raises(TypeError, match=r"f\(\) got unexpected keyword argument\(s\) \['c'\]"):
        fold(Opts, None, {"c": 1}, "f")
    with pytest.raises(TypeError, match="options must be a Opts"):
        fold(Opts, {"a": 1}, {}, "f")


def test_edit_sequence_with_options_or_keywords_is_the_same_run():
    model = tiny_model(0, std=0.3)
    batches, _ = pack_turns(random_examples(12, seed=1), 4)
    ed = lx.editors.ultraedit(lr=1e-1)
    by_kw = lx.edit_sequence(model, ed, batches, TARGETS, chunk=2, progress=False)
    opts = SequenceOptions(chunk=2, progress=False)
    by_opts = lx.edit_sequence(model, ed, batches, TARGETS, opts)
    mixed = lx.edit_sequence(model, ed, batches, TARGETS, SequenceOptions(chunk=3), chunk=2, progress=False)
    assert float(np.abs(by_kw.diagnostics["delta_norm"]).min()) > 0     # the run edits
    for other in (by_opts, mixed):
        for a, b in zip(jax.tree_util.tree_leaves(by_kw.params), jax.tree_util.tree_leaves(other.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert SequenceOptions().minibatch_size == REFERENCE_MINIBATCH_SIZE
    run, _ = prepare(model, ed, batches, TARGETS, opts, chunk=1)
    assert (run.chunk, run.minibatch_size) == (1, REFERENCE_MINIBATCH_SIZE)


def test_bad_sequence_options_are_refused_by_name():
    model = tiny_model(0)
    batches, _ = pack_turns(random_examples(4, seed=1), 4)
    ed = lx.editors.ultraedit()
    with pytest.raises(TypeError, match=r"edit_sequence\(\) got unexpected keyword argument\(s\) \['chunks'\]"):
        lx.edit_sequence(model, ed, batches, TARGETS, chunks=2)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        lx.edit_sequence(model, ed, batches, TARGETS, chunk=0)
    with pytest.raises(ValueError, match="on_nonfinite must be 'skip' or 'stop'"):
        SequenceOptions(on_nonfinite="retry")


def test_training_plan_with_options_or_keywords_is_the_same_plan(tmp_path):
    from lnjax.app.train_editor import TrainingOptions, training_plan
    from lnjax.world.world_model import DEFAULT_TARGETS, default_model

    model = default_model()
    kw = training_plan("malmen", model, DEFAULT_TARGETS, cache_dir=str(tmp_path), n_train=20, edits_per_turn=10)
    opts = training_plan("malmen", model, DEFAULT_TARGETS,
                         TrainingOptions(cache_dir=str(tmp_path), n_train=20, edits_per_turn=10))
    via_editor_options = training_plan("malmen", model, DEFAULT_TARGETS, TrainingOptions(cache_dir=str(tmp_path)),
                                       options={"n_train": 20}, edits_per_turn=10)
    assert kw.directory == opts.directory == via_editor_options.directory
    assert kw.turns.n_turns == 2 and kw.meta.minibatch_size == REFERENCE_MINIBATCH_SIZE
    other = training_plan("malmen", model, DEFAULT_TARGETS, cache_dir=str(tmp_path), n_train=20, edits_per_turn=5)
    assert other.directory != kw.directory
