import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax as lx
from lnjax.editors import ft
from lnjax.core.turns import IGNORE, EditTurn, pack
from lnjax.models import get_module, with_module_leaf
from lnjax.engine import edit_accuracy

from fixtures import TARGETS, TINY as CFG, tiny_model


def _setup(n=6, seed=0):
    m = tiny_model(seed, std=0.3)
    rng = np.random.default_rng(seed)
    ex = [([1] + list(rng.integers(4, 61, 4)), list(rng.integers(4, 61, rng.integers(1, 3)))) for _ in range(n)]
    b = pack(ex)
    return m, EditTurn(edit=b, subject_last=-jnp.ones(n, jnp.int32))


def _run(m, turn, targets=TARGETS, **kw):
    ed = lx.editors.get("ft", apply=m.apply, **kw)
    state = ed.init({t: (CFG.d_ff, CFG.d_model) for t in targets})
    return jax.jit(lambda s, p, tn: ed.update(None, s, params=p, turn=tn))(state, m.params, turn)


def _accuracy(m, params, turn):
    b = turn.edit
    return float(edit_accuracy(m.apply(params, b.input_ids, b.attention_mask), b.labels)[0].mean())


def test_box_constraint_holds_and_unconstrained_ft_learns_the_edits():
    m, turn = _setup()
    eps = 1e-3
    deltas, state = _run(m, turn, lr=1e-2, num_steps=5, norm_constraint=eps, batch_size=4)
    for t, d in deltas.items():
        # W - W_turn is formed in float32: one rounding of the kernel's magnitude on top of ε.
        ulp = np.finfo(np.float32).eps * float(jnp.abs(get_module(m.params, t)["kernel"]).max())
        assert float(jnp.abs(d).max()) <= eps + 2 * ulp and float(jnp.abs(d).max()) > 0.5 * eps
    deltas, state = _run(m, turn, lr=1e-2, num_steps=25, norm_constraint=None, batch_size=4)
    assert float(state.loss[1]) < 0.5 * float(state.loss[0]) and int(state.turns) == 1
    params = m.params
    for t in TARGETS:
        params = with_module_leaf(params, t, "kernel", get_module(params, t)["kernel"] + deltas[t])
    assert _accuracy(m, params, turn) > _accuracy(m, m.params, turn) + 0.3


def test_early_stop_takes_no_step_below_the_loss_floor():
    m, turn = _setup()
    edit = ft.ft_editor(m.apply, ft.FTConfig(stop_loss=1e9, norm_constraint=None))
    state = edit.init({t: (CFG.d_ff, CFG.d_model) for t in TARGETS})
    deltas, state = edit.update(None, state, params=m.params, turn=turn)
    assert int(state.epochs) == 1 and all(float(jnp.abs(d).max()) == 0.0 for d in deltas.values())


def test_objectives_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
    labels = np.full((3, 6), IGNORE)
    labels[0, 2:4] = [4, 7]
    labels[1, 1:4] = [1, 1, 9]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tn, real = ft.edit_losses(jnp.asarray(logits), jnp.asarray(labels), "target_new")
    pl, _ = ft.edit_losses(jnp.asarray(logits), jnp.asarray(labels), "prompt_last")
    assert list(np.asarray(real)) == [True, True, False]
    np.testing.assert_allclose(np.asarray(tn)[:2], [-(logp[0, 2, 4] + logp[0, 3, 7]) / 2,
                                                    -(logp[1, 1, 1] + logp[1, 2, 1] + logp[1, 3, 9]) / 3], rtol=1e-5)
    # FT-L: every answer token read from the last prompt position's distribution.
    np.testing.assert_allclose(np.asarray(pl)[:2], [-(logp[0, 2, 4] + logp[0, 2, 7]) / 2,
                                                    -(2 * logp[1, 1, 1] + logp[1, 1, 9]) / 3], rtol=1e-5)
    with pytest.raises(ValueError, match="objective"):
        ft.FTConfig(objective="bag")


@pytest.mark.parametrize("objective,targets", [("target_new", TARGETS), ("prompt_last", TARGETS),
                                              ("target_new", TARGETS[1:])])
def test_blocks_from_the_lowest_edited_one_give_the_whole_model_result(objective, targets):
    """Reusing the stream below the edited blocks (and projecting only the supervised positions, in buckets) is
    the same loss: the same shifts as the whole model at every step, within float32 reordering."""
    m, turn = _setup(n=7, seed=3)
    kw = dict(lr=1e-2, num_steps=4, norm_constraint=None, batch_size=3, objective=objective)
    fast, s_fast = _run(m, turn, targets, **kw)
    whole, s_whole = _run(m, turn, targets, reuse_prefix=False, **kw)
    assert ft._fast_chunk_loss(m.apply, m.params, targets, *[a[None] for a in (turn.edit.input_ids,
                                 turn.edit.attention_mask, turn.edit.labels)], objective) is not None
    np.testing.assert_allclose(np.asarray(s_fast.loss), np.asarray(s_whole.loss), rtol=1e-4)
    for t in targets:
        scale = float(jnp.abs(whole[t]).max())
        assert scale > 0 and float(jnp.abs(fast[t] - whole[t]).max()) <= 1e-3 * scale


def test_slot_buckets_cover_every_chunk():
    assert ft.slot_buckets(240) == (30, 60, 120, 240)
    assert ft.slot_buckets(3) == (1, 2, 3)
