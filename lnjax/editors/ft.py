"""Fine-tuning baseline (FT-M / FT-L, constrained or not) as a sequential, jittable ``Editor``
(the MEMIT-repository FT-L and EasyEdit's FT-M, as their released code runs them; docs/method.md §14).

One turn: a fresh Adam(``lr``, L2 ``weight_decay`` added to the gradient, as torch's Adam) over the edited kernels
only, started from the turn's weights ``W_turn``; ``num_steps`` epochs over the turn's edits in chunks of
``batch_size``; a chunk whose loss is below ``stop_loss`` (1e-2) takes no step; after every chunk each kernel is
clamped into the L∞ box ``[W_turn − ε, W_turn + ε]`` (``norm_constraint = ε``; None: no box); the epochs stop
once an epoch's mean chunk loss is below ``stop_loss``. The shift is ``W − W_turn``. The box is re-centred at
every turn, as in the reference, so drift over T turns is bounded only by ``T·ε``.

Objectives (``objective``):
- ``"target_new"`` (FT-M, default): teacher-forced cross-entropy over the answer tokens, mean per edit, then over
  the chunk's edits;
- ``"prompt_last"`` (FT-L): the log-probabilities of *all* answer tokens gathered from the single distribution
  at the last prompt position, summed and divided by the number of answer tokens, mean over the chunk's edits.
  (The reference also counts right-padding tokens of a batched target in this loss; lnjax does not.)
Defaults are the recommended UltraEdit-setting baseline: FT-M, lr 5e-4, 25 steps, ε = 5e-5, chunks of 10.

Cost. For a model whose ``apply`` splits into blocks (``lnjax.models.split_stages``) the blocks below the lowest
edited one cannot change within a turn, so their residual stream is computed once per turn and every step runs
only the blocks from there up; FT-M projects only a chunk's supervised positions onto the vocabulary, gathered
into the smallest of a few fixed slot counts that holds them (``lax.switch``; the shapes stay static). The loss
is the same function of the weights as the whole-model pass (tests/test_ft.py compares the two).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lnjax.core.protocol import EditCounters, Editor, reject_nonfinite, target_shapes
from lnjax.models import get_module, split_stages, with_module_leaf
from lnjax.core.turns import IGNORE, REFERENCE_MINIBATCH_SIZE, TurnBatch
from lnjax.models.probe import stream_parts, token_log_likelihood, weighted_answer_loss

OBJECTIVES = ("target_new", "prompt_last")


@struct.dataclass
class FTState(EditCounters):
    """FT's state: the counters, ``targets`` as ``(name, d_in, d_out)``, and the last turn's ``loss`` [2] (mean
    chunk loss of the first and of the last epoch run) and ``epochs`` run."""

    loss: jax.Array
    epochs: jax.Array


@dataclasses.dataclass(frozen=True)
class FTConfig:
    """FT hyperparameters (see the module docstring)."""

    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: Optional[float] = 5e-5
    batch_size: int = REFERENCE_MINIBATCH_SIZE   # chunks of the turn pipeline's mini-batch size
    weight_decay: float = 0.0
    objective: str = "target_new"
    stop_loss: float = 1e-2
    reuse_prefix: bool = True   # run only the blocks from the lowest edited one at each step (module docstring)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError(f"num_steps and batch_size must be >= 1, got {self.num_steps}, {self.batch_size}")
        if self.norm_constraint is not None and self.norm_constraint < 0:
            raise ValueError(f"norm_constraint must be >= 0 or None, got {self.norm_constraint}")


def edit_losses(logits: jax.Array, labels: jax.Array, objective: str) -> tuple[jax.Array, jax.Array]:
    """Per-edit loss [B] and whether the edit has answer tokens [B], for logits [B, L, V] and labels [B, L]
    (aligned with logits, ``-100`` off the answer)."""
    if objective == "target_new":
        ce, _ = token_log_likelihood(logits, labels)
        return _per_edit_mean(jnp.sum(ce, axis=1), labels)
    return _prompt_last_loss(logits[jnp.arange(logits.shape[0]), _first_answer(labels)], labels)


def _first_answer(labels: jax.Array) -> jax.Array:
    """The last prompt position (the first supervised one) of each row of ``labels`` [B, L]: [B]."""
    return jnp.argmax(labels != IGNORE, axis=1)


def _per_edit_mean(ce_sum: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FT-M's per-edit loss [B] from the cross-entropy summed over each row's answer tokens [B], and which rows
    have answer tokens [B]."""
    n = jnp.sum(labels != IGNORE, axis=1)
    return ce_sum / jnp.maximum(n, 1), n > 0


def _prompt_last_loss(first_logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FT-L's per-edit loss [B]: every answer token of ``labels`` [B, L] scored by the distribution of
    ``first_logits`` [B, V] (the last prompt position's), and which rows have answer tokens [B]."""
    sup = labels != IGNORE
    n = jnp.sum(sup, axis=1)
    logp = jax.nn.log_softmax(first_logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(sup, labels, 0), axis=1)
    return -jnp.sum(jnp.where(sup, picked, 0.0), axis=1) / jnp.maximum(n, 1), n > 0


def slot_buckets(n_positions: int, n_buckets: int = 4) -> tuple[int, ...]:
    """The fixed slot counts a chunk's supervised positions are gathered into: ``n_positions`` (every position of
    the chunk) halved ``n_buckets - 1`` times, rounded up, ascending and distinct."""
    return tuple(sorted({max(1, -(-n_positions // 2 ** k)) for k in range(n_buckets)}))


def _mean_over_edits(per_edit: jax.Array, real: jax.Array) -> jax.Array:
    """A chunk's loss: the mean of ``per_edit`` [B] over the edits with answer tokens ``real`` [B]."""
    return jnp.sum(jnp.where(real, per_edit, 0.0)) / jnp.maximum(jnp.sum(real), 1)


def _fast_chunk_loss(apply: Callable, params, names, ids, attn, labels, objective: str):
    """``loss(p, c)``, the loss of chunk ``c`` of ``ids`` / ``attn`` / ``labels`` [n_chunks, B, L] under params
    ``p`` (``params`` with the edited kernels replaced), running only the blocks from the lowest edited one up from
    the residual stream entering it, computed here once for every chunk; None when ``apply`` does not split into
    blocks or an edited module lies outside them. FT-M's loss is ``probe.weighted_answer_loss`` with each answer
    token weighted 1 / (its edit's answer tokens × the chunk's edits with answers)."""
    stages = split_stages(apply)
    start = None if stages is None else stages.first_block(names)
    if start is None:
        return None
    n_chunks, B, L = ids.shape
    # blocks below ``start`` read none of the edited kernels: this stream is the same for every step of the turn
    h_in = stages.prefix(params, ids.reshape(n_chunks * B, L), attn.reshape(n_chunks * B, L), start)
    h_in = h_in.reshape(n_chunks, B, L, -1)
    buckets = slot_buckets(B * L)

    def loss(p, c):
        lab = labels[c]
        if objective == "prompt_last":
            hidden = stages.suffix(p, h_in[c], ids[c], attn[c], start)
            return _mean_over_edits(*_prompt_last_loss(stages.head(p, hidden[jnp.arange(B), _first_answer(lab)]),
                                                       lab))
        sup = lab != IGNORE
        n = jnp.sum(sup, axis=1, keepdims=True)
        weights = sup / jnp.maximum(n, 1) / jnp.maximum(jnp.sum(n > 0), 1)
        parts = stream_parts(apply, h_in[c], start)
        which = jnp.sum(jnp.sum(n) > jnp.asarray(buckets[:-1]))   # the smallest slot count that holds them
        return jax.lax.switch(which, [functools.partial(weighted_answer_loss, apply, max_rows=k, parts=parts)
                                      for k in buckets], p, ids[c], attn[c], lab, weights)
    return loss


def _ft_init(shapes: Mapping[str, tuple[int, int]]) -> FTState:
    """FT's ``init``: zero counters and losses for ``shapes`` {target: (d_in, d_out)}, in the given order."""
    return FTState(loss=jnp.zeros((2,), jnp.float32), epochs=jnp.zeros((), jnp.int32),
                   turns=jnp.zeros((), jnp.int32), rejected=jnp.zeros((), jnp.int32), targets=target_shapes(shapes))


def _chunk_edits(edit: TurnBatch, batch_size: int) -> tuple[int, jax.Array, jax.Array, jax.Array]:
    """The turn's edits [E, L] cut into ``n_chunks = ceil(E / batch_size)`` chunks: returns ``n_chunks`` and
    ``input_ids``, ``attention_mask``, ``labels`` as [n_chunks, batch_size, L]."""
    E, L = edit.input_ids.shape
    n_chunks = math.ceil(E / batch_size)
    pad = n_chunks * batch_size - E

    # Padding rows are all IGNORE labels, so they add nothing to a chunk's loss (fixed shapes for fori_loop).
    def chunked(a, fill):
        a = jnp.concatenate([a, jnp.full((pad, L), fill, a.dtype)]) if pad else a
        return a.reshape(n_chunks, batch_size, L)

    return n_chunks, chunked(edit.input_ids, 0), chunked(edit.attention_mask, 0), chunked(edit.labels, IGNORE)


def _chunk_loss_fn(apply: Callable, cfg: FTConfig, params, names, ids, attn, labels) -> Callable:
    """``loss(w, c)``: the mean per-edit loss of chunk ``c`` of ``ids`` / ``attn`` / ``labels`` [n_chunks, B, L]
    with the edited kernels set to ``w`` {target: float32 kernel} (cast to the model's dtype)."""
    fast = _fast_chunk_loss(apply, params, names, ids, attn, labels, cfg.objective) if cfg.reuse_prefix else None
    dtypes = {n: get_module(params, n)["kernel"].dtype for n in names}

    def chunk_loss(w, c):
        p = params
        for n in names:
            p = with_module_leaf(p, n, "kernel", w[n].astype(dtypes[n]))
        if fast is not None:
            return fast(p, c)
        return _mean_over_edits(*edit_losses(apply(p, ids[c], attn[c]), labels[c], cfg.objective))
    return chunk_loss


def ft_editor(apply: Callable, cfg: FTConfig) -> Editor:
    """An FT ``Editor`` over the pure ``apply``; needs the turn's ``params`` and ``turn`` (``turn.edit`` [E, L])."""
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr)) if cfg.weight_decay \
        else optax.adam(cfg.lr)

    init = _ft_init

    def update(features: Any, state: FTState, *, warmup=False, params=None, turn=None):
        if params is None or turn is None:
            raise ValueError("ft needs the turn's params and turn (Editor.needs)")
        names = state.target_names()
        edit: TurnBatch = turn.edit
        n_chunks, ids, attn, labels = _chunk_edits(edit, cfg.batch_size)
        real_chunks = jnp.maximum(jnp.sum(jnp.any(labels != IGNORE, axis=(1, 2))), 1)
        start32 = {n: get_module(params, n)["kernel"].astype(jnp.float32) for n in names}
        grad = jax.value_and_grad(_chunk_loss_fn(apply, cfg, params, names, ids, attn, labels))

        def chunk_step(c, carry):
            w, opt_state, total = carry
            loss, g = grad(w, c)
            upd, new_opt = opt.update(g, opt_state, w)
            stepped = optax.apply_updates(w, upd)
            if cfg.norm_constraint is not None:
                eps = cfg.norm_constraint
                stepped = {n: jnp.clip(stepped[n], start32[n] - eps, start32[n] + eps) for n in names}
            take = loss >= cfg.stop_loss
            w = jax.tree_util.tree_map(lambda a, b: jnp.where(take, a, b), stepped, w)
            opt_state = jax.tree_util.tree_map(lambda a, b: jnp.where(take, a, b), new_opt, opt_state)
            return w, opt_state, total + loss

        def epoch(carry):
            w, opt_state, epochs, first, last = carry
            w, opt_state, total = jax.lax.fori_loop(0, n_chunks, chunk_step, (w, opt_state, jnp.zeros(())))
            mean = total / real_chunks
            return w, opt_state, epochs + 1, jnp.where(epochs == 0, mean, first), mean

        def more(carry):
            _, _, epochs, _, last = carry
            return (epochs < cfg.num_steps) & ((epochs == 0) | (last >= cfg.stop_loss))

        w0 = dict(start32)
        w, _, epochs, first, last = jax.lax.while_loop(
            more, epoch, (w0, opt.init(w0), jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros(())))
        deltas = {n: w[n] - start32[n] for n in names}
        return deltas, state.replace(loss=jnp.stack([first, last]), epochs=epochs)

    # A non-finite shift is rejected whole; the losses and epochs report the attempt either way.
    return reject_nonfinite(Editor(init=init, update=update, config=cfg, needs=frozenset({"params", "turn"})),
                            diagnostics=("loss", "epochs"))


# The signature's defaults are FTConfig's (their one home), so the factory and the config cannot disagree.
def ft(apply: Callable, *, lr: float = FTConfig.lr, num_steps: int = FTConfig.num_steps,
       norm_constraint: Optional[float] = FTConfig.norm_constraint, batch_size: int = FTConfig.batch_size,
       weight_decay: float = FTConfig.weight_decay, objective: str = FTConfig.objective,
       reuse_prefix: bool = FTConfig.reuse_prefix) -> Editor:
    """Fine-tuning baseline: FT-M (``objective="target_new"``, default) or FT-L (``"prompt_last"``);
    ``norm_constraint=None`` for unconstrained FT; ``reuse_prefix=False`` runs the whole model at every step.
    See the module docstring."""
    return ft_editor(apply, FTConfig(lr=lr, num_steps=num_steps, norm_constraint=norm_constraint,
                                     batch_size=batch_size, weight_decay=weight_decay, objective=objective,
                                     reuse_prefix=reuse_prefix))
