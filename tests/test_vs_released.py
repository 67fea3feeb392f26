"""The pure helpers of experiments/vs_released.py (the end-to-end comparison with the released editor code): the
records writer (read back by lnjax's own readers), the torch-weight -> kernel transfer, the shift comparison, the
turn timing and the in-memory fix that lets the released StableEdit ``editor/base.py`` compile. The comparison
itself needs the released checkouts and minutes of CPU; it is an experiment, not a test."""

import ast
import json
import os
import pathlib

import numpy as np
import pytest

from fixtures import experiment_module

ROOT = pathlib.Path(__file__).resolve().parents[1]
RELEASED_STABLEEDIT = os.environ.get("LNJAX_RELEASED_STABLEEDIT", str(ROOT / "runs" / "released" / "StableEdit"))


@pytest.fixture(scope="module")
def vs():
    return experiment_module("vs_released")


def _row(i=0, **over):
    row = {"subject": f"S{i}", "relation": "country_capital", "src": f"The capital of S{i} is",
           "rephrase": f"S{i}'s capital is the city of", "answers": ["Old"], "pred": "Old", "alt": f"New{i}",
           "ans": f"New{i}", "loc": "Paris is the capital of", "loc_ans": "France"}
    row.update(over)
    return row


@pytest.mark.parametrize("layout", ["zsre", "ultraeditbench"])
def test_written_records_read_back_by_lnjax(vs, tmp_path, layout):
    from lnjax import data as data_lib
    path = vs.write_records(str(tmp_path / "r.json"), [_row(0), _row(1)], "t", layout)
    recs = data_lib.read(layout, path, 2, strict=True)
    assert [r.prompt for r in recs] == ["The capital of S0 is", "The capital of S1 is"]
    assert [r.target for r in recs] == ["New0", "New1"]
    assert recs[0].paraphrase == "S0's capital is the city of"
    # ZsRE's readers (lnjax's and the released ones) append "?" to loc; UltraEditBench's keep it as written
    assert recs[0].loc_prompt == "Paris is the capital of" + ("?" if layout == "zsre" else "")
    assert recs[0].loc_answer == "France"
    written = json.load(open(path))
    assert isinstance(written, list) and len(written) == 2
    if layout == "ultraeditbench":
        assert set(written[0]) == {"prompt", "rephrase_prompt", "ans", "loc", "loc_ans", "subject"}
    else:
        assert written[0]["alt"] == written[0]["ans"] == "New0" and written[0]["answers"] == ["Old"]


@pytest.mark.parametrize("field,value", [("src", ""), ("loc_ans", None), ("answers", []), ("rephrase", "  ")])
def test_records_refuse_an_empty_field_by_row_and_name(vs, field, value):
    with pytest.raises(ValueError, match=rf"src.json: row 1: field '{field}'"):
        vs.zsre_rows([_row(0), _row(1, **{field: value})], "src.json")


def test_records_refuse_ans_differing_from_alt(vs):
    with pytest.raises(ValueError, match="row 0: field 'ans'"):
        vs.zsre_rows([_row(0, ans="Other")])
    with pytest.raises(ValueError, match="unknown layout"):
        vs.zsre_rows([_row(0)], layout="fever")


def test_hf_weight_becomes_the_transposed_kernel(vs):
    w = np.arange(6, dtype=np.float64).reshape(2, 3)          # nn.Linear(3 -> 2): weight (out=2, in=3)
    k = vs.hf_weight_to_kernel(w, (3, 2), "layer")
    assert k.shape == (3, 2) and k.dtype == np.float32 and k.flags["C_CONTIGUOUS"]
    assert all(k[j, i] == w[i, j] for i in range(2) for j in range(3))
    with pytest.raises(ValueError, match="layer: weight of shape \\(2, 3\\)"):
        vs.hf_weight_to_kernel(w, (2, 3), "layer")            # not transposable to this kernel
    with pytest.raises(ValueError):
        vs.hf_weight_to_kernel(np.zeros(6), (3, 2))


def test_shift_difference(vs):
    base = np.zeros((2, 2))
    b = np.array([[2.0, 0.0], [0.0, -4.0]])
    a = b + np.array([[0.0, 0.04], [0.0, 0.0]])
    d = vs.shift_difference(base, a, b)
    assert d["max_abs_diff"] == pytest.approx(0.04) and d["max_abs_shift"] == 4.0
    assert d["relative"] == pytest.approx(0.01)
    assert d["frobenius_b"] == pytest.approx(np.sqrt(20.0))
    assert 0.99 < d["cosine"] < 1.0
    same = vs.shift_difference(base, b, b)
    assert same["max_abs_diff"] == 0.0 and same["cosine"] == pytest.approx(1.0)
    assert vs.shift_difference(base, b, base)["relative"] == float("inf")   # no reference shift at all


def test_turn_seconds(vs):
    stamps = [{"kind": "warmup", "start": 0.0, "end": 2.0}, {"kind": "edit", "start": 2.5, "end": 3.0},
              {"kind": "edit", "start": 3.0, "end": 4.5}]
    assert vs.turn_seconds(stamps) == {"warmup": [2.0], "edit": [0.5, 1.5]}
    with pytest.raises(ValueError, match="turn stamp 1"):
        vs.turn_seconds([stamps[0], {"kind": "edit", "start": 1.0, "end": None}])
    with pytest.raises(ValueError, match="unknown kind"):
        vs.turn_seconds([{"kind": "eval", "start": 0.0, "end": 1.0}])


SNIPPET = '''
class A:
    def f(self):
        if self.config.dataset.name in ["zsre"]:
            n = 1
        else:
            self.config.dataset.name in ["wikibigedit"]:
            n = 2
        return n
'''


def test_patch_else_condition_makes_the_released_branch_parse(vs):
    with pytest.raises(SyntaxError):
        ast.parse(SNIPPET)
    fixed, changed = vs.patch_else_condition(SNIPPET)
    assert changed
    ast.parse(fixed)
    assert 'elif self.config.dataset.name in ["wikibigedit"]:' in fixed
    same, changed = vs.patch_else_condition("x = 1\n")
    assert same == "x = 1\n" and not changed


def test_patch_on_the_released_stableedit_base():
    """The fix on the real file: needs a StableEdit work tree (runs/released/StableEdit, or
    $LNJAX_RELEASED_STABLEEDIT)."""
    path = pathlib.Path(RELEASED_STABLEEDIT) / "editor" / "base.py"
    if not path.exists():
        pytest.skip(f"no released StableEdit checkout at {path.parent.parent} (set LNJAX_RELEASED_STABLEEDIT)")
    vs = experiment_module("vs_released")
    src = path.read_text()
    fixed, changed = vs.patch_else_condition(src)
    try:
        ast.parse(src)
        assert not changed  # a fixed upstream file must be left alone
    except SyntaxError:
        assert changed
        ast.parse(fixed)


def test_phases_split_the_whole_job(vs):
    job = {"wall_seconds": 100.0, "timings": {"turns": {"warmup": [10.0], "edit": [20.0, 15.0]}, "eval_seconds": 30.0,
                                              "load_model_seconds": 5.0, "prepare_job_seconds": 12.0}}
    p = vs.phases(job)
    assert p["before_first_turn"] == pytest.approx(25.0)  # 100 - 10 - 35 - 30
    assert (p["load"], p["prepare"], p["final_eval"]) == (5.0, 12.0, 30.0)
    released = {"wall_seconds": 50.0, "timings": {"turns": {"warmup": [], "edit": [8.0]}, "eval_seconds": 30.0,
                                                  "load_seconds": 4.0, "unedited_eval_seconds": 6.0}}
    p = vs.phases(released)
    assert p["before_first_turn"] == pytest.approx(12.0) and p["load"] == 4.0 and p["prepare"] is None
    assert p["unedited_eval"] == 6.0 and vs.phases(job)["unedited_eval"] is None  # lnjax's is inside prepare
