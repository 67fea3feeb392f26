"""The community layouts: MEND-format ZsRE (target ``alt``) beside UltraEdit's (target ``ans``), and EasyEdit's
JSON (flat and KnowEdit-style nested locality/portability), on hand-written rows."""

import json

import pytest

from lnjax import data
from lnjax.data import DataError

MEND = [{"subject": "Ann", "src": "Who is Ann's father?", "answers": ["Bob"], "alt": "Carl",
         "rephrase": "Ann's father is who?", "loc": "nq question: where is paris", "loc_ans": "France",
         "cond": "Bob >> Carl || Who is Ann's father?"},
        {"subject": "Eve", "src": "What is Eve's job?", "answers": ["nurse", "carer"], "alt": "pilot",
         "rephrase": "Eve works as a", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}]
ULTRA = [{"subject": "Ann", "src": "Who is Ann's father?", "pred": "Bob", "rephrase": "Ann's father is who?",
          "alt": "Carl", "ans": "Dan", "loc": "nq question: where is paris", "loc_ans": "France"}]
EASY_FLAT = [{"prompt": "Q: Who is Ann's father? A:", "target_new": "Carl", "ground_truth": "Bob",
              "rephrase_prompt": "Ann's father is", "locality_prompt": "where is paris",
              "locality_ground_truth": "France", "subject": "Ann"}]
EASY_NESTED = [{"subject": "Ann", "prompt": "Ann's father is", "target_new": "Carl", "ground_truth": ["Bob"],
                "rephrase_prompt": "The father of Ann is",
                "locality": {"Relation_Specificity": [{"prompt": "Ann's mother is", "ground_truth": [["Dora"]]},
                                                      {"prompt": "Ann's sister is", "ground_truth": ["Liz"]}]},
                "portability": {"Reasoning": [{"prompt": "Ann's grandfather is the father of", "ground_truth":
                                               ["Carl"]}],
                                "Subject_Aliasing": {"prompt": "Annie's father is", "ground_truth": "Carl"}}}]


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text(json.dumps(rows))
    return str(p)


def test_zsre_mend_layout_targets_alt_and_is_reported(tmp_path):
    report = data.ReadReport()
    recs = data.read("zsre", _write(tmp_path, "mend.json", MEND), report=report)
    assert report.layout == "mend"
    assert [r.target for r in recs] == ["Carl", "pilot"]
    assert recs[0].prompt == "Who is Ann's father?" and recs[1].paraphrase == "Eve works as a"
    assert recs[0].loc_prompt == "nq question: where is paris?" and recs[1].loc_answer == "Shakespeare"


def test_zsre_ultraedit_layout_still_targets_ans(tmp_path):
    report = data.ReadReport()
    recs = data.read("zsre", _write(tmp_path, "u.json", ULTRA), report=report)
    assert report.layout == "ultraedit" and recs[0].target == "Dan"


def test_zsre_errors_name_file_row_and_field(tmp_path):
    bad = [dict(MEND[0]), {k: v for k, v in MEND[1].items() if k != "alt"}]
    with pytest.raises(DataError, match=r"bad\.json: row 1: field 'alt': missing"):
        data.read("zsre", _write(tmp_path, "bad.json", bad), strict=True)
    mixed = [MEND[0], ULTRA[0]]
    with pytest.raises(DataError, match=r"mixed\.json: row 1: field 'alt'.*mend layout"):
        data.read("zsre", _write(tmp_path, "mixed.json", mixed))
    no_answers = [{k: v for k, v in MEND[0].items() if k != "answers"}]
    with pytest.raises(DataError, match=r"row 0: field 'answers'"):
        data.read("zsre", _write(tmp_path, "na.json", no_answers), strict=True)


def test_easyedit_flat_layout(tmp_path):
    (r,) = data.read("easyedit", _write(tmp_path, "e.json", EASY_FLAT))
    assert (r.prompt, r.target, r.paraphrase, r.loc_prompt, r.loc_answer) == \
        ("Q: Who is Ann's father? A:", "Carl", "Ann's father is", "where is paris", "France")
    assert r.extra == ()


def test_easyedit_nested_locality_and_portability(tmp_path):
    (r,) = data.read("easyedit", _write(tmp_path, "k.json", EASY_NESTED))
    assert r.target == "Carl" and r.paraphrase == "The father of Ann is"
    assert (r.loc_prompt, r.loc_answer) == ("Ann's mother is", "Dora")
    assert r.extra == (("portability.Reasoning", "Ann's grandfather is the father of", "Carl"),
                       ("portability.Subject_Aliasing", "Annie's father is", "Carl"))


def test_easyedit_errors_name_file_row_and_field(tmp_path):
    rows = [EASY_FLAT[0], {k: v for k, v in EASY_FLAT[0].items() if k != "target_new"}]
    with pytest.raises(DataError, match=r"e\.json: row 1: field 'target_new'"):
        data.read("easyedit", _write(tmp_path, "e.json", rows), strict=True)
    bad = json.loads(json.dumps(EASY_NESTED))
    del bad[0]["portability"]["Reasoning"][0]["ground_truth"]
    with pytest.raises(DataError, match=r"row 0: field 'portability.Reasoning.ground_truth': missing"):
        data.read("easyedit", _write(tmp_path, "p.json", bad), strict=True)
    no_loc = [{k: v for k, v in EASY_NESTED[0].items() if k != "locality"}]
    with pytest.raises(DataError, match=r"row 0: field 'locality_prompt': missing"):
        data.read("easyedit", _write(tmp_path, "l.json", no_loc), strict=True)
