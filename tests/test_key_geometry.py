"""experiments/key_geometry.py: the spectrum from the small side, the logit margins, and one small run on the
shipped world model (leverage, margins and the summary table)."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import key_geometry  # noqa: E402
from lnjax.world import world_model  # noqa: E402


def test_covariance_spectrum_from_either_side_matches_numpy():
    rng = np.random.default_rng(0)
    tall = rng.normal(size=(60, 7)) @ rng.normal(size=(7, 7))
    np.testing.assert_allclose(key_geometry.covariance_spectrum(tall), np.linalg.eigvalsh(np.cov(tall.T))[::-1],
                               atol=1e-9)
    wide = rng.normal(size=(12, 40))
    np.testing.assert_allclose(key_geometry.covariance_spectrum(wide),
                               np.linalg.eigvalsh(np.cov(wide.T))[::-1][:12], atol=1e-9)


def test_answer_margins_are_gold_minus_best_other():
    model = world_model.default_model()
    pairs = [([1, 10, 11, 12], [13, 14]), ([1, 20, 21], [22])]
    got = key_geometry.answer_margins(model, pairs)
    assert got.shape == (3,)
    for (prompt, answer), want_rows in zip(pairs, ([0, 1], [2])):
        ids = np.asarray([prompt + answer[:-1]])
        logits = np.asarray(model.apply(model.params, ids, np.ones_like(ids)), np.float64)[0, len(prompt) - 1:]
        for j, row in enumerate(want_rows):
            other = np.delete(logits[j], answer[j]).max()
            np.testing.assert_allclose(got[row], logits[j, answer[j]] - other, rtol=1e-4, atol=1e-4)


def test_small_run_writes_leverage_and_margins(tmp_path):
    key_geometry.main(["--edits", "20", "--turn-sizes", "5,10", "--layers", "3", "--out", str(tmp_path)])
    out = json.load(open(tmp_path / "key_geometry.json"))
    row = out["targets"]["model.layers.3.mlp.down_proj"]
    assert set(row["leverage_by_turn_size"]) == {"5", "10"} and row["all_row_leverage"] > 0
    assert 0.5 < row["own_leverage_by_turn_size"]["10"] <= 1.0 + 1e-6
    margins = out["margin_percentiles"]
    assert margins["locality (gold vs best other)"]["50"] > 0 > margins["edit new target (vs best other)"]["50"]
    assert "all-row leverage" in open(tmp_path / "summary.md").read()
    assert set(row["leverage_percentiles"]) == {"10", "50", "90", "max"}
    assert {k.split(",")[0] for k in row["cosine_by_prediction"]} == {"first", "later"}


def test_cosine_by_prediction_groups_pairs_by_row_kind_and_predicted_token():
    rng = np.random.default_rng(1)
    loc, edit = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    loc_first = np.array([True, False, True, False, False])
    loc_pred, edit_pred = np.array([7, 7, 8, 9, 8]), np.array([7, 8, 8])
    got = key_geometry.cosine_by_prediction(loc, loc_first, loc_pred, edit, edit_pred, high=0.2)
    cos = [[float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for b in edit] for a in loc]
    for kind, first in (("first", True), ("later", False)):
        for name, same in (("same token", True), ("other token", False)):
            vals = [cos[i][j] for i in range(5) for j in range(3)
                    if loc_first[i] == first and (loc_pred[i] == edit_pred[j]) == same]
            if vals:
                r = got[f"{kind}, {name}"]
                assert r["pairs"] == len(vals)
                np.testing.assert_allclose(r["mean"], np.mean(vals), rtol=1e-12)
                np.testing.assert_allclose(r["above"], np.mean(np.array(vals) > 0.2), rtol=1e-12)
            else:
                assert f"{kind}, {name}" not in got


def test_flips_by_exposure_counts_changed_predictions_per_bucket():
    import leak_by_answer

    before = np.array([1, 2, 3, 4, 5, 6])
    after = np.array([1, 9, 3, 9, 9, 6])
    exposure = np.array([0, 0, 1, 3, 20, 20])
    got = leak_by_answer.flips_by_exposure(before, after, exposure, buckets=((0, 0), (1, 4), (5, 14), (15, 10 ** 9)))
    assert got == [{"exposure": "0-0", "facts": 2, "flipped": 0.5}, {"exposure": "1-4", "facts": 2, "flipped": 0.5},
                   {"exposure": "15+", "facts": 2, "flipped": 0.5}]


def test_leak_by_answer_small_run(tmp_path):
    import leak_by_answer

    leak_by_answer.main(["--turns", "1", "--edits-per-turn", "10", "--n-loc", "50", "--out", str(tmp_path)])
    out = json.load(open(tmp_path / "leak_by_answer.json"))
    assert out["edits"] == 10 and out["kept_facts"] == 50 and 0.0 <= out["flipped_overall"] <= 1.0
    assert sum(b["facts"] for b in out["by_same_old_answer"]) == 50
    # the buckets partition the kept facts: their flips add up to the overall share
    for key in ("by_exposure", "by_same_old_answer", "by_exposure_as_new_target"):
        assert np.isclose(sum(b["facts"] * b["flipped"] for b in out[key]), 50 * out["flipped_overall"])
    assert "whole old answer" in open(tmp_path / "summary.md").read()
