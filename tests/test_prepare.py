"""``prepare_edits``: the one setup of records → tokens → turns → evaluation set that runs and experiments share."""

import numpy as np
import pytest

from lnjax import data
from lnjax import eval as eval_lib
from lnjax.core.turns import pack_turns, probe_length
from lnjax.eval.prepare import prepare_edits
from lnjax.world import default_world


@pytest.fixture(scope="module")
def world():
    return default_world()


def test_turns_order_and_subjects_match_packing_by_hand(world):
    tok = world.tokenizer()
    rows = world.records("edit", 25, seed=3)
    warm_rows = world.records("train", 10, seed=3)
    job = prepare_edits(rows, tok, edits_per_turn=10, warmup_records=warm_rows)
    recs = data.tokenize(data.records_from_dicts("zsre", rows), tok)
    warm = data.tokenize(data.records_from_dicts("zsre", warm_rows), tok)
    length = max(probe_length(*r.edit) for r in recs + warm)
    turns, order = pack_turns([r.edit for r in recs], 10, length)
    assert job.length == length and job.n_turns == 3 and job.turns.input_ids.shape == (3, 10, length)
    np.testing.assert_array_equal(job.order, order)
    for a, b in zip((job.turns.input_ids, job.turns.labels), (turns.input_ids, turns.labels)):
        np.testing.assert_array_equal(a, b)
    want = [[recs[i].subject_last if i >= 0 else -1 for i in row] for row in order]
    np.testing.assert_array_equal(job.subject_last, want)
    assert (job.subject_last[order >= 0] >= 0).all() and (job.subject_last[order < 0] == -1).all()
    np.testing.assert_array_equal(job.turn_of_example, np.repeat([0, 1, 2], 10)[:25])
    # the late turns alone pack to the stream's last turns
    late, _ = pack_turns([r.edit for r in recs[10:]], 10, length)
    np.testing.assert_array_equal(job.turn_slice(1).input_ids, late.input_ids)
    assert job.warmup_turns().input_ids.shape == (1, 10, length) and job.warmup_turns(0) is None
    assert job.eval_set.size == 25 and job.base_loc is None


def test_eval_subset_base_predictions_and_too_few_edits(world):
    from lnjax.world import world_model
    model = world_model.default_model()
    tok = world.tokenizer()
    rows = world.records("edit", 12, seed=4)
    job = prepare_edits(rows, tok, model, edits_per_turn=4, n_turns=2, eval_records=slice(4, None))
    assert len(job.records) == 8 and job.n_turns == 2   # the first n_turns * edits_per_turn edits
    assert job.eval_set.size == 4
    assert job.eval_set.pairs["edit"] == [r.edit for r in job.records[4:]]
    np.testing.assert_array_equal(job.base_loc, eval_lib.base_predictions(model.apply, model.params, job.eval_set))
    with pytest.raises(ValueError, match="only 12 of 16 edits are usable"):
        prepare_edits(rows, tok, edits_per_turn=4, n_turns=4)
    assert prepare_edits(rows, tok, edits_per_turn=4, eval_records=None).eval_set is None
