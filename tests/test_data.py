import json

import pytest

from lnjax import data
from lnjax.data import DataError
from lnjax.world import World, WorldSpec

from fixtures import NoPunct

ZSRE = [{"subject": "Ann", "src": f"Who is Ann's father{'?' * (i + 1)}", "pred": "Bob",
         "rephrase": "Ann's father is who?", "alt": "Carl", "ans": "Carl", "loc": "nq question: where is paris",
         "loc_ans": "France", "cond": "Bob >> Carl || Who is Ann's father?"} for i in range(3)]
FEVER = [{"prompt": p, "alt": "yes", "equiv_prompt": ["Sky green?", "Green sky?"],
          "unrel_prompt": "Is water wet?", "unrel_ans": "yes"} for p in ("Is the sky green?", "Is grass blue?")]
WIKI = [{"update": "The CEO of X is", "ans": "Y", "rephrase": "X's CEO is", "loc": "The capital of Z is",
         "loc_ans": "W", "personas": "As a poet: the CEO of X is", "mhop": "The CEO of X was born in",
         "mhop_ans": "V"},
        {"update": "The CEO of Q is", "ans": "R", "rephrase": "Q's CEO is", "loc": "The capital of Z is",
         "loc_ans": "W", "personas": None, "mhop": None, "mhop_ans": None}]
UEB = [{"prompt": "A is located in", "ans": a, "rephrase_prompt": "Where is A? In", "loc": "C is in",
        "loc_ans": "D", "subject": "A"} for a in ("B", "E")]
CF = [{"case_id": 0, "requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis",
                                           "target_new": {"str": "piano"}, "target_true": {"str": "trumpet"}},
       "paraphrase_prompts": ["Miles Davis performs on the"], "neighborhood_prompts": ["Louis Armstrong plays the"]}]


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text(json.dumps(rows))
    return str(p)


def test_each_reader_maps_its_schema(tmp_path):
    z = data.read("zsre", _write(tmp_path, "z.json", ZSRE), 2)
    assert len(z) == 2 and z[0].prompt == "Who is Ann's father?" and z[0].target == "Carl"
    assert z[0].loc_prompt == "nq question: where is paris?" and z[1].row == 1
    f = data.read("fever", _write(tmp_path, "f.json", FEVER), 2, seed=3)
    assert f[0].paraphrase in FEVER[0]["equiv_prompt"] and f[0].target == "yes" and f[0].loc_answer == "yes"
    assert [r.paraphrase for r in f] == [r.paraphrase for r in data.read("fever", _write(tmp_path, "f.json", FEVER), 2, seed=3)]
    w = data.read("wikibigedit", _write(tmp_path, "w.json", WIKI))
    assert dict((n, (p, a)) for n, p, a in w[0].extra) == {"personas": ("As a poet: the CEO of X is", "Y"),
                                                           "multi_hop": ("The CEO of X was born in", "V")}
    assert w[1].extra == ()
    u = data.read("ultraeditbench", _write(tmp_path, "u.json", UEB), 1)
    assert u[0].paraphrase == "Where is A? In"
    c = data.read("counterfact", _write(tmp_path, "c.json", CF))
    assert c[0].prompt == "Miles Davis plays the" and c[0].target == "piano" and c[0].loc_answer == "trumpet"


@pytest.mark.parametrize("mutate,match,field,reason", [
    (lambda r: r.pop("ans"), r"row 1: field 'ans': missing", "ans", "missing"),
    (lambda r: r.update(ans="  "), r"row 1: field 'ans': empty", "ans", "empty"),
    (lambda r: r.update(ans=None), r"row 1: field 'ans': null", "ans", "null"),
    (lambda r: r.update(src="Who is Ann's father?"), r"row 1: field 'prompt': the same edit .* as row 0", "prompt",
     "the same edit (prompt and target) as row 0"),
])
def test_unusable_rows_are_skipped_and_named_or_refused_when_strict(tmp_path, mutate, match, field, reason):
    rows = [dict(r) for r in ZSRE]
    mutate(rows[1])
    path = _write(tmp_path, "bad.json", rows)
    with pytest.raises(data.UnusableRow, match=match) as e:
        data.read("zsre", path, 3, strict=True)
    assert "bad.json" in str(e.value)
    report, lines = data.ReadReport(), []
    good = data.read("zsre", path, 2, report=report, log=lines.append)
    assert [g.row for g in good] == [0, 2] and report.rows == 3
    assert report.skipped == [{"file": path, "row": 1, "field": field, "reason": reason}]
    assert len(lines) == 1 and "bad.json: row 1" in lines[0] and "skipped" in lines[0]
    with pytest.raises(DataError, match=r"3 records were asked for, the file has 2 usable rows \(1 skipped"):
        data.read("zsre", path, 3, report=data.ReadReport())
    with pytest.warns(UserWarning, match="1 unusable rows skipped"):  # no report, no log: still not silent
        data.read("zsre", path, 2)


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r.update(src=17), r"row 1: field 'src': expected a string, found int"),
    (lambda r: r.update(ans=["Carl"]), r"row 1: field 'ans': expected a string, found list"),
])
def test_structural_errors_are_never_skipped(tmp_path, mutate, match):
    rows = [dict(r) for r in ZSRE]
    mutate(rows[1])
    path = _write(tmp_path, "bad.json", rows)
    with pytest.raises(DataError, match=match) as e:
        data.read("zsre", path, 2, report=data.ReadReport())
    assert not isinstance(e.value, data.UnusableRow)


def test_non_utf8_bytes_name_file_line_and_byte(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes(b'[\n{"src": "ok"},\n{"src": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin1\.json: line 3, byte 29: not UTF-8"):
        data.read("zsre", str(p))
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(ZSRE).encode())  # a byte-order mark is accepted
    assert len(data.read("zsre", str(p))) == 3


def test_json_lines_and_truncated_files_are_refused(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text("\n".join(json.dumps(r) for r in ZSRE))
    with pytest.raises(DataError, match="expected a JSON array, found JSON lines"):
        data.read("zsre", str(p))
    p.write_text(json.dumps(ZSRE)[:-40])
    with pytest.raises(DataError, match=r"lines.json: row 2"):
        data.read("zsre", str(p))
    with pytest.raises(DataError, match="3 records were asked for, the file has 2"):
        data.read("fever", _write(tmp_path, "f.json", FEVER), 3)


def test_streaming_reads_only_the_rows_asked_for(tmp_path):
    rows = [dict(UEB[0], prompt=f"A{i} is located in") for i in range(5000)]
    path = _write(tmp_path, "big.json", rows)
    report = data.ReadReport()
    got = data.read("ultraeditbench", path, 10, report=report)
    assert [g.prompt for g in got] == [f"A{i} is located in" for i in range(10)] and report.rows == 10
    assert sum(1 for _ in data.iter_json_array(path, chunk_size=333)) == 5000


def test_tokenization_errors_name_row_and_field():
    world = World(WorldSpec(n_subjects=50))
    tok = world.tokenizer()
    recs = data.records_from_dicts("zsre", world.records("edit", 3), "world")
    t = data.tokenize(recs, tok)
    p, a = t[0].edit
    assert p[0] == 1 and len(a) >= 1 and p == tok.encode(recs[0].prompt)
    bad = [recs[0], data.EditRecord("where does x live ?", "!!", "p", "l", "x", source="f.json", row=7)]
    with pytest.raises(DataError, match=r"f.json: row 7: field 'target': answer '!!' tokenizes to nothing"):
        data.tokenize(bad, NoPunct(tok), strict=True)
    with pytest.raises(DataError, match=r"world: row 0: field 'edit': \d+ tokens, more than the maximum length 3"):
        data.tokenize(recs, tok, max_length=3)
    with pytest.raises(data.UnusableRow, match="tokenizes to nothing"):
        data.tokenize(bad, NoPunct(tok), strict=True)
    report = data.ReadReport()
    assert len(data.tokenize(bad, NoPunct(tok), report=report)) == 1
    assert report.skipped == [{"file": "f.json", "row": 7, "field": "target", "reason": "answer '!!' tokenizes to nothing"}]


def test_world_is_deterministic_and_splits_are_disjoint():
    a, b = World(WorldSpec(seed=5, n_subjects=200)), World(WorldSpec(seed=5, n_subjects=200))
    assert a.records("edit", 20) == b.records("edit", 20)
    assert a.records("edit", 20, seed=1) != a.records("edit", 20)
    pools = [set(a.pools[k]) for k in ("edit", "train", "locality")]
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])
    for r in a.records("edit", 50):
        assert r["ans"] != r["pred"] and r["src"] != r["rephrase"] and r["subject"] in r["src"]
        rel = next(x for x in a.relations if x.name == r["relation"])
        assert r["ans"] in rel.answers
    lens = [len(a.tokenizer().encode(" " + x, False)) for rel in a.relations for x in rel.answers]
    assert max(lens) >= 2 and min(lens) == 1
    with pytest.raises(ValueError, match="pool has"):
        a.records("edit", 10 ** 6)


def test_edit_stream_revisits_facts_with_new_targets():
    w = World(WorldSpec(n_subjects=30))
    pool = len(w.all_facts("edit"))
    rows, ids = w.edit_stream(2 * pool + 5)
    assert len(rows) == len(ids) == 2 * pool + 5
    assert sorted(ids[:pool]) == list(range(pool)) and sorted(ids[pool:2 * pool]) == list(range(pool))
    last = {}
    for r, i in zip(rows, ids):
        if i in last:
            assert r["ans"] != last[i]
        last[i] = r["ans"]
