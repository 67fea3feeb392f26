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
