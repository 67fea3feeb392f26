"""The tuning rule of experiments/smollm2_frontier.py (every editor on SmolLM2 at 2,000 edits): the grids, their
direction per editor, the tie rule, and the rows reused from a log. The study itself needs SmolLM2 and CPU-hours;
it is an experiment, not a test."""

import json

import pytest

from fixtures import experiment_module


@pytest.fixture(scope="module")
def fr():
    return experiment_module("smollm2_frontier")


def test_every_grid_spans_the_decade_on_the_weaker_side_of_its_centre(fr):
    offsets = [-2, -1, 0]
    lrs = fr.grid(1e-3, offsets, fr.knob("ultraedit")[1])
    assert lrs == pytest.approx([1e-4, 10 ** -3.5, 1e-3])          # learning rates step down
    for name, published in (("memit", 15000.0), ("alphaedit", 10.0)):
        setting, direction = fr.knob(name)
        assert fr.CENTRES[name][0] == published and setting in ("mom2_update_weight", "l2")
        ridge = fr.grid(published, offsets, direction)
        assert ridge == pytest.approx([10 * published, 10 ** 0.5 * published, published])  # ridge weights step up
    # "weaker" is the smaller lr and the larger ridge weight; the rule's ties go to the weaker setting
    assert fr.weakness("ultraedit", 1e-4) > fr.weakness("ultraedit", 1e-3)
    assert fr.weakness("alphaedit", 100.0) > fr.weakness("alphaedit", 10.0)
    rows = [{"lr": v, "score": 0.5} for v in (100.0, 31.6, 10.0)]
    assert max(rows, key=lambda r: (r["score"], fr.weakness("alphaedit", r["lr"])))["lr"] == 100.0
    assert max(rows, key=lambda r: (r["score"], fr.weakness("no_normalization", r["lr"])))["lr"] == 10.0


def test_rows_reused_from_a_log_are_its_json_lines(fr, tmp_path):
    log = tmp_path / "tune.log"
    row = {"editor": "alphaedit", "lr": 31.6, "score": 0.6}
    summary = {"chosen": {"alphaedit": 31.6}, "score": 0.6}   # a summary line, not a tuning row
    log.write_text("loading SmolLM2\n" + json.dumps(row) + "\n" + json.dumps(summary) + "\ndone in 3 s\n")
    assert fr.reused_rows(str(log)) == {("alphaedit", 31.6): row}
    assert fr.reused_rows("") == {}
