"""The fair evidence protocol (lnjax.world.fair, issue 23): what builds the memory, what tunes, what is scored.

These check the protocol itself on a small world (no trained model): the memory's keys cannot see an evaluation
wording, tuning and evaluation subjects are disjoint, every locality family is non-empty, kept and probed in a
scored wording, and ``check_protocol`` fires when any of that is broken.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.app import hparams
from lnjax.models import Model, ModelConfig, init_params
from lnjax.models.layers import memory_read
from lnjax.world import World, WorldSpec, fair, memory_testbed

from fixtures import random_memory


@pytest.fixture(scope="module")
def world():
    return World(WorldSpec(seed=3, n_subjects=120))


@pytest.fixture(scope="module")
def split(world):
    return fair.fair_split(world, seed=1)


def _unit_keys(world, d=16, seed=0):
    k = np.random.default_rng(seed).normal(size=(d, world.n_facts))
    return k / np.linalg.norm(k, axis=0)


def test_split_roles_are_disjoint_and_partition_the_pools(world, split):
    tune, ev = set(split.subjects["tune"].tolist()), set(split.subjects["eval"].tolist())
    assert tune and ev and not tune & ev
    assert tune | ev == set(world.pools["edit"].tolist()) | set(world.pools["locality"].tolist())
    assert not (tune | ev) & set(world.pools["train"].tolist())
    n_rel = len(world.relations)
    for role in fair.ROLES:
        editable, kept = set(split.editable[role].tolist()), set(split.kept[role].tolist())
        assert editable and kept and not editable & kept
        assert {f // n_rel for f in editable | kept} == set(split.subjects[role].tolist())
        # every edit-pool subject keeps exactly `kept_relations` of its relations out of the edits
        for s in {f // n_rel for f in editable}:
            assert sum(s * n_rel + r in kept for r in range(n_rel)) == split.kept_relations


def test_edit_requests_use_the_key_wording_and_every_probe_an_evaluation_wording(world, split):
    rows, facts = fair.edit_records(world, split, "eval", 140, seed=4)
    n_rel = len(world.relations)
    assert len(set(facts.tolist())) == 140 and set(facts.tolist()) <= set(split.editable["eval"].tolist())
    kept_prompts = {world.prompt(f // n_rel, f % n_rel, t)[:-2]: f for f in split.kept["eval"]
                    for t in fair.EVAL_WORDINGS}
    for row, f in zip(rows, facts):
        s, r = divmod(int(f), n_rel)
        assert row["src"] == world.prompt(s, r, 0) and row["ans"] != row["pred"] == world.answer(s, r)
        assert row["rephrase"] in {world.prompt(s, r, t) for t in fair.EVAL_WORDINGS}
        assert row["loc"] in kept_prompts  # a kept fact of the evaluated role, in a scored wording
    with pytest.raises(ValueError, match="editable facts"):
        fair.edit_records(world, split, "tune", len(split.editable["tune"]) + 1)


def test_re_edits_always_move_a_fact_to_a_new_answer(world, split):
    rows, facts = fair.edit_stream(world, split, "tune", 3 * len(split.editable["tune"]), seed=2)
    last = {}
    for row, f in zip(rows, facts.tolist()):
        assert row["ans"] != row["pred"]
        if f in last:
            assert row["pred"] == last[f]  # the previous edit's answer is what this one replaces
        last[f] = row["ans"]
    assert np.bincount(facts).max() == 3


def test_memory_keys_never_see_an_evaluation_wording(world):
    """Changing the evaluation wordings leaves the fair memory's keys bit for bit unchanged, and does change the
    all-wordings construction's keys (so the check can fail)."""
    cfg = ModelConfig(arch="llama", vocab_size=len(world.vocab), d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      d_ff=32, max_positions=32)
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    fits = {"model.layers.0.memory.key_proj": (np.zeros(16), np.eye(16))}
    other = World(world.spec)
    other.relations = tuple(dataclasses.replace(r, templates=(r.templates[0], r.templates[2], r.templates[2]))
                            for r in world.relations)
    keys = {}
    for w in (world, other):
        for wordings in (fair.KEY_WORDINGS, "all"):
            keys[id(w), wordings] = memory_testbed.fact_slot_keys(model, (0,), w, fits, wordings)[
                "model.layers.0.memory.key_proj"]
    np.testing.assert_array_equal(keys[id(world), fair.KEY_WORDINGS], keys[id(other), fair.KEY_WORDINGS])
    assert np.abs(keys[id(world), "all"] - keys[id(other), "all"]).max() > 1e-3
    built = {tuple(p) for pairs in fair.key_examples(world) for p, _ in pairs}
    scored = {tuple(p) for pairs in fair.key_examples(world, fair.EVAL_WORDINGS) for p, _ in pairs}
    assert built and scored and not built & scored


def test_locality_families_are_kept_facts_that_can_fail(world, split):
    rows, edited = fair.edit_records(world, split, "eval", 120, seed=0)
    keys = _unit_keys(world)
    fams = fair.locality_families(world, split, "eval", edited, keys, n=10_000)
    fair.check_protocol(split, key_wordings=fair.KEY_WORDINGS, families=fams, edited=edited)
    n_rel = len(world.relations)
    kept = split.kept["eval"]
    assert set(fams) == set(fair.FAMILIES)
    # the edited subjects' other relations
    assert {f // n_rel for f in fams["subject"][:, 0]} <= {f // n_rel for f in edited}
    # the kept fact nearest (by memory key) to each edited fact is probed
    for f in edited[:20]:
        nearest = kept[np.argmax(keys[:, f] @ keys[:, kept])]
        assert nearest in fams["nearest_key"][:, 0]
    # kept facts sharing an edited fact's old answer (same relation)
    old = {(f % n_rel, world.facts.reshape(-1)[f]) for f in edited}
    assert all((f % n_rel, world.facts.reshape(-1)[f]) in old for f in fams["shared_answer"][:, 0])


def test_check_protocol_fires_on_a_corrupted_protocol(world, split):
    _, edited = fair.edit_records(world, split, "eval", 100, seed=0)
    fams = fair.locality_families(world, split, "eval", edited, _unit_keys(world), n=50)
    ok = dict(key_wordings=fair.KEY_WORDINGS, families=fams, edited=edited)
    fair.check_protocol(split, **ok)
    with pytest.raises(fair.ProtocolError, match="scored"):
        fair.check_protocol(split, **{**ok, "key_wordings": (0, 1)})
    leaked = {**fams, "subject": np.concatenate([fams["subject"], [[edited[0], 1]]])}
    with pytest.raises(fair.ProtocolError, match="edited facts"):
        fair.check_protocol(split, **{**ok, "families": leaked})
    with pytest.raises(fair.ProtocolError, match="not an evaluation wording"):
        fair.check_protocol(split, **{**ok, "families": {**fams, "random": fams["random"] * [1, 0]}})
    with pytest.raises(fair.ProtocolError, match="empty"):
        fair.check_protocol(split, **{**ok, "families": {**fams, "random": fams["random"][:0]}})
    with pytest.raises(fair.ProtocolError, match="kept facts"):
        tune_fams = fair.locality_families(world, split, "tune", split.editable["tune"][:50], _unit_keys(world), 50)
        fair.check_protocol(split, **{**ok, "families": tune_fams, "edited": split.editable["tune"][:50]})
    with pytest.raises(fair.ProtocolError, match="tuned on and evaluated"):
        fair.check_protocol(split, **ok, tuned_on=split.subjects["tune"],
                            evaluated=np.r_[split.subjects["eval"], split.subjects["tune"][:1]])
    mixed = dataclasses.replace(split, subjects={"tune": split.subjects["tune"],
                                                 "eval": np.r_[split.subjects["eval"], split.subjects["tune"][:1]]})
    with pytest.raises(fair.ProtocolError, match="overlap"):
        fair.check_protocol(mixed, **ok)


def test_winner_read_by_gather_equals_the_dense_code():
    rng = np.random.default_rng(0)
    d, keys, offsets, t = 8, 5, 3, 0.1
    mem = random_memory(rng, d, keys, offsets)
    x = jnp.asarray(rng.normal(size=(2, 6, d)), jnp.float32)
    ids = jnp.asarray([[1, 7, 2, 3, 4, 5], [7, 2, 7, 3, 3, 3]])
    from lnjax.models.layers import anchored
    gathered = memory_read(x, {m: {n: jnp.asarray(a, jnp.float32) for n, a in p.items()} for m, p in mem.items()},
                           t, "cosine", anchored(ids, 7, offsets), True)
    # a NumPy kernel is not a jax.Array: the dense product runs (as with the probe's Tap)
    dense = memory_read(x, {m: {n: (np.asarray(a, np.float32) if m == "value_proj" else jnp.asarray(a, jnp.float32))
                                for n, a in p.items()} for m, p in mem.items()},
                        t, "cosine", anchored(ids, 7, offsets), True)
    assert np.abs(np.asarray(dense)).max() > 0.1
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(dense), rtol=1e-5, atol=1e-5)


def test_fair_testbed_hyperparameters_are_what_lnjax_run_resolves():
    for name, want in hparams.FAIR_TESTBED_HPARAMS.items():
        got = hparams.resolve(name, dataset="world", turns=20)
        assert (got["lr"], got["alpha"]) == (want["lr"], want["alpha"])
        assert hparams.registry_name(name) == want["editor"]
    # the same-lr ablation is UltraEdit's solve without normalization, at UltraEdit's lr (the papers' Fig. 1a)
    assert hparams.FAIR_TESTBED_HPARAMS["no_normalization"]["lr"] == hparams.FAIR_TESTBED_HPARAMS["ultraedit"]["lr"]
    assert hparams.registry_name("no_normalization_tuned") == "no_normalization"


def test_meta_trained_editors_start_from_their_tuned_initial_lr_on_the_testbed():
    """On the default testbed a hypernetwork's meta-training starts from its row of FAIR_TESTBED_BASELINE_HPARAMS
    (the initial edit lr tuned by experiments/tune_fair.py); --lr, then the editor options, override it; off the
    testbed no row applies (the published settings)."""
    from lnjax.app.run import RunConfig, meta_options
    from lnjax.engine.meta import default_configs
    rows = {n: r for n, r in hparams.FAIR_TESTBED_BASELINE_HPARAMS.items() if n in hparams.META_TRAINED}
    assert "rledit" in rows
    for name, row in rows.items():
        got = meta_options(name, RunConfig(editors=(name,)))
        assert got == row and default_configs(name, **got)[0].lr == row["lr"] != default_configs(name)[0].lr
        assert meta_options(name, RunConfig(editors=(name,), lr=7.0))["lr"] == 7.0
        assert meta_options(name, RunConfig(editors=(name,), lr=7.0, editor_options={"lr": 2.0}))["lr"] == 2.0
        assert meta_options(name, RunConfig(editors=(name,), model="lnjax/assets/world_model")) == {}
    # the ablations have no tuned row: they start from the published lr
    assert meta_options("rledit_no_normalization", RunConfig(editors=("rledit_no_normalization",))) == {}


def test_model_baselines_on_the_testbed_edit_the_memory_at_their_tuned_settings():
    """On the default testbed FT edits the run's targets (the memory) at its tuned settings, not the dense world
    model's targets and published lr; MEMIT and AlphaEdit are refused with the reason."""
    from lnjax.app import baselines
    from fixtures import tiny_model
    memory = ("model.layers.3.memory.value_proj",)
    editor, targets, meta = baselines.for_run("ft", tiny_model(), memory, dataset="world", explicit_targets=False,
                                              testbed=True, log=None)
    assert targets == memory
    assert meta["baseline_settings"] == hparams.FAIR_TESTBED_BASELINE_HPARAMS["ft"]
    assert editor.config.lr == hparams.FAIR_TESTBED_BASELINE_HPARAMS["ft"]["lr"] > 1.0
    assert editor.config.norm_constraint is None
    off = baselines.for_run("ft", tiny_model(), memory, dataset="world", explicit_targets=False, log=None)[0]
    assert off.config.lr != editor.config.lr   # off the testbed: the world model's settings
    for name in ("memit", "alphaedit"):
        with pytest.raises(ValueError, match="36,000"):
            baselines.for_run(name, tiny_model(), memory, dataset="world", explicit_targets=False, testbed=True)
