import jax
import jax.numpy as jnp
import numpy as np

from lnjax import eval as ev
from lnjax.data import TokenizedRecord
from lnjax.models import Model, ModelConfig, init_params

CFG = ModelConfig(arch="llama", vocab_size=37, d_model=16, n_layers=1, n_heads=2, d_ff=32)


def _model():
    return Model(CFG, init_params(CFG, jax.random.PRNGKey(0), std=0.5))


def _records(n=7, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda: (list(rng.integers(1, 37, rng.integers(2, 6))), list(rng.integers(1, 37, rng.integers(1, 4))))
    return [TokenizedRecord(mk(), mk(), mk(), {}) for _ in range(n)]


def _manual_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model.apply(model.params, jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt):]


def test_greedy_exact_match_equals_a_manual_loop():
    model = _model()
    recs = _records()
    pairs = [r.edit for r in recs]
    # make half of the answers exactly what the model generates, so both outcomes are exercised
    pairs = [(p, _manual_greedy(model, p, len(a))) if i % 2 == 0 else (p, a) for i, (p, a) in enumerate(pairs)]
    got = ev.greedy_exact_match(model.apply, model.params, pairs, chunk=4)
    want = [float(_manual_greedy(model, p, len(a)) == list(a)) for p, a in pairs]
    np.testing.assert_array_equal(got, want)
    assert got[::2].all()
    # the same numbers from the teacher-forced predictions, as ``evaluate`` computes them
    es = ev.build_eval_set([TokenizedRecord((p, a), (p, a), (p, a), {}) for p, a in pairs])
    em = ev.exact_match(ev.predictions(model.apply, model.params, es.batches["edit"]),
                        np.asarray(es.batches["edit"].labels))
    np.testing.assert_array_equal(em, want)
    m = ev.evaluate(model.apply, model.params, es, protocols=("generation_exact_match",))
    assert m["generation_exact_match"]["efficacy"] == np.mean(want)


def test_teacher_forced_metrics_and_locality_protocols():
    model = _model()
    recs = _records(9)
    es = ev.build_eval_set(recs)
    base = ev.base_predictions(model.apply, model.params, es)
    m = ev.evaluate(model.apply, model.params, es, base, per_example=True)
    assert m["locality_vs_unedited"] == 1.0
    # teacher-forced accuracy by hand for the edit probe
    hand = []
    for p, a in (r.edit for r in recs):
        ids = p + a[:-1]
        logits = model.apply(model.params, jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), jnp.int32))
        pred = np.asarray(jnp.argmax(logits[0], -1))[len(p) - 1:]
        hand.append(np.mean(pred == np.asarray(a)))
    assert abs(m["teacher_forced"]["efficacy"] - np.mean(hand)) < 1e-9
    other = jax.tree_util.tree_map(lambda x: x * 1.5, model.params)
    m2 = ev.evaluate(model.apply, other, es, base, protocols=("locality_vs_unedited",))
    assert m2["locality_vs_unedited"] < 1.0 and set(m2) == {"locality_vs_unedited"}


def test_retention_by_turn():
    r = ev.retention_by_turn(np.array([1.0, 0.0, 0.5, 1.0]), np.array([0, 0, 1, 1]), 3)
    assert r[:2].tolist() == [0.5, 0.75] and np.isnan(r[2])


def test_hidden_states_then_head_at_gathered_positions_equal_the_full_forward():
    """``Model.apply_hidden`` + ``Model.head`` at gathered positions give the logits of the full forward there, for
    every architecture (tied and untied heads), as ``predictions`` relies on."""
    from lnjax.models import split_apply
    cases = [ModelConfig(arch="llama", vocab_size=37, d_model=16, n_layers=2, n_heads=2, d_ff=32),
             ModelConfig(arch="llama", vocab_size=37, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                         tie_embeddings=True),
             ModelConfig(arch="gpt2", vocab_size=37, d_model=16, n_layers=1, n_heads=2, d_ff=32),
             ModelConfig(arch="gptj", vocab_size=37, d_model=16, n_layers=1, n_heads=2, d_ff=32)]
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 37, (3, 9)), jnp.int32)
    mask = jnp.ones((3, 9), jnp.int32).at[2, 6:].set(0)
    pos = jnp.asarray([[0, 8], [3, 4], [5, 1]], jnp.int32)
    for cfg in cases:
        model = Model(cfg, init_params(cfg, jax.random.PRNGKey(1), std=0.5))
        hidden, head = split_apply(model.apply)
        assert (hidden, head) == (model.apply_hidden, model.head)
        full = model.apply(model.params, ids, mask)
        h = model.apply_hidden(model.params, ids, mask)
        assert h.shape == (3, 9, cfg.d_model)
        np.testing.assert_allclose(model.head(model.params, jnp.take_along_axis(h, pos[:, :, None], axis=1)),
                                   jnp.take_along_axis(full, pos[:, :, None], axis=1), rtol=1e-6, atol=1e-6)
    assert split_apply(lambda p, i, m: None) is None


def _old_evaluate(model, es, base_loc, protocols):
    """The evaluation as it was: every probe set padded to its longest probe, logits at every position."""
    dense = {k: ev.dense_predictions(model.apply, model.params, b) for k, b in es.batches.items()}
    return ev.evaluate(model.apply, model.params, es, base_loc, protocols, per_example=True, known=dense)


def test_bucketed_supervised_predictions_equal_the_dense_path():
    """The bucketed evaluation (length buckets, calls fitted to them, the head at supervised positions only)
    predicts exactly what the dense evaluation did at every supervised position, so every metric is identical;
    with small call budgets several buckets and several calls per bucket are exercised."""
    model = _model()
    rng = np.random.default_rng(3)
    mk = lambda: (list(rng.integers(1, 37, rng.integers(2, 25))), list(rng.integers(1, 37, rng.integers(1, 5))))
    recs = [TokenizedRecord(mk(), mk(), mk(), {}) for _ in range(40)]
    es = ev.build_eval_set(recs)
    for budget in (16, 64, None):
        for k, b in es.batches.items():
            got = ev.predictions(model.apply, model.params, b, budget=budget)
            sup = np.asarray(b.labels) != -100
            np.testing.assert_array_equal(got[sup], ev.dense_predictions(model.apply, model.params, b)[sup])
            assert (got[~sup] == -1).all()
    base = ev.dense_predictions(model.apply, model.params, es.batches["locality"])
    protocols = ("teacher_forced", "locality_vs_unedited", "generation_exact_match")
    old = _old_evaluate(model, es, base, protocols)
    new = ev.evaluate(model.apply, model.params, es, ev.base_predictions(model.apply, model.params, es), protocols,
                      per_example=True)
    assert {k: v for k, v in new.items() if k != "per_example"} == {k: v for k, v in old.items() if k != "per_example"}
    for key, arr in old["per_example"].items():
        np.testing.assert_array_equal(new["per_example"][key], arr)


def test_bucketed_evaluation_equals_the_dense_path_on_the_world_model():
    from lnjax import data as data_lib
    from lnjax.world import default_world, world_model
    world = default_world()
    model = world_model.default_model()
    recs = data_lib.tokenize(data_lib.records_from_dicts("zsre", world.records("edit", 60, seed=5), "world"),
                             world.tokenizer())
    es = ev.build_eval_set(recs)
    protocols = ("teacher_forced", "locality_vs_unedited", "generation_exact_match")
    old = _old_evaluate(model, es, ev.dense_predictions(model.apply, model.params, es.batches["locality"]), protocols)
    base = ev.base_predictions(model.apply, model.params, es)
    new = ev.evaluate(model.apply, model.params, es, base, protocols, per_example=True, known={"locality": base})
    assert {k: v for k, v in new.items() if k != "per_example"} == {k: v for k, v in old.items() if k != "per_example"}


def test_plan_buckets_covers_every_row_once_within_budget():
    lengths = np.random.default_rng(0).integers(1, 60, 500)
    plan = ev.plan_buckets(lengths, budget=256, compile_tokens=64)
    rows = np.concatenate([r for _, _, r in plan])
    np.testing.assert_array_equal(np.sort(rows), np.arange(500))
    assert len(plan) > 1
    for L, B, r in plan:
        assert L % ev.LENGTH_GRAIN == 0 and (lengths[r] <= L).all()
        assert B * L <= 256 and (B % ev.ROW_GRAIN == 0 or B in (1, 2))
    # one huge compile cost: a single bucket at the longest length
    assert [(L, len(r)) for L, _, r in ev.plan_buckets(lengths, 256, compile_tokens=10 ** 9)] == [(60, 500)]
    assert ev.plan_buckets([], 256) == []


STAGE_CASES = [ModelConfig(arch="llama", vocab_size=37, d_model=16, n_layers=3, n_heads=2, d_ff=32),
               ModelConfig(arch="gpt2", vocab_size=37, d_model=16, n_layers=3, n_heads=2, d_ff=32),
               ModelConfig(arch="gptj", vocab_size=37, d_model=16, n_layers=3, n_heads=2, d_ff=32)]


def test_stages_cut_at_every_block_reproduce_the_hidden_states():
    """``prefix`` to block s then ``suffix`` from s is the forward pass, for every cut s of every architecture;
    ``first_block`` reads the lowest edited block from HF paths."""
    from lnjax.models import split_stages
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 37, (3, 9)), jnp.int32)
    mask = jnp.ones((3, 9), jnp.int32).at[2, 6:].set(0)
    for cfg in STAGE_CASES:
        model = Model(cfg, init_params(cfg, jax.random.PRNGKey(1), std=0.5))
        st = split_stages(model.apply)
        full = model.apply_hidden(model.params, ids, mask)
        for s in range(cfg.n_layers + 1):
            h = st.prefix(model.params, ids, mask, s)
            np.testing.assert_allclose(st.suffix(model.params, h, ids, mask, s), full, rtol=1e-6, atol=1e-6)
        blocks = ".".join(st.layers)
        assert st.first_block([f"{blocks}.2.mlp.x", f"{blocks}.1.attn.y"]) == 1
        assert st.first_block([f"{blocks}.2.mlp.x", "lm_head"]) is None
    assert split_stages(lambda p, i, m: None) is None


def _scaled(params, path, block, factor):
    """``params`` with every kernel of one block scaled (a stand-in for an edit there); other leaves shared."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    node = out
    for k in path:
        node = node[k]
    node[block] = jax.tree_util.tree_map(lambda x: x * factor, node[block])
    return out


def test_frozen_prefix_serves_edits_above_it_exactly_and_refuses_edits_below():
    """The unedited pass kept as prefix + rest predicts what one pass does; for parameters edited at or above
    the cut the evaluation from the kept streams equals a full evaluation at every supervised position (also on a
    subset of the records, as the during-run evaluations take); parameters edited below the cut, or with the
    embeddings changed, are not served from it (and still evaluated right)."""
    from lnjax.models import split_stages
    rng = np.random.default_rng(4)
    mk = lambda: (list(rng.integers(1, 37, rng.integers(2, 14))), list(rng.integers(1, 37, rng.integers(1, 5))))
    es = ev.build_eval_set([TokenizedRecord(mk(), mk(), mk(), {}) for _ in range(30)])
    protocols = ("teacher_forced", "locality_vs_unedited")
    for cfg in STAGE_CASES:
        model = Model(cfg, init_params(cfg, jax.random.PRNGKey(2), std=0.5))
        layers = split_stages(model.apply).layers
        plain = ev.predictions_of(model.apply, model.params, es.batches, budget=64)
        kept, prefix = ev.frozen_prefix_predictions(model.apply, model.params, es.batches, 2, budget=64)
        for k in plain:
            np.testing.assert_array_equal(kept[k], plain[k])
        cached = ev.EvalSet(es.batches, es.pairs, prefix)
        above = _scaled(model.params, layers, 2, 1.7)
        assert prefix.serves(model.apply, above)
        changed = 0
        for sub_idx in (np.arange(30), np.arange(12)):
            full = ev.evaluate(model.apply, above, es.subset(sub_idx), plain["locality"][sub_idx], protocols,
                               per_example=True)
            fast = ev.evaluate(model.apply, above, cached.subset(sub_idx), plain["locality"][sub_idx], protocols,
                               per_example=True)
            for key, arr in full["per_example"].items():
                np.testing.assert_array_equal(fast["per_example"][key], arr)
            changed += int(full["locality_vs_unedited"] < 1.0)
        assert changed, "the stand-in edit should change some predictions, or the check above proves nothing"
        below = _scaled(model.params, layers, 1, 1.7)
        assert not prefix.serves(model.apply, below)
        np.testing.assert_array_equal(ev.predictions_of(model.apply, below, es.batches, prefix=prefix)["edit"],
                                      ev.predictions_of(model.apply, below, es.batches)["edit"])
        copied = jax.tree_util.tree_map(lambda x: jnp.array(x), model.params)  # equal arrays, not the same ones
        assert prefix.serves(model.apply, copied)
        emb = jax.tree_util.tree_map(lambda x: x, model.params)
        top = emb["model"] if "model" in emb else emb["transformer"]
        key = "embed_tokens" if "embed_tokens" in top else "wte"
        top[key] = {"embedding": top[key]["embedding"] + 1.0}
        assert not prefix.serves(model.apply, emb)
