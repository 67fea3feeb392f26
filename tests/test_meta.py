import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lnjax.editors import hypernet as hn
from lnjax.engine import meta
from lnjax.data import TokenizedRecord
from lnjax.models.probe import turn_features
from lnjax.engine.sequence import edit_sequence, frozen_and_kernels, join
from reference_np import RefStats
import reference_hypernet_np as ref

from fixtures import TARGETS, tiny_model

GROUP = "24x16"
E, MBS = 8, 4


def _model():
    return tiny_model(0)


def _turns(n_turns=3, seed=0):
    rng = np.random.default_rng(seed)
    ex = lambda: (list(rng.integers(4, 61, rng.integers(2, 6))), list(rng.integers(4, 61, rng.integers(1, 4))))
    return meta.training_turns([TokenizedRecord(ex(), ex(), ex(), {}) for _ in range(n_turns * E)], E)


NET = hn.NetConfig(rank=6, n_blocks=2, lr=3e-2)


def _meta(algorithm, **kw):
    base = dict(algorithm=algorithm, meta_lr=1e-3, minibatch_size=MBS, loc_coef=0.6, back_depth=2,
                time_decay=0.5, checkpoint_every=1)
    base.update(kw)
    return meta.MetaConfig(**base)


def _loss_grad(model, frozen, kernels, ref_kernels, slots, loc_coef):
    """G_W = d/dW of Σ_j w_j [Σ_mb mean CE(paraphrase_j) + loc_coef Σ_mb mean KL(p_ref || p)(locality_j)],
    written out mini-batch by mini-batch (independent of lnjax.engine.meta's weighting)."""
    ref_params = join(frozen, ref_kernels)

    def L(k):
        p = join(frozen, k)
        total = 0.0
        for w, para, loc in slots:
            logits = jax.nn.log_softmax(model.apply(p, para.input_ids, para.attention_mask), -1)
            lref = jax.nn.log_softmax(model.apply(ref_params, loc.input_ids, loc.attention_mask), -1)
            lloc = jax.nn.log_softmax(model.apply(p, loc.input_ids, loc.attention_mask), -1)
            for b in range(0, E, MBS):
                lab = np.asarray(para.labels[b:b + MBS])
                sup = lab != -100
                if sup.any():
                    picked = jnp.take_along_axis(logits[b:b + MBS], np.maximum(lab, 0)[..., None], -1)[..., 0]
                    total = total + w * -jnp.mean(picked[sup])
                sup = np.asarray(loc.labels[b:b + MBS]) != -100
                if sup.any():
                    lr_, lp_ = lref[b:b + MBS][sup], lloc[b:b + MBS][sup]
                    total = total + w * loc_coef * jnp.mean(jnp.sum(jnp.exp(lr_) * (lr_ - lp_), -1))
        return total

    return jax.jit(jax.grad(L))(kernels)   # the masks are concrete NumPy constants of this trace


def _numpy_meta_grad(theta64, stats, feats, gw):
    total = {k: np.zeros_like(v) for k, v in theta64.items()}
    deltas = {}
    for m, name in enumerate(TARGETS):
        f = feats[name]
        mask = np.asarray(f.mask)
        K = np.asarray(f.keys, np.float64)[mask]
        G = np.asarray(f.value_grads, np.float64)[mask]
        g, _, dW = ref.ridge_meta_grad(theta64, stats, K, G, m, np.asarray(gw[name], np.float64))
        deltas[name] = dW
        total = {k: total[k] + g[k] for k in total}
    return total, deltas


def _merge(stats, feats):
    for s in range(feats[TARGETS[0]].num_segments):
        for name in TARGETS:
            f = feats[name]
            sel = np.asarray(f.mask) & (np.asarray(f.segment) == s)
            stats.update(np.concatenate([np.asarray(f.keys)[sel], np.asarray(f.value_grads)[sel]], 1)
                         .astype(np.float64))


def _reference_run(model, turns, mc, n_turns):
    """Float64 NumPy emulation of MALMEN (per-turn clipped Adam from the base weights) or RLEdit (trajectory,
    backtracking with γ, locality reference W_t, accumulate + re-clip, one Adam step at the end)."""
    frozen, base = frozen_and_kernels(model.params, TARGETS)
    layout = hn.target_layout({t: tuple(k.shape) for t, k in base.items()})
    theta = ref.to64(hn.init_theta(NET, layout)[GROUP])
    adam = ref.Adam(theta, mc.meta_lr)
    stats = RefStats(24, 16, 1)
    W = {t: np.asarray(k, np.float64) for t, k in base.items()}
    acc = {k: np.zeros_like(v) for k, v in theta.items()}
    norms = []
    take = lambda tb, t: jax.tree_util.tree_map(lambda a: np.asarray(a)[t], tb)
    features_fn = jax.jit(lambda params, batch: turn_features(model.apply, params, TARGETS, batch,
                                                              minibatch_size=MBS))
    for t in range(n_turns):
        W_t = W if mc.algorithm == "rledit" else {k: np.asarray(v, np.float64) for k, v in base.items()}
        W32 = {k: jnp.asarray(v, jnp.float32) for k, v in W_t.items()}
        feats, _, _ = features_fn(join(frozen, W32), take(turns.edit, t))
        _merge(stats, feats)
        # ΔW first with zero G_W (only ΔW is needed here), then the loss gradient at W_t + ΔW
        _, deltas = _numpy_meta_grad(theta, stats, feats, {n: np.zeros((24, 16)) for n in TARGETS})
        edited = {n: jnp.asarray(W_t[n] + deltas[n], jnp.float32) for n in TARGETS}
        if mc.algorithm == "rledit":
            J = min(t + 1, mc.back_depth)
            slots = [(mc.time_decay ** j, take(turns.paraphrase, t - j), take(turns.locality, t - j))
                     for j in range(J)]
        else:
            slots = [(1.0, take(turns.paraphrase, t), take(turns.locality, t))]
        gw = _loss_grad(model, frozen, edited, W32, slots, mc.loc_coef)
        g, _ = _numpy_meta_grad(theta, stats, feats, gw)
        norms.append(np.sqrt(sum(np.sum(v ** 2) for v in g.values())))
        if mc.algorithm == "rledit":
            acc, _ = ref.clip({k: acc[k] + g[k] for k in acc}, mc.max_grad_norm)
            W = {n: W[n] + deltas[n] for n in TARGETS}
        else:
            theta = adam.step(theta, ref.clip(g, mc.max_grad_norm)[0])
    if mc.algorithm == "rledit":
        theta = adam.step(theta, acc)
    return theta, stats, np.asarray(norms)


@pytest.mark.parametrize("algorithm", ["malmen", "rledit"])
def test_meta_training_equals_float64_numpy_emulation(algorithm):
    """H5 with the numbers: MALMEN takes one clipped Adam step per turn from the base weights; RLEdit carries the
    model, backtracks with γ, references locality to W_t, re-clips the accumulated gradient every turn and takes
    exactly one Adam step at the end of the trajectory."""
    model, turns = _model(), _turns(2)
    mc = _meta(algorithm)
    trained, report = meta.train(model, TARGETS, turns, NET, mc, progress=False, log=lambda s: None)
    theta64, stats, norms = _reference_run(model, turns, mc, 2)
    assert report["adam_steps"] == (1 if algorithm == "rledit" else 2)
    np.testing.assert_allclose(report["diagnostics"]["grad_norm"], norms, rtol=2e-3)
    got = trained.theta[GROUP]
    init = hn.init_theta(NET, trained.targets)[GROUP]
    for k in theta64:
        moved_ref = (theta64[k] - np.asarray(init[k], np.float64)) / mc.meta_lr
        moved = (np.asarray(got[k], np.float64) - np.asarray(init[k], np.float64)) / mc.meta_lr
        np.testing.assert_allclose(moved, moved_ref, atol=2e-2, err_msg=k)   # Adam steps in units of meta_lr
        # every leaf learns, except A and scale in a single step: their gradients pass through B = 0 and relu(0)
        assert (np.abs(moved_ref).max() > 0.5) != (k in ("A", "scale") and algorithm == "rledit"), k
    s = trained.stats[GROUP]
    assert int(s.count) == stats.n
    np.testing.assert_allclose(np.asarray(s.mean - s.mean_c), stats.mean, rtol=1e-4, atol=1e-5)


def test_resume_after_interruption_is_bitwise(tmp_path):
    model, turns = _model(), _turns(3)
    mc = _meta("rledit", n_epochs=2)                   # two trajectories: a resume inside the second one
    full, rep = meta.train(model, TARGETS, turns, NET, mc, checkpoint_dir=str(tmp_path / "a"), progress=False,
                           log=lambda s: None)
    assert rep["adam_steps"] == 2
    meta.train(model, TARGETS, turns, NET, mc, checkpoint_dir=str(tmp_path / "b"), progress=False,
               log=lambda s: None, stop_after=4)       # "killed" after 4 of 6 turns
    logs = []
    resumed, rep2 = meta.train(model, TARGETS, turns, NET, mc, checkpoint_dir=str(tmp_path / "b"), resume=True,
                               progress=False, log=logs.append)
    assert any("resumes after 4" in line for line in logs)
    for a, b in zip(jax.tree_util.tree_leaves((full.theta, full.stats)),
                    jax.tree_util.tree_leaves((resumed.theta, resumed.stats))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k, v in rep["diagnostics"].items():
        np.testing.assert_array_equal(v, rep2["diagnostics"][k])
    # a different config is refused, not silently resumed
    with pytest.raises(ValueError, match="different config"):
        meta.train(model, TARGETS, turns, NET, _meta("rledit", n_epochs=2, meta_lr=2e-3),
                   checkpoint_dir=str(tmp_path / "b"), resume=True, progress=False, log=lambda s: None)
    # the trained editor runs in the existing scan engine; its statistics continue from meta-training
    ed = hn.REGISTRY["rledit"](full, minibatch_size=MBS)
    res = edit_sequence(model, ed, turns.edit, TARGETS, chunk=3, minibatch_size=MBS, progress=False)
    rows = int((np.asarray(turns.edit.labels) != -100).sum()) * len(TARGETS)
    assert int(res.editor_state.stats[GROUP].count) == int(full.stats[GROUP].count) + rows
    assert np.all(res.diagnostics["delta_norm"] > 0) and int(res.editor_state.rejected) == 0


def test_mend_trains_on_all_positions_and_edits_with_its_own_features(tmp_path):
    model, turns = _model(), _turns(2)
    net = hn.NetConfig(kind="mend", rank=6, n_blocks=1, lr=1e-2, token="all")
    trained, rep = meta.train(model, TARGETS, turns, net, _meta("mend", loc_coef=1.0), progress=False,
                              log=lambda s: None)
    attended = np.asarray(turns.edit.attention_mask).reshape(2, -1).sum(1)
    np.testing.assert_array_equal(rep["diagnostics"]["rows"], attended)
    assert int(trained.stats[GROUP].count) == 2 * int(attended.sum())
    path = meta.save_trained(str(tmp_path / "mend"), trained, rep)
    back = meta.load_trained(path, net, {t: (24, 16) for t in TARGETS})
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ed = hn.REGISTRY["mend"](back, apply=model.apply, minibatch_size=MBS)
    assert ed.needs == frozenset({"params", "turn"})
    state = ed.init({t: (24, 16) for t in TARGETS})
    edit0 = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], turns.edit)
    with pytest.raises(ValueError, match="needs the engine"):
        ed.update(None, state)
    deltas, state = ed.update(None, state, params=model.params, turn=edit0)
    assert int(state.stats[GROUP].count) == 2 * int(attended.sum()) + 2 * int(attended[0])   # 2 targets
    assert all(float(jnp.linalg.norm(d)) > 0 for d in deltas.values())


@pytest.mark.parametrize("targets", [TARGETS, TARGETS[1:]])
def test_rledit_history_streams_give_the_whole_model_training(targets):
    """RLEdit keeping each back-tracked turn's stream below the lowest target (and running only the blocks above
    it in each loss term) is the same meta-training as running the whole model: same diagnostics and θ within
    float32 reordering; with block 1 there is a real prefix below the target."""
    model, turns = _model(), _turns(3)
    mc = _meta("rledit", n_epochs=2)   # two trajectories: the stream history is emptied between them
    fast, rep_fast = meta.train(model, targets, turns, NET, mc, progress=False, log=lambda s: None)
    whole, rep_whole = meta.train(model, targets, turns, NET, mc, progress=False, log=lambda s: None,
                                  reuse_prefix=False)
    assert meta._runner(model.apply, targets, True).start == int(targets[0].split(".")[2])
    for k in ("gen_loss", "loc_loss", "edit_loss", "grad_norm"):
        np.testing.assert_allclose(rep_fast["diagnostics"][k], rep_whole["diagnostics"][k], rtol=1e-4, err_msg=k)
    init = hn.init_theta(NET, fast.targets)[GROUP]
    for k, v in whole.theta[GROUP].items():
        moved = (np.asarray(v, np.float64) - np.asarray(init[k], np.float64)) / mc.meta_lr
        moved_fast = (np.asarray(fast.theta[GROUP][k], np.float64) - np.asarray(init[k], np.float64)) / mc.meta_lr
        np.testing.assert_allclose(moved_fast, moved, atol=1e-3, err_msg=k)
