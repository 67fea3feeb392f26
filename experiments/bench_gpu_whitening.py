"""StableEdit's whitening: the eigendecomposition against matrix products only (benchmark, not a test).

Two parts, both on whatever device JAX sees (run it once on a GPU; on the CPU use ``--skip-turns``):

1. ``whitening``: for each size d in ``--sizes``, a float32 covariance as StableEdit's statistics hold it
   (``ln.update`` of ``rows`` Gaussian rows with a power-law spectrum, ``rows`` = d + 300, the regime of the
   first whitened turns, and 5·d) is whitened by ``ln.whitening_matrix(method="eigh")`` and
   ``method="newton_schulz"``: median seconds of each compiled call, the iterations the Newton–Schulz loop took
   and its relative (Frobenius) distance from the eigendecomposition's matrix.
2. ``turns``: per-turn seconds of UltraEdit, StableEdit (eigh) and StableEdit (newton_schulz) on a model shape
   (default Llama-3-8B with StableEdit's published down_proj targets, random bfloat16 weights, 100 random edits
   per turn, ``--turns`` turns per compiled scan after a warm-up scan that passes the n > d_out + 1 point, so
   every timed turn whitens), and the ratios to UltraEdit.

    python experiments/bench_gpu_whitening.py --json experiments/results/bench_gpu/whitening.json   # GPU, < 10 min
    python experiments/bench_gpu_whitening.py --skip-turns --sizes 1024,2048,4096                  # CPU part
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import lnjax as lx
from lnjax.core import ln
from lnjax.core.turns import pack_turns
from lnjax.engine import init_carry, make_chunk_fn, make_turn_fn, slice_chunk
from lnjax.models import Model, init_params
from lnjax.app.report import write_json
from lnjax.app.timing import median_seconds


def _stats(d, rows, seed=0):
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, d + 1) ** -0.5).astype(np.float32)
    g = rng.normal(size=(rows, d)).astype(np.float32) * scale
    return ln.update(ln.init(1, d, track_scatter=True), jnp.concatenate([jnp.zeros((rows, 1)), g], axis=1))


def bench_whitening(sizes, repeats, max_iter, rows_factors=(None, 5)):
    out = []
    eigh = jax.jit(lambda s: ln.whitening_matrix(s, method="eigh"))
    dof = lambda s: jnp.maximum(s.count.astype(jnp.float32) - s.d_out - 1.0, 1.0)
    # what whitening_matrix(method="newton_schulz") computes (eps0 = nu0 = 0, floor 1e-6), with its iterations
    ns = jax.jit(lambda s: ln.inverse_sqrt_newton_schulz(
        0.5 * (s.scatter_v - s.scatter_v_c + (s.scatter_v - s.scatter_v_c).T) / dof(s)
        + 1e-6 * jnp.eye(s.d_out), 1e-6, max_iter))
    hp = jax.lax.Precision.HIGHEST
    for d in sizes:
        m = jnp.ones((d, d), jnp.float32)
        matmul = jax.jit(lambda x: jnp.matmul(x, x, precision=hp))
        t_mm = median_seconds(lambda: matmul(m), max(repeats, 1))
        print(json.dumps({"d": d, "matmul_s": t_mm, "matmul_gflops": 2 * d ** 3 / t_mm / 1e9}), flush=True)
        for factor in rows_factors:
            rows = d + 300 if factor is None else factor * d
            s = _stats(d, rows)
            last = {}
            t_e = median_seconds(lambda: last.__setitem__("e", eigh(s)) or last["e"], repeats)
            t_n = median_seconds(lambda: last.__setitem__("n", ns(s)) or last["n"], repeats)
            a, b = np.asarray(last["e"], np.float64), np.asarray(last["n"][0], np.float64)
            sigma = np.asarray(s.scatter_v, np.float64) - np.asarray(s.scatter_v_c, np.float64)
            w, v = np.linalg.eigh(0.5 * (sigma + sigma.T) / max(rows - d - 1, 1))
            exact = {"clamp": (v / np.sqrt(np.maximum(w, 1e-6))) @ v.T, "shift": (v / np.sqrt(w + 1e-6)) @ v.T}
            err = lambda x, ref: float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
            row = {"d": d, "rows": rows, "eigh_s": t_e, "newton_schulz_s": t_n, "iterations": int(last["n"][1]),
                   "matmul_s": t_mm,
                   "rel_diff": err(b, a), "condition": float(w.max() / max(w.min(), 1e-6)),
                   # distances from the float64 eigendecomposition: of the published clamp, and of Σ + floor·I
                   "eigh_err_vs_f64_clamp": err(a, exact["clamp"]), "ns_err_vs_f64_clamp": err(b, exact["clamp"]),
                   "ns_err_vs_f64_shift": err(b, exact["shift"])}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def bench_turns(shape, turns, repeats, dtype, seed=0):
    from bench_engine import SHAPES  # the shapes the engine benchmark uses (same directory)
    cfg, targets = SHAPES[shape]
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(seed), dtype=jnp.dtype(dtype)))
    rng = np.random.default_rng(seed)
    d_out = cfg.d_model
    edits = 100
    # warm-up turns so the statistics pass n > d_out + 1 before timing (about 2.7 rows per edit)
    warm_turns = int(np.ceil((d_out + 2) / (edits * 2.5))) + 1
    n = edits * (warm_turns + turns)
    ex = [(list(rng.integers(3, cfg.vocab_size, rng.integers(8, 14))),
           list(rng.integers(3, cfg.vocab_size, rng.integers(1, 5)))) for _ in range(n)]
    tb, _ = pack_turns(ex, edits)
    max_rows = int((np.asarray(tb.labels) != -100).reshape(warm_turns + turns, -1).sum(1).max())
    warm_xs = slice_chunk(tb, np.zeros(warm_turns + turns, bool), 0, warm_turns)
    xs = slice_chunk(tb, np.zeros(warm_turns + turns, bool), warm_turns, turns)
    out = {"shape": shape, "dtype": dtype, "turns": turns, "warm_turns": warm_turns, "per_turn_s": {}}
    editors = {"ultraedit": lx.editors.get("ultraedit", lr=1e-4),
               "stableedit_eigh": lx.editors.get("stableedit", lr=1e-4),
               "stableedit_newton_schulz": lx.editors.get("stableedit", lr=1e-4, whitening="newton_schulz")}
    for name, editor in editors.items():
        t0 = time.time()
        frozen, carry = init_carry(model.params, editor, targets)
        turn = make_turn_fn(model.apply, editor, targets, max_rows=max_rows)
        warm_fn = make_chunk_fn(turn).lower(carry, frozen, warm_xs).compile()
        carry = jax.block_until_ready(warm_fn(carry, frozen, warm_xs))[0]
        fn = make_chunk_fn(turn).lower(carry, frozen, xs).compile()
        state = {"carry": jax.block_until_ready(fn(carry, frozen, xs))[0]}

        def run():
            state["carry"], d = fn(state["carry"], frozen, xs)
            return d

        out["per_turn_s"][name] = median_seconds(run, repeats) / turns
        print(f"{name}: {out['per_turn_s'][name] * 1e3:.1f} ms per turn ({time.time() - t0:.0f}s with compiles)",
              flush=True)
    p = out["per_turn_s"]
    out["stableedit_eigh_over_ultraedit"] = p["stableedit_eigh"] / p["ultraedit"]
    out["stableedit_newton_schulz_over_ultraedit"] = p["stableedit_newton_schulz"] / p["ultraedit"]
    print(json.dumps({k: v for k, v in out.items() if k.endswith("ultraedit")}), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--only-first-turns", action="store_true",
                    help="whitening: only the rows = d + 300 covariance (the first whitened turns' regime)")
    ap.add_argument("--skip-turns", action="store_true")
    ap.add_argument("--skip-whitening", action="store_true")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend()}
    if not args.skip_whitening:
        out["whitening"] = bench_whitening([int(s) for s in args.sizes.split(",")], args.repeats, args.max_iter,
                                           (None,) if args.only_first_turns else (None, 5))
    if not args.skip_turns:
        out["turns"] = bench_turns(args.shape, args.turns, args.repeats, args.dtype)
    out["seconds"] = time.time() - t0
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
