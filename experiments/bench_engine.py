"""Engine benchmark (not a test): costs of edit_sequence relative to the forward+backward it cannot avoid.

Prints, per model shape (the embedded default; GPT-2 small; SmolLM2-135M) and parameter dtype (float32,
bfloat16), with random weights and random edits:
- per-turn time of the compiled scan / time of the turn's forward+backward alone (goal <= 1.15);
- StableEdit per-turn time / UltraEdit per-turn time (goal <= 1.15);
- where a turn's time goes, from a profiler trace of the compiled scan (``profile_chunk``: features, statistics,
  whitening, pseudo-values, solve, apply, evaluation);
then primal vs dual ridge solves on both sides of the automatic choice's threshold, and the dual (Woodbury)
solve's speed-up over the primal at d_in=14336, d_out=4096, N=1500.

    python experiments/bench_engine.py                 # everything (the two larger shapes take minutes on a CPU)
    python experiments/bench_engine.py --models default --dtypes float32 --skip-solve
    python experiments/bench_engine.py --models llama3-8b --dtypes bfloat16 --turns-per-chunk 50 --repeats 1 \
        --skip-solve --json bench_gpu.json       # the GPU run of BUILD.md (one accelerator, ~16 GiB of weights)
    python experiments/bench_engine.py --json out.json

Timings are medians over repeats of an already compiled program, measured in one process on one machine.
"""

import argparse
import json
import os
import re


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lnjax as lx  # noqa: E402
from lnjax.core.cpu_threads import limit_lapack_threads_on_cpu  # noqa: E402
from lnjax.core.turns import pack_turns  # noqa: E402
from lnjax.models import Model, ModelConfig, init_params  # noqa: E402
from lnjax.models.probe import token_log_likelihood, minibatch_weights  # noqa: E402
from lnjax.engine import init_carry, make_chunk_fn, make_turn_fn, slice_chunk  # noqa: E402
from lnjax.app.report import write_json  # noqa: E402
from lnjax.app.timing import median_seconds  # noqa: E402

SHAPES = {
    "default": (ModelConfig(arch="llama", vocab_size=423, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                            d_ff=1024), [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]),
    "gpt2-small": (ModelConfig(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                               max_positions=1024, tie_embeddings=True, activation="gelu_new"),
                   [f"transformer.h.{i}.mlp.c_proj" for i in (8, 9, 10)]),
    "smollm2": (ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                            d_ff=1536, rope_theta=1e5, tie_embeddings=True),
                [f"model.layers.{i}.mlp.down_proj" for i in (25, 26, 27, 28)]),
}
# Llama-3-8B's shape with random weights, edited where StableEdit's published setting edits it (GPU only).
SHAPES["llama3-8b"] = (lx.hf.config_from_hf(lx.presets.MODELS["llama3-8b"]), lx.presets.targets("llama3-8b",
                                                                                                "stableedit"))
BIG = ("gpt2-small", "smollm2", "llama3-8b")


DEFAULT_TURNS = 4


# The named scopes of a turn (lnjax.engine and the LN editors); an op belongs to the innermost one on its path.
PARTS = ("features", "statistics", "whitening", "solve", "update", "apply", "evaluation")


def _hlo_parts(hlo_text: str) -> dict:
    """HLO op name -> turn part, from the named scope path in each op's ``op_name`` metadata (``update`` =
    the editor's own work outside statistics / whitening / solve: pseudo-values, checks)."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text):
        scopes = [p for p in m.group(2).split("/") if p in PARTS]
        out[m.group(1)] = scopes[-1] if scopes else "other"
    return out


def profile_chunk(compiled, args: tuple, turns: int, repeats: int = 2) -> dict:
    """Where a compiled chunk's time goes, from a profiler trace: milliseconds per turn per part (features,
    statistics, whitening, solve, update, apply, evaluation, other), summing the executed ops' durations.
    ``compiled`` is the chunk's ``jax.stages.Compiled`` (its HLO names the ops of the trace); ``args`` are
    ``(carry, frozen, xs)``; the carry is donated, so a fresh copy is used per call."""
    import glob
    import gzip
    import tempfile

    copy = lambda: (jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), args[0]),) + tuple(args[1:])
    parts = _hlo_parts(compiled.as_text())
    jax.block_until_ready(compiled(*copy()))
    where = tempfile.mkdtemp(prefix="lnjax_profile_")
    jax.profiler.start_trace(where, create_perfetto_trace=True)
    for _ in range(repeats):
        jax.block_until_ready(compiled(*copy()))
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(sorted(glob.glob(os.path.join(where, "**", "*.trace.json.gz"), recursive=True))[-1]))
    totals: dict = {}
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op in parts:
            totals[parts[op]] = totals.get(parts[op], 0.0) + e["dur"] / 1e3 / repeats / turns
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _timed(fn, repeats):
    return median_seconds(fn, repeats)


def bench_model(name, turns_per_chunk, repeats, edits=100, seed=0, dtype="float32", on_timed=None):
    """Per-turn seconds of UltraEdit and StableEdit's compiled scan on shape ``name`` (random weights, random
    edits, ``edits`` per turn, ``turns_per_chunk`` turns per scan), the turn's bare forward+backward, their ratios,
    peak accelerator memory and the projected time for 20,000 edits; ``on_timed(out)`` is called with the timings
    before the (slower, runtime-dependent) profile adds ``components``."""
    cfg, targets = SHAPES[name]
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(seed), dtype=jnp.dtype(dtype)))
    rng = np.random.default_rng(seed)
    ex = [(list(rng.integers(3, cfg.vocab_size, rng.integers(8, 14))), list(rng.integers(3, cfg.vocab_size,
                                                                                          rng.integers(1, 5))))
          for _ in range(edits * turns_per_chunk)]
    tb, _ = pack_turns(ex, edits)
    xs = slice_chunk(tb, np.zeros(turns_per_chunk, bool), 0, turns_per_chunk)
    max_rows = int((np.asarray(tb.labels) != -100).reshape(turns_per_chunk, -1).sum(1).max())
    out = {"dtype": dtype, "components": {}}
    one = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), xs[0])
    compiled = {}
    for ed_name in ("ultraedit", "stableedit"):
        editor = lx.editors.get(ed_name, lr=1e-4)
        frozen, carry = init_carry(model.params, editor, targets)
        # compiled once, for the timing and the profile alike
        chunk_fn = make_chunk_fn(make_turn_fn(model.apply, editor, targets, max_rows=max_rows)).lower(
            carry, frozen, xs).compile()
        # warm, finished before timing starts (dispatch is asynchronous: an unfinished warm-up call would be
        # billed to the first timed one)
        carry = jax.block_until_ready(chunk_fn(carry, frozen, xs))[0]
        state = {"carry": carry}

        def run_chunk():
            state["carry"], d = chunk_fn(state["carry"], frozen, xs)
            return d["loss"]

        out[ed_name] = median_seconds(run_chunk, repeats, warmup=False) / turns_per_chunk
        compiled[ed_name] = (chunk_fn, (state["carry"], frozen, xs))

    # The unavoidable part: forward + backward of the turn's mini-batch losses w.r.t. the target kernels (the
    # frozen weights are an argument, as in edit_sequence, not constants folded into the program).
    frozen, kernels = lx.engine.sequence.frozen_and_kernels(model.params, targets)

    @jax.jit
    def fwd_bwd(kernels, frozen, batch):
        def loss(k):
            params = lx.engine.sequence.join(frozen, k)
            w, _, _ = minibatch_weights(batch.labels, 10)
            ce, _ = token_log_likelihood(model.apply(params, batch.input_ids, batch.attention_mask), batch.labels)
            return jnp.sum(ce * w)
        return jax.grad(loss)(kernels)

    jax.block_until_ready(fwd_bwd(kernels, frozen, one))
    out["forward_backward"] = median_seconds(lambda: fwd_bwd(kernels, frozen, one), repeats, warmup=False)
    out["ratio_ultraedit_over_fwd_bwd"] = out["ultraedit"] / out["forward_backward"]
    out["ratio_stableedit_over_fwd_bwd"] = out["stableedit"] / out["forward_backward"]
    out["ratio_stableedit_over_ultraedit"] = out["stableedit"] / out["ultraedit"]
    out["rows_per_turn"] = max_rows
    out["turns_per_chunk"] = turns_per_chunk
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # accelerators report it; the CPU backend does not
        out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2 ** 30
    out["projected_seconds_20k_edits"] = {ed: out[ed] * 20000 / edits for ed in ("ultraedit", "stableedit")}
    if on_timed is not None:
        on_timed(out)
    # The profile comes last: a tracer that fails on some runtime (it needs the accelerator's activity API)
    # must not cost the timings above, which are the benchmark's result.
    for ed_name, (chunk_fn, args) in compiled.items():
        try:
            out["components"][ed_name] = profile_chunk(chunk_fn, args, turns_per_chunk)
        except Exception as e:  # noqa: BLE001 -- reported in the output, never silently
            out["components"][ed_name] = {}
            out.setdefault("profile_errors", {})[ed_name] = f"{type(e).__name__}: {e}"
    return out


def bench_threshold(d_in=1536, d_out=576, sizes=(384, 1152, 1536, 2048, 3072), repeats=3):
    """Primal vs dual ridge solve on both sides of ``choose_method``'s threshold (N = d_in): seconds of each,
    which ``"auto"`` picks and whether that is the faster one. At N = d_in the two forms cost the same flops
    (each term of one is the other's with N and d_in swapped), so either answer is right there."""
    rng = np.random.default_rng(1)
    primal = jax.jit(lambda K, V: lx.core.solve.ridge_primal(K, V, 10.0))
    dual = jax.jit(lambda K, V: lx.core.solve.ridge_dual(K, V, 10.0))
    rows = []
    for n in sizes:
        K = jnp.asarray(rng.normal(size=(n, d_in)).astype(np.float32))
        V = jnp.asarray(rng.normal(size=(n, d_out)).astype(np.float32))
        tp, td = _timed(lambda: primal(K, V), repeats), _timed(lambda: dual(K, V), repeats)
        auto = lx.core.solve.choose_method(n, d_in)
        rows.append({"n": n, "d_in": d_in, "d_out": d_out, "primal_s": tp, "dual_s": td, "auto": auto,
                     "auto_is_faster": (auto == "dual") == (td <= tp)})
    return rows


def bench_solve(d_in=14336, d_out=4096, n=1500, repeats=2):
    rng = np.random.default_rng(0)
    K = jnp.asarray(rng.normal(size=(n, d_in)).astype(np.float32))
    V = jnp.asarray(rng.normal(size=(n, d_out)).astype(np.float32))
    primal = jax.jit(lambda K, V: lx.core.solve.ridge_primal(K, V, 10.0))
    dual = jax.jit(lambda K, V: lx.core.solve.ridge_dual(K, V, 10.0))
    a, b = primal(K, V), dual(K, V)
    rel = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    tp = median_seconds(lambda: primal(K, V), repeats, warmup=False)
    td = median_seconds(lambda: dual(K, V), repeats, warmup=False)
    return {"d_in": d_in, "d_out": d_out, "n": n, "primal_s": tp, "dual_s": td, "speedup": tp / td,
            "max_rel_diff": rel}


def bench_eigh(sizes=(576, 768, 4096), repeats=3):
    """Seconds of the symmetric eigendecomposition behind StableEdit's whitening (``ln.whitening_matrix``) per
    implementation the backend offers (``qr``: LAPACK/cuSOLVER syevd; ``jacobi``: GPU/TPU only), on a
    random covariance of each size, with the reconstruction error ``max|V diag(w) Vᵀ - Σ| / max|Σ|``."""
    from jax.lax.linalg import EighImplementation, eigh
    rng = np.random.default_rng(2)
    impls = [EighImplementation.QR] + ([EighImplementation.JACOBI] if jax.default_backend() != "cpu" else [])
    rows = []
    for n in sizes:
        a = rng.normal(size=(n, 2 * n)).astype(np.float32)
        sigma = jnp.asarray(a @ a.T / (2 * n))
        for impl in impls:
            fn = jax.jit(lambda x, impl=impl: eigh(x, symmetrize_input=False, implementation=impl))
            v, w = fn(sigma)
            err = float(jnp.max(jnp.abs((v * w[None, :]) @ v.T - sigma)) / jnp.max(jnp.abs(sigma)))
            rows.append({"n": n, "implementation": impl.value, "seconds": _timed(lambda: fn(sigma), repeats),
                         "max_rel_error": err})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,gpt2-small")
    ap.add_argument("--turns-per-chunk", type=int, default=DEFAULT_TURNS,
                    help="turns in the timed scan (the larger shapes use 2 unless this is given)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="model parameter dtypes to benchmark")
    ap.add_argument("--skip-solve", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--lapack-threads", type=int, default=1,
                    help="threads of SciPy's OpenBLAS on the CPU, as lnjax.app.run sets them (0: leave as found)")
    args = ap.parse_args(argv)
    if args.lapack_threads:
        limit_lapack_threads_on_cpu(args.lapack_threads)
    results = {"device": str(jax.devices()[0]), "lapack_threads": args.lapack_threads, "models": {}}

    def save():
        if args.json:
            write_json(args.json, results, indent=2)

    for name in [m for m in args.models.split(",") if m]:
        for dtype in [d for d in args.dtypes.split(",") if d]:
            big = name in BIG and args.turns_per_chunk == DEFAULT_TURNS
            key = f"{name}/{dtype}"

            def timed(r, key=key, label=f"{name} {dtype}"):
                results["models"][key] = r
                save()
                print(f"{label:<20} per turn: ultraedit {r['ultraedit'] * 1e3:8.1f} ms  stableedit "
                      f"{r['stableedit'] * 1e3:8.1f} ms  fwd+bwd {r['forward_backward'] * 1e3:8.1f} ms | "
                      f"edit/fwd+bwd: ultra {r['ratio_ultraedit_over_fwd_bwd']:.2f} stable "
                      f"{r['ratio_stableedit_over_fwd_bwd']:.2f} | stable/ultra "
                      f"{r['ratio_stableedit_over_ultraedit']:.2f}"
                      + (f" | peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""), flush=True)

            r = bench_model(name, 2 if big else args.turns_per_chunk, 2 if big else args.repeats, dtype=dtype,
                            on_timed=timed)
            for ed, parts in r["components"].items():
                print(f"{'':<20}   {ed:<10} profile, ms per turn: " +
                      "  ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
            for ed, err in r.get("profile_errors", {}).items():
                print(f"{'':<20}   {ed:<10} profile unavailable: {err}", flush=True)
            save()
    if not args.skip_solve:
        for row in bench_threshold():
            results.setdefault("threshold", []).append(row)
            print(f"ridge N={row['n']:>5} d_in={row['d_in']}: primal {row['primal_s'] * 1e3:8.1f} ms  dual "
                  f"{row['dual_s'] * 1e3:8.1f} ms  auto={row['auto']} ({'faster' if row['auto_is_faster'] else 'SLOWER'})",
                  flush=True)
        for row in bench_eigh():
            results.setdefault("eigh", []).append(row)
            print(f"eigh n={row['n']:>5} {row['implementation']:<7} {row['seconds'] * 1e3:8.1f} ms "
                  f"(max rel error {row['max_rel_error']:.1e})", flush=True)
        s = bench_solve()
        results["solve"] = s
        print(f"ridge solve d_in={s['d_in']} d_out={s['d_out']} N={s['n']}: primal {s['primal_s']:.2f}s, dual "
              f"{s['dual_s']:.3f}s, speed-up {s['speedup']:.1f}x (max rel diff {s['max_rel_diff']:.1e})")
    save()


if __name__ == "__main__":
    main()
