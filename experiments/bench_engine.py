"""Engine benchmark (not a test): costs of edit_sequence relative to the forward+backward it cannot avoid.

Prints, per model shape (the embedded default; GPT-2 small), with random weights and random edits:
- per-turn time of ``edit_sequence`` / time of the turn's forward+backward alone (goal <= 1.3);
- StableEdit per-turn time / UltraEdit per-turn time (goal <= 1.15);
and the dual (Woodbury) solve's speed-up over the primal at d_in=14336, d_out=4096, N=1500.

    python experiments/bench_engine.py                 # everything (GPT-2 small takes minutes on a CPU)
    python experiments/bench_engine.py --models default --skip-solve
    python experiments/bench_engine.py --json out.json

Timings are medians over repeats of an already compiled program, measured in one process on one machine.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lnjax as lx  # noqa: E402
from lnjax.batching import pack_turns  # noqa: E402
from lnjax.models import Model, ModelConfig, init_params  # noqa: E402
from lnjax.probe import token_log_likelihood, minibatch_weights  # noqa: E402
from lnjax.engine import init_carry, make_chunk_fn, make_turn_fn, slice_chunk  # noqa: E402

SHAPES = {
    "default": (ModelConfig(arch="llama", vocab_size=423, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                            d_ff=1024), [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]),
    "gpt2-small": (ModelConfig(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                               max_positions=1024, tie_embeddings=True, activation="gelu_new"),
                   [f"transformer.h.{i}.mlp.c_proj" for i in (8, 9, 10)]),
}


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_model(name, turns_per_chunk, repeats, edits=100, seed=0):
    cfg, targets = SHAPES[name]
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    ex = [(list(rng.integers(3, cfg.vocab_size, rng.integers(8, 14))), list(rng.integers(3, cfg.vocab_size,
                                                                                          rng.integers(1, 5))))
          for _ in range(edits * turns_per_chunk)]
    tb, _ = pack_turns(ex, edits)
    xs = slice_chunk(tb, np.zeros(turns_per_chunk, bool), 0, turns_per_chunk)
    max_rows = int((np.asarray(tb.labels) != -100).reshape(turns_per_chunk, -1).sum(1).max())
    out = {}
    for ed_name in ("ultraedit", "stableedit"):
        editor = lx.editors.get(ed_name, lr=1e-4)
        chunk_fn = make_chunk_fn(make_turn_fn(model.apply, editor, targets, max_rows=max_rows))
        frozen, carry = init_carry(model.params, editor, targets)
        carry, _ = chunk_fn(carry, frozen, xs)          # compile + warm
        state = {"carry": carry}

        def run_chunk():
            state["carry"], d = chunk_fn(state["carry"], frozen, xs)
            return d["loss"]

        out[ed_name] = _median_time(run_chunk, repeats) / turns_per_chunk

    # The unavoidable part: forward + backward of the turn's mini-batch losses w.r.t. the target kernels (the
    # frozen weights are an argument, as in edit_sequence, not constants folded into the program).
    frozen, kernels = lx.sequence.frozen_and_kernels(model.params, targets)

    @jax.jit
    def fwd_bwd(kernels, frozen, batch):
        def loss(k):
            params = lx.sequence.join(frozen, k)
            w, _, _ = minibatch_weights(batch.labels, 10)
            ce, _ = token_log_likelihood(model.apply(params, batch.input_ids, batch.attention_mask), batch.labels)
            return jnp.sum(ce * w)
        return jax.grad(loss)(kernels)

    one = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), xs[0])
    jax.block_until_ready(fwd_bwd(kernels, frozen, one))
    out["forward_backward"] = _median_time(lambda: fwd_bwd(kernels, frozen, one), repeats)
    out["ratio_ultraedit_over_fwd_bwd"] = out["ultraedit"] / out["forward_backward"]
    out["ratio_stableedit_over_fwd_bwd"] = out["stableedit"] / out["forward_backward"]
    out["ratio_stableedit_over_ultraedit"] = out["stableedit"] / out["ultraedit"]
    out["rows_per_turn"] = max_rows
    return out


def bench_solve(d_in=14336, d_out=4096, n=1500, repeats=2):
    rng = np.random.default_rng(0)
    K = jnp.asarray(rng.normal(size=(n, d_in)).astype(np.float32))
    V = jnp.asarray(rng.normal(size=(n, d_out)).astype(np.float32))
    primal = jax.jit(lambda K, V: lx.solve.ridge_primal(K, V, 10.0))
    dual = jax.jit(lambda K, V: lx.solve.ridge_dual(K, V, 10.0))
    a, b = primal(K, V), dual(K, V)
    rel = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    tp = _median_time(lambda: primal(K, V), repeats)
    td = _median_time(lambda: dual(K, V), repeats)
    return {"d_in": d_in, "d_out": d_out, "n": n, "primal_s": tp, "dual_s": td, "speedup": tp / td,
            "max_rel_diff": rel}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,gpt2-small")
    ap.add_argument("--turns-per-chunk", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-solve", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = {"device": str(jax.devices()[0]), "models": {}}
    for name in [m for m in args.models.split(",") if m]:
        big = name == "gpt2-small"
        r = bench_model(name, 2 if big else args.turns_per_chunk, 2 if big else args.repeats)
        results["models"][name] = r
        print(f"{name:<12} per turn: ultraedit {r['ultraedit'] * 1e3:8.1f} ms  stableedit {r['stableedit'] * 1e3:8.1f} ms"
              f"  fwd+bwd {r['forward_backward'] * 1e3:8.1f} ms | edit/fwd+bwd: ultra "
              f"{r['ratio_ultraedit_over_fwd_bwd']:.2f} stable {r['ratio_stableedit_over_fwd_bwd']:.2f} | "
              f"stable/ultra {r['ratio_stableedit_over_ultraedit']:.2f}", flush=True)
    if not args.skip_solve:
        s = bench_solve()
        results["solve"] = s
        print(f"ridge solve d_in={s['d_in']} d_out={s['d_out']} N={s['n']}: primal {s['primal_s']:.2f}s, dual "
              f"{s['dual_s']:.3f}s, speed-up {s['speedup']:.1f}x (max rel diff {s['max_rel_diff']:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
