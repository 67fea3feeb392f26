"""One-turn probes of the editing regime on a world model: how far one turn of edits can be written, and at what
cost to locality, when the pseudo-values or the ridge metric change (the development measurements behind
experiments/REPORT.md "Towards the method's regime").

    python experiments/regime_probes.py --steps 1 --lr 1e-2                 # UltraEdit's one LN-normalised step
    python experiments/regime_probes.py --steps 10 --lr 1e-2                # ten LN-normalised value steps
    python experiments/regime_probes.py --steps 10 --lr 1e-2 --metric corpus   # ridge in a corpus key metric
    python experiments/regime_probes.py --oracle 30 --oracle-lr 1.0 --layers 3  # values optimised by Adam

One turn of ``--edits`` seed-1 edits on the pre-turn model: keys and value gradients at the supervised positions
(lnjax.models.probe), lifelong statistics of this turn (lnjax.core.ln), pseudo-values ``V`` after ``--steps`` LN-normalised
steps ``v += -lr ||k̂||² ĝ`` (``--steps 1`` is UltraEdit's formula; each step re-differentiates the loss with the
values added at the targets' outputs), or after ``--oracle`` Adam steps on the values themselves; then the ridge
shift (α ``--alpha``) on the raw keys, in the identity metric or (``--metric corpus``) in the second moment of the
keys of 1,000 training-split facts in two wordings. Prints one JSON line: the turn's ES / GS / LS and locality vs
the unedited model, the target loss before and after the value steps, and the mean norm of a value row.
"""

import argparse
import json


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from lnjax import data  # noqa: E402
from lnjax.core import ln
from lnjax.world import world_model
from lnjax import eval as eval_lib  # noqa: E402
from lnjax.core.turns import IGNORE, pack  # noqa: E402
from lnjax.engine import frozen_and_kernels, join  # noqa: E402
from lnjax.models import get_module, with_module_leaf  # noqa: E402
from lnjax.editors import key_stats  # noqa: E402
from lnjax.eval.prepare import prepare_edits  # noqa: E402
from lnjax.models.probe import Tap, minibatch_weights, token_log_likelihood  # noqa: E402
from lnjax.core.solve import ridge_shift  # noqa: E402
from lnjax.world import default_world  # noqa: E402


def corpus_metric(model, targets, tok, world, prior):
    """Per target, ``E[kkᵀ] + prior·mean(diag)·I`` (the form of ``lnjax.editors.key_metric``) over the keys at the
    answer positions of 1,000 training-split facts (edit prompt and paraphrase), float32 (d_in, d_in); the second
    moment accumulated by ``lnjax.editors.key_stats``."""
    recs = data.tokenize(data.records_from_dicts("zsre", world.records("train", 1000, seed=2), "corpus"), tok)
    pairs = [r.edit for r in recs] + [r.paraphrase for r in recs]
    stats = {t: key_stats.init(get_module(model.params, t)["kernel"].shape[0]) for t in targets}
    for s in range(0, len(pairs), 500):
        batch = pack(pairs[s:s + 500])
        inputs = key_stats.module_inputs(model.apply, model.params, targets, batch.input_ids, batch.attention_mask)
        sup = jnp.asarray(batch.labels != IGNORE).reshape(-1)
        stats = {t: key_stats.accumulate(stats[t], inputs[t].reshape(sup.shape[0], -1), sup) for t in targets}
    out = {}
    for t in targets:
        m = stats[t].moment()
        out[t] = m + prior * jnp.mean(jnp.diag(m)) * jnp.eye(len(m), dtype=jnp.float32)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="world-model directory (default: the shipped one)")
    ap.add_argument("--layers", default="1,2,3", help="edited down_proj layers")
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1, help="LN-normalised value steps (1 = UltraEdit)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--metric", choices=("identity", "corpus"), default="identity")
    ap.add_argument("--prior", type=float, default=1e-2, help="relative ridge added to the corpus metric")
    ap.add_argument("--oracle", type=int, default=0, help="Adam steps on the values instead of LN steps")
    ap.add_argument("--oracle-lr", type=float, default=0.1)
    args = ap.parse_args(argv)

    model = world_model.load(args.model) if args.model else world_model.default_model()
    world, apply = default_world(), model.apply
    tok = world.tokenizer()
    targets = [f"model.layers.{i}.mlp.down_proj" for i in args.layers.split(",")]
    job = prepare_edits(world.records("edit", args.edits, seed=1), tok, model, edits_per_turn=args.edits)
    batch = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), job.turns)  # the one turn [E, L]
    frozen, kernels = frozen_and_kernels(model.params, targets)
    metric = corpus_metric(model, targets, tok, world, args.prior) if args.metric == "corpus" else {}
    weights, _, _ = minibatch_weights(batch.labels, 10)
    sup = batch.labels != IGNORE
    E, L = batch.input_ids.shape

    def loss(values):
        sink, tapped = {}, model.params
        for t in targets:
            tapped = with_module_leaf(tapped, t, "kernel", Tap(get_module(model.params, t)["kernel"], values[t],
                                                               sink, t))
        ce, _ = token_log_likelihood(apply(tapped, batch.input_ids, batch.attention_mask), batch.labels)
        return jnp.sum(ce * weights), sink

    @jax.jit
    def turn():
        zero = {t: jnp.zeros((E, L, kernels[t].shape[1])) for t in targets}
        (loss0, keys), grads = jax.value_and_grad(loss, has_aux=True)(zero)
        stats = {t: ln.update(ln.init(*kernels[t].shape),
                              jnp.concatenate([keys[t], grads[t]], -1).reshape(E * L, -1), sup.reshape(-1))
                 for t in targets}
        values = zero
        if args.oracle:
            opt = optax.adam(args.oracle_lr)
            state = opt.init(values)
            for _ in range(args.oracle):
                g = jax.grad(lambda v: loss(v)[0])(values)
                g = {t: jnp.where(sup[..., None], g[t], 0.0) for t in targets}
                upd, state = opt.update(g, state)
                values = optax.apply_updates(values, upd)
        else:
            for step in range(args.steps):
                g = grads if step == 0 else jax.grad(lambda v: loss(v)[0])(values)
                new = {}
                for t in targets:
                    d_in = kernels[t].shape[0]
                    z = ln.standardize(stats[t], jnp.concatenate([keys[t], g[t]], -1))
                    v = ln.value_step(z[..., :d_in], z[..., d_in:], args.lr)  # UltraEdit's formula
                    new[t] = values[t] + jnp.where(sup[..., None], v, 0.0)
                values = new
        shifted = {t: kernels[t] + ridge_shift(keys[t].reshape(E * L, -1), values[t].reshape(E * L, -1),
                                               args.alpha, sup.reshape(-1), "dual", metric.get(t))
                   for t in targets}
        row_norm = jnp.mean(jnp.stack([jnp.sum(jnp.linalg.norm(values[t], axis=-1)) / jnp.sum(sup)
                                       for t in targets]))
        return shifted, loss0, loss(values)[0], row_norm

    shifted, loss0, loss1, row_norm = turn()
    m = eval_lib.evaluate(apply, join(frozen, shifted), job.eval_set, job.base_loc,
                          ("teacher_forced", "locality_vs_unedited"))
    print(json.dumps({**vars(args), **m["teacher_forced"], "locality_vs_unedited": m["locality_vs_unedited"],
                      "target_loss_before": float(loss0), "target_loss_after_values": float(loss1),
                      "mean_value_row_norm": float(row_norm)}))


if __name__ == "__main__":
    main()
