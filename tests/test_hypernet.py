import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax as lx
from lnjax.editors import hypernet as hn
from lnjax.core import ln
from reference_np import RefStats
import reference_hypernet_np as ref

D_IN, D_OUT = 12, 7
SIZE = D_IN + D_OUT
GROUP = f"{D_IN}x{D_OUT}"


def _feats(rng, n=30, num_seg=3, names=("a", "b"), scale=1.0):
    seg = np.sort(rng.integers(0, num_seg, n)).astype(np.int32)
    mask = rng.random(n) > 0.2
    out = {}
    for name in names:
        K = (rng.normal(size=(n, D_IN)) * 2 + 0.5).astype(np.float32)
        G = (rng.normal(size=(n, D_OUT)) * scale * 0.3 - 0.1).astype(np.float32)
        out[name] = lx.Features(keys=K, value_grads=G, mask=mask, segment=seg, num_segments=num_seg)
    return out


def _theta(rng, cfg, n_modules=2, b_scale=0.05):
    """Parameters away from initialisation (B, bias, shift nonzero) so every path carries gradient."""
    targets = hn.target_layout({n: (D_IN, D_OUT) for n in "ab"[:n_modules]})
    th = hn.init_theta(cfg, targets)[GROUP]
    r = lambda *s: rng.normal(size=s).astype(np.float32)
    nb, rank = th["A"].shape[0], th["A"].shape[2]
    th = dict(th, B=b_scale * r(nb, rank, SIZE), bias=0.1 * r(nb, SIZE), scale=1 + 0.1 * r(nb, n_modules, SIZE),
              shift=0.1 * r(nb, n_modules, SIZE), lr=np.float32([0.3, 0.2][:n_modules]),
              lamda=np.float32([0.5, -0.3][:n_modules]))
    return {GROUP: {k: jnp.asarray(v) for k, v in th.items()}}, targets


def _stats(feats, ddof):
    """lnjax statistics and the reference merge of the same rows, (mini-batch, module) order."""
    targets = hn.target_layout({n: (D_IN, D_OUT) for n in feats})
    names = [t[0] for t in targets]
    rows = {n: (np.asarray(f.mask), np.asarray(f.segment), f.num_segments) for n, f in feats.items()}
    s = lx.editors.fold_group_features(ln.init(D_IN, D_OUT), feats, rows, names, "ddof1" if ddof else "exact")
    r = RefStats(D_IN, D_OUT, ddof)
    for seg in range(feats[names[0]].num_segments):
        for n in names:
            f = feats[n]
            sel = np.asarray(f.mask) & (np.asarray(f.segment) == seg)
            r.update(np.concatenate([f.keys[sel], f.value_grads[sel]], 1).astype(np.float64))
    return s, r


def test_h1_net_at_initialisation_is_the_ln_standardization():
    rng = np.random.default_rng(0)
    feats = _feats(rng)
    stats, _ = _stats(feats, 1)
    cfg = hn.NetConfig(rank=5, n_blocks=3)
    trained = hn.fresh(cfg, {"a": (D_IN, D_OUT), "b": (D_IN, D_OUT)})
    p = trained.theta[GROUP]
    assert p["A"].shape == (3, SIZE, 5) and float(jnp.std(p["A"])) > 0.7   # unscaled N(0, 1)
    assert not np.any(p["B"]) and not np.any(p["bias"]) and np.all(p["lr"] == 1e-6) and not np.any(p["lamda"])
    K, G = feats["a"].keys, feats["a"].value_grads
    kt, gt = hn.pseudo_features(p, stats, K, G, 1)
    z = ln.standardize(stats, jnp.concatenate([K, G], 1))
    np.testing.assert_array_equal(np.asarray(kt), np.asarray(z[:, :D_IN]))
    np.testing.assert_array_equal(np.asarray(gt), np.asarray(z[:, D_IN:]))
    kt, gt = hn.pseudo_features(p, stats, K, G, 0, normalize=False)       # "none": the raw features
    np.testing.assert_array_equal(np.asarray(kt), K)
    np.testing.assert_array_equal(np.asarray(gt), G)


def test_net_forward_matches_numpy_blocks_and_rank_cap():
    rng = np.random.default_rng(1)
    theta, _ = _theta(rng, hn.NetConfig(rank=4, n_blocks=2))
    y = rng.normal(size=(9, SIZE))
    for m in (0, 1):
        got = hn.net_forward(theta[GROUP], jnp.asarray(y, jnp.float32), m)
        want, _ = ref.forward(ref.to64(theta[GROUP]), y, m)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert hn.NetConfig(rank=1024, cap_rank=True).block_rank(SIZE) == SIZE
    assert hn.NetConfig(rank=1024).block_rank(SIZE) == 1024


def test_ln_statistics_of_the_editor_match_lnjax_ln_and_the_reference_merge():
    rng = np.random.default_rng(2)
    for variance, ddof in (("ddof1", 1), ("exact", 0)):
        trained = hn.fresh(hn.NetConfig(rank=4, n_blocks=1, variance=variance),
                           {"a": (D_IN, D_OUT), "b": (D_IN, D_OUT)})
        ed = hn.hypernet_editor(trained)
        state = ed.init({"a": (D_IN, D_OUT), "b": (D_IN, D_OUT)})
        r = RefStats(D_IN, D_OUT, ddof)
        expected = ln.init(D_IN, D_OUT)
        for _ in range(4):
            feats = _feats(rng)
            _, state = jax.jit(ed.update)(feats, state)
            for seg in range(3):
                for n in "ab":
                    f = feats[n]
                    sel = f.mask & (f.segment == seg)
                    r.update(np.concatenate([f.keys[sel], f.value_grads[sel]], 1).astype(np.float64))
            rows = {n: (f.mask, f.segment, 3) for n, f in feats.items()}
            expected = lx.editors.fold_group_features(expected, feats, rows, ["a", "b"], variance)
        s = state.stats[GROUP]
        assert int(s.count) == r.n == int(expected.count)
        np.testing.assert_allclose(np.asarray(ln.mean(s)), r.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ln.std(s)), np.sqrt(r.m2 / (r.n - 1 + ref_eps())), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(s.m2), np.asarray(expected.m2), rtol=1e-6)   # jit vs eager


def ref_eps():
    return float(np.finfo(np.float32).eps)


def test_h2_ridge_shift_equals_the_hand_formula_in_both_forms_and_ignores_padding_and_chunks():
    rng = np.random.default_rng(3)
    for n in (8, 30):                                  # fewer and more rows than d_in
        feats = _feats(rng, n=n)
        stats, r = _stats(feats, 1)
        theta, targets = _theta(rng, hn.NetConfig(rank=4, n_blocks=2))
        f = feats["b"]
        mask = np.asarray(f.mask)
        want = ref.ridge_shift(ref.to64(theta[GROUP]), r, f.keys[mask].astype(np.float64),
                               f.value_grads[mask].astype(np.float64), 1)
        for method in ("primal", "dual"):
            cfg = hn.NetConfig(rank=4, n_blocks=2, solve_method=method)
            got = hn.module_shift(cfg, theta[GROUP], stats, f.keys, f.value_grads, f.mask, 1)
            # float32 solve vs float64 reference: entries near zero carry the roundoff of the largest ones
            # (seen 6.7e-6 of a max 1.5 with jax 0.10 on 2 loaded cores), hence an absolute floor of 1e-5·max
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-5 * np.abs(want).max())
        # padding rows (garbage, masked) and a different row order change nothing
        cfg = hn.NetConfig(rank=4, n_blocks=2)
        pad = 5
        K2 = np.concatenate([f.keys, rng.normal(size=(pad, D_IN)).astype(np.float32) * 100])
        G2 = np.concatenate([f.value_grads, rng.normal(size=(pad, D_OUT)).astype(np.float32)])
        m2 = np.concatenate([f.mask, np.zeros(pad, bool)])
        a = hn.module_shift(cfg, theta[GROUP], stats, f.keys, f.value_grads, f.mask, 1)
        b = hn.module_shift(cfg, theta[GROUP], stats, K2, G2, m2, 1)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=2e-5 * np.abs(np.asarray(a)).max())
    # the net is row-wise: chunks of rows (the reference's 128-row chunks) give the same pseudo-features
    whole = hn.pseudo_features(theta[GROUP], stats, f.keys, f.value_grads, 0)
    parts = [hn.pseudo_features(theta[GROUP], stats, f.keys[i:i + 7], f.value_grads[i:i + 7], 0)
             for i in range(0, len(f.keys), 7)]
    for j in range(2):
        np.testing.assert_allclose(np.asarray(whole[j]), np.concatenate([np.asarray(p[j]) for p in parts]),
                                   rtol=1e-6, atol=1e-6)


def test_h2_mend_shift_is_minus_lr_pseudo_key_outer_pseudo_gradient():
    rng = np.random.default_rng(4)
    feats = _feats(rng)
    stats, r = _stats(feats, 1)
    cfg = hn.NetConfig(kind="mend", rank=4, n_blocks=2)
    theta, _ = _theta(rng, cfg)
    f = feats["a"]
    got = hn.module_shift(cfg, theta[GROUP], stats, f.keys, f.value_grads, f.mask, 0)
    want = ref.mend_shift(ref.to64(theta[GROUP]), r, f.keys[f.mask].astype(np.float64),
                          f.value_grads[f.mask].astype(np.float64), 0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _loss64(p, r, K, G, m, GW, kind):
    shift = ref.ridge_shift if kind == "ridge" else ref.mend_shift
    return float(np.sum(GW * shift(p, r, K, G, m)))


@pytest.mark.parametrize("kind", ["ridge", "mend"])
def test_h3_meta_gradient_equals_closed_forms_and_finite_differences(kind):
    rng = np.random.default_rng(5)
    feats = _feats(rng, n=20)
    stats, r = _stats(feats, 1)
    cfg = hn.NetConfig(kind=kind, rank=4, n_blocks=2)
    theta, targets = _theta(rng, cfg)
    GW = {n: rng.normal(size=(D_IN, D_OUT)).astype(np.float32) for n in "ab"}
    deltas, g = jax.jit(lambda th: hn.meta_gradient(cfg, th, {GROUP: stats}, feats, targets, GW))(theta)
    p64 = ref.to64(theta[GROUP])
    total = {k: np.zeros_like(v) for k, v in p64.items()}
    for m, n in enumerate("ab"):
        f = feats[n]
        K, G = f.keys[f.mask].astype(np.float64), f.value_grads[f.mask].astype(np.float64)
        if kind == "ridge":
            grads, dD, dW = ref.ridge_meta_grad(p64, r, K, G, m, GW[n].astype(np.float64))
            # dL/dD = K S^-1 G_W is the vjp of D -> ridge(K, D, e^lamda) with cotangent G_W
            _, vjp = jax.vjp(lambda D: lx.core.solve.ridge_shift(f.keys[f.mask], D, float(np.exp(p64["lamda"][m]))),
                             jnp.zeros((int(f.mask.sum()), D_OUT), jnp.float32))
            np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(GW[n]))[0]), dD, rtol=1e-4,
                                       atol=1e-5 * np.abs(dD).max())
        else:
            grads, dW = ref.mend_meta_grad(p64, r, K, G, m, GW[n].astype(np.float64))
        np.testing.assert_allclose(np.asarray(deltas[n]), dW, rtol=1e-4, atol=1e-5 * np.abs(dW).max())
        total = {k: total[k] + grads[k] for k in total}
    for k in total:
        got = np.asarray(g[GROUP][k])
        np.testing.assert_allclose(got, total[k], rtol=2e-3, atol=2e-4 * max(np.abs(total[k]).max(), 1e-12),
                                   err_msg=k)
    if kind == "mend":
        assert not np.any(total["lamda"]) and not np.any(np.asarray(g[GROUP]["lamda"]))
    # central finite differences of L(θ) = Σ <G_W, ΔW(θ)> on the float64 transcription
    L = lambda p: sum(_loss64(p, r, feats[n].keys[feats[n].mask].astype(np.float64),
                              feats[n].value_grads[feats[n].mask].astype(np.float64), m, GW[n].astype(np.float64),
                              kind) for m, n in enumerate("ab"))
    probes = [("lr", (0,)), ("lr", (1,)), ("B", (1, 2, 3)), ("A", (0, 4, 1)), ("bias", (0, 5)),
              ("scale", (1, 1, 2)), ("shift", (0, 0, 9))] + ([("lamda", (1,))] if kind == "ridge" else [])
    for name, idx in probes:
        h = 1e-6 * max(1.0, abs(p64[name][idx]))
        plus, minus = ref.to64(theta[GROUP]), ref.to64(theta[GROUP])
        plus[name][idx] += h
        minus[name][idx] -= h
        fd = (L(plus) - L(minus)) / (2 * h)
        assert abs(fd - total[name][idx]) <= 1e-5 * max(abs(fd), 1e-3), (name, idx, fd, total[name][idx])


def test_normalization_modes_and_reset_at_eval():
    rng = np.random.default_rng(6)
    shapes = {"a": (D_IN, D_OUT), "b": (D_IN, D_OUT)}
    t1, t2 = _feats(rng), _feats(rng)
    rows_in = lambda f: 2 * int(f["a"].mask.sum())
    trained = hn.fresh(hn.NetConfig(rank=4, n_blocks=1), shapes)
    _, s1 = hn.hypernet_editor(trained).update(t1, hn.hypernet_editor(trained).init(shapes))
    trained = trained.replace(stats=s1.stats)                       # as if meta-training had seen turn 1
    counts = {}
    for mode in hn.NORMALIZATIONS:
        tr = trained.replace(config=hn.NetConfig(rank=4, n_blocks=1, normalization=mode))
        ed = hn.hypernet_editor(tr)
        d, st = ed.update(t2, ed.init(shapes))
        counts[mode] = int(st.stats[GROUP].count)
        assert all(np.isfinite(np.asarray(v)).all() for v in d.values())
    assert counts["lifelong"] == counts["none"] == rows_in(t1) + rows_in(t2)
    assert counts["per_turn"] == rows_in(t2)
    assert counts["frozen_after_train"] == rows_in(t1)
    ed = hn.hypernet_editor(trained, reset_at_eval=True)
    st = ed.init(shapes)
    assert int(st.stats[GROUP].count) == 0
    # lifelong statistics are never reset between "training" and evaluation by default
    assert int(hn.hypernet_editor(trained).init(shapes).stats[GROUP].count) == rows_in(t1)


def test_editor_in_a_scan_rejects_non_finite_and_registry_checks():
    rng = np.random.default_rng(7)
    shapes = {"a": (D_IN, D_OUT), "b": (D_IN, D_OUT)}
    trained = hn.fresh(hn.NetConfig(rank=4, n_blocks=1, lr=1e-2), shapes)
    ed = lx.editors.get("malmen", trained=trained)
    assert ed.needs == frozenset({"features"})
    turns = [_feats(rng) for _ in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *turns)

    def body(state, f):
        d, state = ed.update(f, state)
        return state, d

    state, ds = jax.lax.scan(body, ed.init(shapes), stacked)
    s = ed.init(shapes)
    for t, f in enumerate(turns):
        d, s = ed.update(f, s)
        scale = np.abs(np.asarray(d["a"])).max()
        np.testing.assert_allclose(np.asarray(ds["a"][t]), np.asarray(d["a"]), rtol=1e-5, atol=1e-6 * scale)
    assert int(state.turns) == 3 and int(state.rejected) == 0
    bad = dict(turns[0])
    bad["a"] = bad["a"].replace(keys=np.full_like(bad["a"].keys, 1e30))
    d, s2 = jax.jit(ed.update)(bad, s)
    assert int(s2.rejected) == 1 and not np.any(np.asarray(d["a"]))
    np.testing.assert_array_equal(np.asarray(s2.stats[GROUP].m2), np.asarray(s.stats[GROUP].m2))
    with pytest.raises(ValueError, match="meta-trained"):
        lx.editors.get("rledit")
    with pytest.raises(ValueError, match="normalization"):
        lx.editors.get("rledit_no_normalization", trained=trained)
    with pytest.raises(ValueError, match="do not apply"):
        lx.editors.get("rledit", trained=trained, lr=1.0)
    with pytest.raises(ValueError, match="trained for targets"):
        ed.init({"a": (D_IN, D_OUT)})
