import jax
import jax.numpy as jnp
import numpy as np

import lnjax as lx
from lnjax import data
from lnjax.editors import key_stats
from lnjax.world import world_model
from lnjax.core.turns import EditTurn, TurnBatch, pack
from lnjax.models import get_module, with_module_leaf
from lnjax.engine import edit_accuracy


def test_memit_one_turn_on_the_world_model_raises_efficacy(tmp_path):
    """One turn of 20 edits on the embedded world model. The world model looks facts up at the question mark, so
    this uses fact_token="prompt_last", with v_lr and λ scaled to its residual norms (~3000) and key scale."""
    m, w = world_model.default_model(), lx.world.default_world()
    tok = w.tokenizer()
    targets = ("model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj")
    corpus = world_model.world_corpus(w, tok)
    corpus = TurnBatch(*(np.asarray(a)[::12] for a in (corpus.input_ids, corpus.attention_mask, corpus.labels)))
    stats = key_stats.collect(m.apply, m.params, targets, corpus, batch_size=3000)
    assert key_stats.tokens(stats) > 15 * 1024
    recs = data.tokenize(data.records_from_dicts("zsre", w.records("edit", 20, seed=3)), tok)
    b = pack([r.edit for r in recs])
    turn = EditTurn(edit=b, subject_last=jnp.asarray([r.subject_last for r in recs]))
    ed = lx.editors.get("memit", apply=m.apply, stats=stats, fact_token="prompt_last", v_lr=20.0,
                        mom2_update_weight=100.0)
    state = ed.init({t: (1024, 128) for t in targets})
    deltas, state = jax.jit(lambda s, p, tn: ed.update(None, s, params=p, turn=tn))(state, m.params, turn)
    params = m.params
    for t in targets:
        params = with_module_leaf(params, t, "kernel", get_module(params, t)["kernel"] + deltas[t])
    before = float(edit_accuracy(m.apply(m.params, b.input_ids, b.attention_mask), b.labels)[0].mean())
    after = float(edit_accuracy(m.apply(params, b.input_ids, b.attention_mask), b.labels)[0].mean())
    assert before < 0.2 and after > before + 0.3, (before, after)
