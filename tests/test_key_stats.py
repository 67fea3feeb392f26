import os

import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.editors import key_stats
from lnjax.io import stats_cache
from lnjax.core.turns import pack

from fixtures import TARGETS, TINY as CFG, tiny_model


def _model(seed=0):
    return tiny_model(seed)


def _corpus(n=23, seed=0):
    rng = np.random.default_rng(seed)
    ex = [(list(rng.integers(4, 61, rng.integers(2, 7))), list(rng.integers(4, 61, rng.integers(1, 4))))
          for _ in range(n)]
    return pack(ex)


def test_streaming_accumulator_equals_batch_estimate():
    m, corpus = _model(), _corpus()
    stats = key_stats.collect(m.apply, m.params, TARGETS, corpus, batch_size=5)   # 5 chunks, the last padded
    inputs = key_stats.module_inputs(m.apply, m.params, TARGETS, jnp.asarray(corpus.input_ids),
                                     jnp.asarray(corpus.attention_mask))
    real = np.asarray(corpus.attention_mask).reshape(-1).astype(bool)
    for t in TARGETS:
        k = np.asarray(inputs[t], np.float64).reshape(-1, CFG.d_ff)[real]
        batch = k.T @ k / len(k)
        assert int(stats[t].count) == real.sum() == key_stats.tokens(stats)
        np.testing.assert_allclose(np.asarray(stats[t].moment()), batch, rtol=2e-5, atol=1e-7)


def test_cache_is_keyed_by_model_layers_and_corpus(tmp_path):
    m, corpus = _model(), _corpus()
    logs = []
    a = stats_cache.cached_stats(m.apply, m.params, TARGETS, corpus, str(tmp_path), log=logs.append)
    b = stats_cache.cached_stats(m.apply, m.params, TARGETS, corpus, str(tmp_path), log=logs.append)
    assert "loaded" in logs[-1] and len(os.listdir(tmp_path)) == 1
    for t in TARGETS:
        np.testing.assert_array_equal(np.asarray(a[t].mom2), np.asarray(b[t].mom2))
    key = stats_cache.cache_key(m.params, TARGETS, corpus)
    assert key != stats_cache.cache_key(_model(1).params, TARGETS, corpus)
    assert key != stats_cache.cache_key(m.params, TARGETS[:1], corpus)
    assert key != stats_cache.cache_key(m.params, TARGETS, _corpus(seed=1))


def test_memit_npz_is_read_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    k = rng.normal(size=(50, 6))
    path = str(tmp_path / "layer_float32_mom2_100000.npz")
    np.savez(path, **{"mom2.mom2": k.T @ k, "mom2.count": np.array(50), "mom2.constructor": np.array("x")})
    s = key_stats.read_memit_npz(path)
    np.testing.assert_allclose(np.asarray(s.moment()), k.T @ k / 50, rtol=1e-5)
    np.savez(path, **{"mom2.mom2": k.T @ k})
    with pytest.raises(ValueError, match="mom2.count"):
        key_stats.read_memit_npz(path)


def test_make_editor_reads_npz_statistics_and_labels_them(tmp_path):
    from lnjax.app import baselines
    m = _model()
    stats = key_stats.collect(m.apply, m.params, TARGETS, _corpus(), batch_size=8)
    paths = {}
    for i, t in enumerate(TARGETS):
        paths[t] = str(tmp_path / f"layer{i}.npz")
        np.savez(paths[t], **{"mom2.mom2": np.asarray(stats[t].mom2), "mom2.count": np.asarray(stats[t].count)})
    editor, meta = baselines.make_editor("alphaedit", m, TARGETS, npz=paths, options={"null_rank": 5}, log=None)
    assert meta["key_stats_approximation"] and meta["key_stats_tokens"] == key_stats.tokens(stats)
    state = editor.init({t: (CFG.d_ff, CFG.d_model) for t in TARGETS})
    assert {int(v) for v in state.null_dims.values()} == {5} and editor.needs == {"params", "turn", "max_rows"}
    with pytest.raises(ValueError, match="needs key statistics"):
        baselines.make_editor("memit", m, TARGETS)
    with pytest.raises(ValueError, match="no .npz"):
        baselines.make_editor("memit", m, TARGETS, npz={TARGETS[0]: paths[TARGETS[0]]})


def test_alphaedit_state_round_trips_through_a_checkpoint(tmp_path):
    from lnjax.io import checkpoint
    from lnjax.editors import locate
    m = _model()
    stats = key_stats.collect(m.apply, m.params, TARGETS, _corpus(), batch_size=8)
    ed = locate.alphaedit(m.apply, stats, null_rank=4)
    state = ed.init({t: (CFG.d_ff, CFG.d_model) for t in TARGETS})
    state = state.replace(cache_c={t: c + 1.5 for t, c in state.cache_c.items()}, turns=state.turns + 3)
    back = checkpoint.load(checkpoint.save(str(tmp_path / "state"), state), ed.init({t: (CFG.d_ff, CFG.d_model)
                                                                                     for t in TARGETS}))
    assert int(back.turns) == 3 and back.targets == state.targets
    for t in TARGETS:
        np.testing.assert_array_equal(np.asarray(back.cache_c[t]), np.asarray(state.cache_c[t]))
        np.testing.assert_array_equal(np.asarray(back.projector[t]), np.asarray(state.projector[t]))
