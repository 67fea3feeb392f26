"""Features of one turn from any pure ``apply(params, input_ids, attention_mask) -> logits``.

A zero "probe" is added to each target module's output and ``jax.grad`` is taken with respect to the probes only
(no parameter gradients): that gradient is the value gradient dLoss/d(module output). The module's input (the
key) is captured on the way. Targets are found by HF module path; the model must apply their kernels as
``x @ params[...]["kernel"]`` (as ``lnjax.models.linear`` does), which is where the ``Tap`` stands in.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

# TurnBatch is re-exported (lnjax.models.probe.TurnBatch).
from lnjax.core.turns import IGNORE, REFERENCE_MINIBATCH_SIZE, TurnBatch  # noqa: F401
from lnjax.core.features import Features
from lnjax.models import get_module, split_apply, split_stages, with_module_leaf


class Tap:
    """Stands in for an edited kernel during the probe: records the input ``x`` of ``x @ kernel`` and returns
    ``x @ kernel + probe``."""

    def __init__(self, kernel: jax.Array, probe: jax.Array, sink: dict, name: str):
        self.kernel, self.probe, self.sink, self.name = kernel, probe, sink, name

    @property
    def shape(self):
        return self.kernel.shape

    @property
    def dtype(self):
        return self.kernel.dtype

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        if self.name in self.sink:
            raise ValueError(f"target {self.name!r} is applied more than once per forward pass; "
                             "lnjax.models.probe supports modules used once")
        self.sink[self.name] = x
        out = x @ self.kernel
        if out.shape != self.probe.shape:
            raise ValueError(f"target {self.name!r}: output shape {out.shape} differs from the probe's "
                             f"{self.probe.shape} (is the module applied to [B, L, d_in] inputs?)")
        return out + self.probe.astype(out.dtype)


def token_log_likelihood(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy [B, L] (0 where unsupervised) and the supervision mask [B, L]."""
    sup = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(sup, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(sup, -picked, 0.0), sup


def weighted_answer_loss(apply: Callable, params, ids: jax.Array, attn: jax.Array, labels: jax.Array,
                         weights: jax.Array, max_rows: int, parts: Optional[tuple] = None) -> jax.Array:
    """``sum(weights * token cross-entropy)`` over the supervised positions of ids / attn / labels / weights
    [E, L] (a scalar).

    For a model ``apply`` that splits into hidden states and a vocabulary projection (``split_apply``), only the
    supervised positions, gathered into ``max_rows`` fixed slots (at least as many as there are), are projected
    to the vocabulary: the loss needs nothing else, and at SmolLM2's 49,152 tokens the projection and log-softmax
    of every position of a turn cost as much as the layers above the lowest edited one. Otherwise the logits of
    every position, as ``token_log_likelihood`` takes them. ``parts`` = ``(hidden, head)`` overrides the split
    (``turn_features`` passes the blocks above a kept residual stream)."""
    parts = parts or split_apply(apply)
    if parts is None:
        ce, _ = token_log_likelihood(apply(params, ids, attn), labels)
        return jnp.sum(ce * weights)
    logits, idx, real = supervised_logits(parts, params, ids, attn, labels, max_rows)
    # the fill slots (past the real rows) are unsupervised: their cross-entropy is 0
    ce, _ = token_log_likelihood(logits, jnp.where(real, labels.reshape(-1)[idx], IGNORE))
    return jnp.sum(ce * weights.reshape(-1)[idx])


def supervised_logits(parts: tuple, params, ids: jax.Array, attn: jax.Array, labels: jax.Array,
                      max_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The logits [max_rows, vocab] of the supervised positions of ids / attn / labels [E, L] only, from
    ``parts`` = ``(hidden, head)``: those positions gathered into ``max_rows`` fixed slots (at least as many as there
    are), with each slot's flat position ``idx`` [max_rows] and whether it holds one, ``real`` [max_rows] (the
    fill slots point at position 0)."""
    hidden, head = parts
    E, L = ids.shape
    idx, real = supervised_slots(labels, max_rows)
    return head(params, hidden(params, ids, attn).reshape(E * L, -1)[idx]), idx, real


def supervised_slots(labels: jax.Array, max_rows: int) -> tuple[jax.Array, jax.Array]:
    """The flat positions ``idx`` [max_rows] of the supervised positions of ``labels`` [..., L] gathered into
    ``max_rows`` fixed slots (at least as many as there are; the fill slots point at position 0), and whether each
    slot holds one, ``real`` [max_rows]."""
    sup = (labels != IGNORE).reshape(-1)
    (idx,) = jnp.nonzero(sup, size=max_rows, fill_value=0)
    return idx, jnp.arange(max_rows) < jnp.sum(sup)


def stream_parts(apply: Callable, stream: Optional[jax.Array], start: Optional[int]) -> Optional[tuple]:
    """``(hidden, head)`` running the blocks ``start`` and above from the residual stream ``stream`` [E, L, d]
    entering block ``start`` (``EditTurn.stream``); None without a stream."""
    if stream is None:
        return None
    stages = split_stages(apply)
    if stages is None or start is None:
        raise ValueError("a residual stream needs a model apply that splits into blocks, and its block index")
    return (lambda p, i, m: stages.suffix(p, stream, i, m, start)), stages.head


def supervised_argmax(apply: Callable, params, batch: TurnBatch, max_rows: int, stream: Optional[jax.Array] = None,
                      stream_start: Optional[int] = None) -> jax.Array:
    """The argmax token [E, L] at the supervised positions of ``batch`` [E, L] (-1 elsewhere): only those
    positions, gathered into ``max_rows`` slots (at least as many as there are), are projected to the vocabulary;
    with ``stream``, only the blocks from ``stream_start`` on run (as in ``turn_features``). For an ``apply``
    that cannot be split, the argmax of its full logits."""
    ids, attn, labels = batch.input_ids, batch.attention_mask, batch.labels
    sup = labels != IGNORE
    parts = stream_parts(apply, stream, stream_start) or split_apply(apply)
    if parts is None:
        return jnp.where(sup, jnp.argmax(apply(params, ids, attn), axis=-1), -1)
    E, L = ids.shape
    logits, idx, real = supervised_logits(parts, params, ids, attn, labels, max_rows)
    pred = jnp.argmax(logits, axis=-1)
    # the fill slots point at position 0 of edit 0; writing -1 there first, then the real slots, keeps them out
    out = jnp.full((E * L,), -1, pred.dtype).at[jnp.where(real, idx, E * L)].set(pred, mode="drop")
    return jnp.where(sup.reshape(-1), out, -1).reshape(E, L)


def minibatch_weights(labels: jax.Array, minibatch_size: int) -> tuple[jax.Array, jax.Array, int]:
    """Loss weights [E, L] making ``sum(weights * ce)`` the sum over mini-batches of their mean token CE,
    the mini-batch id of each edit [E], and the number of mini-batches."""
    E = labels.shape[0]
    sup = labels != IGNORE
    num = math.ceil(E / minibatch_size)
    seg = jnp.arange(E) // minibatch_size
    counts = jax.ops.segment_sum(jnp.sum(sup, axis=1).astype(jnp.float32), seg, num)
    weights = sup / jnp.maximum(counts[seg], 1.0)[:, None]
    return weights, seg, num


POSITIONS = ("answer", "all")


def turn_features(apply: Callable, params, targets: Sequence[str], batch: TurnBatch, *,
                  minibatch_size: int = REFERENCE_MINIBATCH_SIZE, max_rows: Optional[int] = None,
                  positions: str = "answer", stream: Optional[jax.Array] = None, stream_start: Optional[int] = None):
    """One turn's features for every target, all on the pre-turn model ``params``.

    ``batch`` holds one turn, arrays [E, L]. Rows are the supervised positions in (edit, position) order,
    gathered into ``max_rows`` fixed slots (default ``E * L``; masked padding after the real rows). The loss is
    the mean token cross-entropy of each mini-batch of ``minibatch_size`` edits; one backward pass over the
    whole turn gives exactly each mini-batch's own value gradients, because mini-batches share no position.

    ``positions="all"`` takes a row at every attended position instead of the supervised ones (the loss is the
    same answer-position CE): MEND's ``token: all``.

    ``stream`` [E, L, d_model]: the residual stream entering block ``stream_start`` (``EditTurn.stream``), from
    which only the blocks ``stream_start`` and above run; it must come from parameters equal to ``params`` below
    that block, and every target must lie at or above it (a target below is never applied: ValueError).

    Returns ``(features: name -> Features, loss: mean over mini-batches, n_rows: real rows)``. When
    ``n_rows > max_rows`` the extra rows are dropped: callers must size ``max_rows`` (``edit_sequence`` does
    and checks).
    """
    ids, attn, labels = batch.input_ids, batch.attention_mask, batch.labels
    E, L = ids.shape
    max_rows = E * L if max_rows is None else int(max_rows)
    weights, seg_of_edit, num_seg = minibatch_weights(labels, minibatch_size)
    modules = {name: get_module(params, name) for name in targets}
    parts = stream_parts(apply, stream, stream_start)
    probes = {}
    for name, mod in modules.items():
        if "kernel" not in mod:
            raise ValueError(f"target {name!r} has no 'kernel' (found {sorted(mod)})")
        probes[name] = jnp.zeros((E, L, mod["kernel"].shape[1]), jnp.float32)

    def loss_fn(probes):
        sink: dict = {}
        tapped = params
        for name, mod in modules.items():
            tapped = with_module_leaf(tapped, name, "kernel", Tap(mod["kernel"], probes[name], sink, name))
        # max_rows slots hold every supervised position: they are the feature rows ("answer") or fewer ("all")
        total = weighted_answer_loss(apply, tapped, ids, attn, labels, weights, max_rows, parts)
        missing = [n for n in targets if n not in sink]
        if missing:
            raise ValueError(f"target(s) {missing} were never applied with `x @ kernel` by the model")
        return total, sink

    (total, inputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(probes)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    sel = (labels != IGNORE) if positions == "answer" else (attn != 0)
    sel = sel.reshape(-1)
    (idx,) = jnp.nonzero(sel, size=max_rows, fill_value=0)
    n_rows = jnp.sum(sel)
    row_mask = jnp.arange(max_rows) < n_rows
    segment = seg_of_edit[idx // L].astype(jnp.int32)
    feats = {}
    for name in targets:
        k = inputs[name].reshape(E * L, -1)[idx].astype(jnp.float32)
        g = grads[name].reshape(E * L, -1)[idx].astype(jnp.float32)
        feats[name] = Features(keys=k, value_grads=g, mask=row_mask, segment=segment, num_segments=num_seg)
    return feats, total / used_minibatches(labels, seg_of_edit, num_seg), n_rows


def used_minibatches(labels: jax.Array, seg_of_edit: jax.Array, num_seg: int) -> jax.Array:
    """How many of the turn's mini-batches have any supervised position (at least 1, float32)."""
    used = jax.ops.segment_max(jnp.any(labels != IGNORE, axis=1).astype(jnp.float32), seg_of_edit, num_seg)
    return jnp.maximum(jnp.sum(jnp.maximum(used, 0.0)), 1.0)


def turn_loss(apply: Callable, params, batch: TurnBatch, *,
              minibatch_size: int = REFERENCE_MINIBATCH_SIZE) -> tuple[jax.Array, jax.Array]:
    """The loss ``turn_features`` reports (mean over mini-batches of their mean token cross-entropy) and the
    number of supervised positions, from one forward pass without gradients; for editors that take no
    features (docs/method.md §7)."""
    weights, seg_of_edit, num_seg = minibatch_weights(batch.labels, minibatch_size)
    ce, sup = token_log_likelihood(apply(params, batch.input_ids, batch.attention_mask), batch.labels)
    return jnp.sum(ce * weights) / used_minibatches(batch.labels, seg_of_edit, num_seg), jnp.sum(sup)
