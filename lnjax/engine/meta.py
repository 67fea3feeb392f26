"""Meta-training of the hypernetwork editors (``lnjax.editors.hypernet``): MALMEN/MEND's per-turn loop and RLEdit's
trajectory, as jitted optax steps over turns of a training split, checkpointed with Orbax and resumable.

MALMEN and MEND (``BaseEditor.train`` of the released code): every training turn starts from
the base weights ``W``. One turn: features of the edit prompts on ``W`` (statistics updated first); ``ΔW`` from
the net; the loss on ``W + ΔW`` is the generalization CE on the paraphrases (mean over answer tokens per
mini-batch, summed over mini-batches) plus ``loc_coef`` times ``KL(p_W ‖ p_{W+ΔW})`` at the locality prompts'
answer positions (mean per mini-batch, summed); ``G_W = ∂L/∂W`` at ``W + ΔW``; the hypernet gradient is the vjp
of θ ↦ ΔW with cotangent ``G_W``; clip by global norm (``max_grad_norm``) and **one Adam step per turn**.

RLEdit (``RLEDIT.train`` of the released code): one trajectory per epoch over the turns, the model carried along
(``W_{t+1} = W_t + ΔW_t``). Turn ``t``'s loss on ``W_t + ΔW_t`` sums, over the last ``J = min(t+1, back_depth)``
turns ``t-j`` (the current one first), ``γ^j`` times (paraphrase CE of turn ``t-j`` + ``loc_coef`` KL from
``W_t`` on the locality prompts of turn ``t-j``); earlier shifts are constants (no backpropagation through
time). The hypernet gradients of the turns are accumulated and the sum is re-clipped after every turn; **one
Adam step at the end of the trajectory**. With the published ``n_epochs = 1`` that is one Adam step in all.

Faithful defaults (``default_configs``): meta_lr 1e-5 (Adam, betas 0.9/0.999, eps 1e-8), max_grad_norm 1,
loc_coef 0.6 (MALMEN, RLEdit) or 1 (MEND), n_epochs 1, time_decay 0.95, back_depth 10, mini-batches of 10.
Known quirks of the released code kept by default, with the fix as an option:
- ``reg_mode="reference"``: RLEdit/MEND's ``reg_coef`` L2 term is computed from a ΔW without a gradient path,
  so it changes nothing (inert); ``reg_mode="live"`` adds ``2·reg_coef·ΔW`` to ``G_W``.
- The statistics carry over from meta-training into evaluation (``hypernet.hypernet_editor(reset_at_eval=...)``).
- UltraEdit's codebase steps Adam inside the locality loop (about 10 steps per turn, an indentation slip); this
  module follows StableEdit, MALMEN and RLEdit, which take one step per turn. Not reproduced.
Cost (RLEdit): for a model that splits into blocks (``lnjax.models.split_stages``) the blocks below the lowest
edited one never change, so the trajectory keeps each back-tracked turn's paraphrase and locality residual streams
entering that block (computed once, when the turn is pushed) and every one of the ``back_depth`` loss terms runs only
the blocks from there up (``train(..., reuse_prefix=False)``: the whole model every time; the same arithmetic,
tests/test_meta.py compares the two); the ``back_depth - J`` empty slots of a trajectory's first turns run no model
(``lax.cond``; SmolLM2, 100 edits per turn: 1,013 s for the 11-turn trajectory where its full turns took 139-151 s
each). MALMEN and MEND run each probe set at most twice per turn, where the reuse
saved nothing measurable, so they run the whole model.

Differences that are not options: losses in float32 (the reference uses bf16 logits); no bf16 drift from
apply/undo pairs (the functional update never subtracts); optax's clipping scales by ``max/‖g‖`` where torch uses
``max/(‖g‖ + 1e-6)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from lnjax.editors import hypernet as hn
from lnjax.core.turns import REFERENCE_MINIBATCH_SIZE, pack_turns
from lnjax.io.checkpoint import RunCheckpointer, load, save
from lnjax.core.protocol import EditorState, check_features
from lnjax.models.probe import TurnBatch, minibatch_weights, token_log_likelihood, turn_features
from lnjax.core.tree import digest, frozen_and_kernels, join
from lnjax.models import split_stages

ALGORITHMS = ("malmen", "rledit", "mend")
REG_MODES = ("reference", "live")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Meta-training settings (see the module docstring; defaults are the released values of MALMEN/RLEdit).

    ``algorithm``: ``"malmen"``, ``"mend"`` (per-turn Adam steps from the base weights) or ``"rledit"`` (the
    trajectory); ``num_seq``: turns per epoch (None: every turn given); ``checkpoint_every``: turns between
    checkpoints.
    """

    algorithm: str = "malmen"
    meta_lr: float = 1e-5
    loc_coef: float = 0.6
    max_grad_norm: float = 1.0
    n_epochs: int = 1
    minibatch_size: int = REFERENCE_MINIBATCH_SIZE
    time_decay: float = 0.95
    back_depth: int = 10
    reg_coef: float = 1e-4
    reg_mode: str = "reference"
    num_seq: Optional[int] = None
    checkpoint_every: int = 10

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.reg_mode not in REG_MODES:
            raise ValueError(f"reg_mode must be one of {REG_MODES}, got {self.reg_mode!r}")
        if self.n_epochs < 1 or self.back_depth < 1 or self.minibatch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("n_epochs, back_depth, minibatch_size and checkpoint_every must be >= 1")


def default_configs(name: str, **overrides) -> tuple[hn.NetConfig, MetaConfig]:
    """The published net and meta-training settings of registry editor ``name`` (``rledit``,
    ``malmen_no_normalization``, ...); ``overrides`` set fields of either config by name."""
    family, normalization = hn.family_of(name)
    net = dataclasses.replace(hn.FAMILIES[family], normalization=normalization)
    meta = MetaConfig(algorithm=family, loc_coef=1.0 if family == "mend" else 0.6,
                      reg_coef=1e-2 if family == "mend" else 1e-4)
    net_fields = {f.name for f in dataclasses.fields(hn.NetConfig)}
    meta_fields = {f.name for f in dataclasses.fields(MetaConfig)}
    unknown = set(overrides) - net_fields - meta_fields
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {name}")
    net = dataclasses.replace(net, **{k: v for k, v in overrides.items() if k in net_fields})
    meta = dataclasses.replace(meta, **{k: v for k, v in overrides.items() if k in meta_fields})
    return net, meta


@struct.dataclass
class TrainTurns:
    """Meta-training turns: ``edit``, ``paraphrase`` and ``locality`` TurnBatches [T, E, L_*], each list
    ordered longest first within its turn independently, as the reference's collate does."""

    edit: TurnBatch
    paraphrase: TurnBatch
    locality: TurnBatch

    @property
    def n_turns(self) -> int:
        return int(np.shape(self.edit.input_ids)[0])


def training_turns(records: Sequence, edits_per_turn: int) -> TrainTurns:
    """Pack tokenized training records (``lnjax.data.TokenizedRecord``) into turns of ``edits_per_turn`` (``lnjax.core.turns.pack_turns``)."""
    if not records:
        raise ValueError("no training records")
    packed = [pack_turns([getattr(r, probe) for r in records], edits_per_turn)[0]
              for probe in ("edit", "paraphrase", "locality")]
    return TrainTurns(*packed)


@struct.dataclass
class MetaState:
    """Everything meta-training carries between turns (a pytree; what a checkpoint holds).

    ``theta``, ``opt_state`` (optax Adam), ``stats`` (group -> LNStats); RLEdit only (None otherwise):
    ``acc`` (accumulated, re-clipped hypernet gradient), ``kernels`` (the trajectory model's edited kernels),
    ``hist_para``/``hist_loc`` (TurnBatches [back_depth, E, L] of the last turns, slot 0 the newest),
    ``hist_len`` (int32, valid slots) and, when the blocks below the targets are reused (module docstring),
    ``hist_streams``: the residual streams of ``(hist_para, hist_loc)`` entering the lowest edited block
    ([back_depth, E, L, d] each; None otherwise).
    """

    theta: dict
    opt_state: optax.OptState
    stats: dict
    acc: Optional[dict] = None
    kernels: Optional[dict] = None
    hist_para: Optional[TurnBatch] = None
    hist_loc: Optional[TurnBatch] = None
    hist_len: Optional[jax.Array] = None
    hist_streams: Optional[tuple] = None


def minibatch_ce(logits: jax.Array, labels: jax.Array, minibatch_size: int) -> jax.Array:
    """Sum over mini-batches of the mean token cross-entropy at the answer positions (scalar)."""
    ce, _ = token_log_likelihood(logits, labels)
    weights, _, _ = minibatch_weights(labels, minibatch_size)
    return jnp.sum(ce * weights)


def minibatch_kl(ref_logits: jax.Array, logits: jax.Array, labels: jax.Array, minibatch_size: int) -> jax.Array:
    """Sum over mini-batches of the mean ``KL(p_ref ‖ p)`` over the vocabulary at the answer positions."""
    lp_ref = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), axis=-1)
    weights, _, _ = minibatch_weights(labels, minibatch_size)
    return jnp.sum(kl * weights)


def _rows(features, targets: tuple) -> dict:
    zero = jnp.zeros((), jnp.int32)
    return check_features(features, EditorState(stats={}, turns=zero, rejected=zero, targets=targets))


def feature_rows(turns: TrainTurns, token: str) -> int:
    """Row slots a turn's features need: the most supervised (``token="ans"``) or attended (``"all"``)
    positions of any training turn."""
    sel = (np.asarray(turns.edit.labels) != -100) if token == "ans" else (np.asarray(turns.edit.attention_mask) != 0)
    return max(int(sel.reshape(sel.shape[0], -1).sum(1).max()), 1)


def _optimizer(meta: MetaConfig) -> optax.GradientTransformation:
    adam = optax.adam(meta.meta_lr, b1=0.9, b2=0.999, eps=1e-8)
    if meta.algorithm == "rledit":  # RLEdit clips the accumulated buffer every turn, then one plain step
        return adam
    return optax.chain(optax.clip_by_global_norm(meta.max_grad_norm), adam)


def _clip(tree, max_norm: float):
    return optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())[0]


def _theta_grad(meta: MetaConfig, names: tuple, deltas: dict, pullback: Callable, grad_w: dict):
    """The hypernet gradient (θ's pytree): ``pullback`` (``hypernet.shift_vjp``, the vjp of θ ↦ ΔW) of the
    cotangent ``G_W`` {target: (d_in, d_out)} in float32, plus ``2·reg_coef·ΔW`` when ``meta.reg_mode == "live"``."""
    grad_w = {t: grad_w[t].astype(jnp.float32) for t in names}
    if meta.reg_mode == "live":
        grad_w = {t: grad_w[t] + 2.0 * meta.reg_coef * deltas[t] for t in names}
    return pullback(grad_w)


def _malmen_loss(apply: Callable, frozen: dict, ref: jax.Array, para: TurnBatch, loc: TurnBatch,
                 meta: MetaConfig) -> Callable:
    """MALMEN/MEND's loss of the edited kernels: ``kernels -> (gen + loc_coef·kl, (gen, kl))`` with the paraphrase
    CE and the KL from ``ref`` (the unedited logits [E, L', V] on ``loc``), each summed over mini-batches."""
    mbs = meta.minibatch_size

    def loss_fn(kernels):
        p = join(frozen, kernels)
        gen = minibatch_ce(apply(p, para.input_ids, para.attention_mask), para.labels, mbs)
        kl = minibatch_kl(ref, apply(p, loc.input_ids, loc.attention_mask), loc.labels, mbs)
        return gen + meta.loc_coef * kl, (gen, kl)

    return loss_fn


def _push_front(history: jax.Array, x) -> jax.Array:
    """``x`` as slot 0 of ``history`` [back_depth, ...], the oldest slot dropped."""
    return jnp.concatenate([jnp.asarray(x)[None].astype(history.dtype), history[:-1]], axis=0)


def _push_history(state: MetaState, para: TurnBatch, loc: TurnBatch, meta: MetaConfig):
    """RLEdit's history with this turn pushed in front: ``hist_para``, ``hist_loc`` ([back_depth, E, L'] per
    leaf, newest first), ``hist_len`` (filled slots, at most ``back_depth``) and the slot weights
    ``slot_w`` [back_depth] (``γ^j`` on filled slots, 0 on empty ones)."""
    hist_para = jax.tree_util.tree_map(_push_front, state.hist_para, para)
    hist_loc = jax.tree_util.tree_map(_push_front, state.hist_loc, loc)
    hist_len = jnp.minimum(state.hist_len + 1, meta.back_depth)
    slot_w = jnp.where(jnp.arange(meta.back_depth) < hist_len,
                       meta.time_decay ** jnp.arange(meta.back_depth, dtype=jnp.float32), 0.0)
    return hist_para, hist_loc, hist_len, slot_w


class _Runner(NamedTuple):
    """How RLEdit's loss runs the model on a TurnBatch ``b`` [E, L]: ``stream(params, b)``, the residual stream
    entering block ``start`` [E, L, d] (None when the model runs whole), and ``logits(params, b, stream)``."""

    stream: Callable
    logits: Callable
    start: Optional[int]


def _runner(apply: Callable, names: tuple, reuse_prefix: bool) -> _Runner:
    """From the lowest target's block when ``apply`` splits into blocks and ``reuse_prefix`` (the blocks below never
    change: every shift lies at or above it); else the whole model."""
    stages = split_stages(apply) if reuse_prefix else None
    start = None if stages is None else stages.first_block(names)
    if start is None:
        return _Runner(lambda p, b: None, lambda p, b, s: apply(p, b.input_ids, b.attention_mask), None)
    return _Runner(lambda p, b: stages.prefix(p, b.input_ids, b.attention_mask, start),
                   lambda p, b, s: stages.head(p, stages.suffix(p, s, b.input_ids, b.attention_mask, start)), start)


def _rledit_loss(run: _Runner, frozen: dict, params: dict, slot_w: jax.Array, hist_para: TurnBatch,
                 hist_loc: TurnBatch, hist_streams: Optional[tuple], meta: MetaConfig) -> Callable:
    """RLEdit's loss of the edited kernels: ``kernels -> (gen + loc_coef·kl, (gen, kl))`` summed over the history
    slots with weights ``slot_w`` [back_depth]; the KL reference is ``params`` (this turn's pre-shift model).
    ``hist_streams``: the slots' ``run.stream`` of ``(hist_para, hist_loc)`` (None when the model runs whole)."""
    mbs = meta.minibatch_size

    def loss_fn(kernels):
        p = join(frozen, kernels)

        def filled(pb, lb, st):
            sp, sl = (None, None) if st is None else st
            ref = jax.lax.stop_gradient(run.logits(params, lb, sl))
            gen = minibatch_ce(run.logits(p, pb, sp), pb.labels, mbs)
            return gen, minibatch_kl(ref, run.logits(p, lb, sl), lb.labels, mbs)

        def slot(total, xs):
            w, pb, lb, st = xs
            # an empty slot (weight 0: the trajectory's first back_depth-1 turns) runs no model at all, forward or
            # backward -- on an 11-turn trajectory with back_depth 10 that is 45 of 110 slot passes
            gen, kl = jax.lax.cond(w > 0, filled, lambda *_: (jnp.zeros(()), jnp.zeros(())), pb, lb, st)
            return (total[0] + w * gen, total[1] + w * kl), None

        # rematerialized: the backward pass recomputes each slot's forward instead of keeping every slot's
        # activations and full-vocabulary logits at once (back_depth x that -- over 20 GB on SmolLM2 at 100 edits)
        (gen, kl), _ = jax.lax.scan(jax.checkpoint(slot), (jnp.zeros(()), jnp.zeros(())),
                                    (slot_w, hist_para, hist_loc, hist_streams))
        return gen + meta.loc_coef * kl, (gen, kl)

    return loss_fn


def _diagnostics(gen, kl, edit_loss, g_theta, deltas: dict, names: tuple, n_rows) -> dict:
    """One turn's diagnostics: losses, ``grad_norm`` (global norm of ``g_theta``), ``delta_norm`` [n_targets]
    (Frobenius norm of each shift) and ``rows``."""
    return {"gen_loss": gen, "loc_loss": kl, "edit_loss": edit_loss, "grad_norm": optax.global_norm(g_theta),
            "delta_norm": jnp.stack([jnp.linalg.norm(deltas[t]) for t in names]), "rows": n_rows}


@functools.lru_cache(maxsize=8)
def make_turn_step(apply: Callable, targets: tuple, net: hn.NetConfig, meta: MetaConfig, max_rows: int,
                   reuse_prefix: bool = True) -> Callable:
    """The jitted training step ``step(state, frozen, base_kernels, (edit, para, loc)) -> (state, diagnostics)``.

    MALMEN/MEND: the features and the reference logits on ``base_kernels``, one clipped Adam step. RLEdit: on
    ``state.kernels`` (the trajectory model), the history pushed, the gradient accumulated and re-clipped, the
    shift kept applied; no Adam step (``finish_trajectory`` takes it). Diagnostics: ``gen_loss``, ``loc_loss``
    (unweighted sums over the turn's mini-batches; RLEdit: over the back-tracked turns, γ-weighted),
    ``edit_loss``, ``grad_norm`` (of this turn's hypernet gradient), ``delta_norm`` [n_targets], ``rows``.
    """
    names = tuple(t[0] for t in targets)
    opt = _optimizer(meta)
    mbs = meta.minibatch_size
    positions = "all" if net.token == "all" else "answer"
    rl = meta.algorithm == "rledit"
    run = _runner(apply, names, reuse_prefix and rl)

    def features_and_shift(theta, stats, params, edit):
        feats, edit_loss, n_rows = turn_features(apply, params, names, edit, minibatch_size=mbs,
                                                 max_rows=max_rows, positions=positions)
        stats = hn.fold_turn(net, stats, feats, _rows(feats, targets), targets, "train")
        deltas, pullback = hn.shift_vjp(net, theta, stats, feats, targets)
        return stats, deltas, pullback, edit_loss, n_rows

    def edited(kernels, deltas):
        return {t: kernels[t] + deltas[t].astype(kernels[t].dtype) for t in names}

    def malmen_step(state: MetaState, frozen, base, batch):
        edit, para, loc = batch
        params = join(frozen, base)
        stats, deltas, pullback, edit_loss, n_rows = features_and_shift(state.theta, state.stats, params, edit)
        ref = jax.lax.stop_gradient(apply(params, loc.input_ids, loc.attention_mask))
        loss_fn = _malmen_loss(apply, frozen, ref, para, loc, meta)
        (_, (gen, kl)), grad_w = jax.value_and_grad(loss_fn, has_aux=True)(edited(base, deltas))
        g_theta = _theta_grad(meta, names, deltas, pullback, grad_w)
        updates, opt_state = opt.update(g_theta, state.opt_state, state.theta)
        theta = optax.apply_updates(state.theta, updates)
        diag = _diagnostics(gen, kl, edit_loss, g_theta, deltas, names, n_rows)
        return state.replace(theta=theta, opt_state=opt_state, stats=stats), diag

    def rledit_step(state: MetaState, frozen, base, batch):
        del base  # the trajectory model is state.kernels
        edit, para, loc = batch
        params = join(frozen, state.kernels)
        stats, deltas, pullback, edit_loss, n_rows = features_and_shift(state.theta, state.stats, params, edit)
        hist_para, hist_loc, hist_len, slot_w = _push_history(state, para, loc, meta)
        hist_streams = None
        if state.hist_streams is not None:   # this turn's streams pushed in front, as its probes are
            hist_streams = tuple(_push_front(h, run.stream(params, b)) for h, b in zip(state.hist_streams, (para, loc)))
        loss_fn = _rledit_loss(run, frozen, params, slot_w, hist_para, hist_loc, hist_streams, meta)
        new_kernels = edited(state.kernels, deltas)
        (_, (gen, kl)), grad_w = jax.value_and_grad(loss_fn, has_aux=True)(new_kernels)
        g_theta = _theta_grad(meta, names, deltas, pullback, grad_w)
        acc = _clip(jax.tree_util.tree_map(jnp.add, state.acc, g_theta), meta.max_grad_norm)
        diag = _diagnostics(gen, kl, edit_loss, g_theta, deltas, names, n_rows)
        return state.replace(stats=stats, acc=acc, kernels=new_kernels, hist_para=hist_para, hist_loc=hist_loc,
                             hist_len=hist_len, hist_streams=hist_streams), diag

    return jax.jit(rledit_step if rl else malmen_step, donate_argnums=(0,))


def init_state(net: hn.NetConfig, meta: MetaConfig, targets: tuple, base_kernels: dict,
               turns: TrainTurns, streams: Optional[tuple] = None) -> MetaState:
    """The state before the first training turn: fresh θ (seeded by ``net.seed``), Adam state, empty
    statistics, and for RLEdit a zero gradient buffer, the base kernels and an empty history (with ``streams``,
    the shapes of one turn's paraphrase and locality streams, an empty stream history too)."""
    theta = hn.init_theta(net, targets)
    state = MetaState(theta=theta, opt_state=_optimizer(meta).init(theta), stats=hn.init_stats(targets))
    if meta.algorithm == "rledit":
        if streams is not None:
            state = state.replace(hist_streams=tuple(jnp.zeros((meta.back_depth,) + tuple(x.shape), x.dtype)
                                                     for x in streams))
        state = start_trajectory(state, meta, base_kernels, turns)
    return state


def start_trajectory(state: MetaState, meta: MetaConfig, base_kernels: dict, turns: TrainTurns) -> MetaState:
    """RLEdit: the model back to the base kernels, the history and the gradient buffer emptied."""
    empty = lambda a: np.zeros((meta.back_depth,) + np.shape(a)[1:], np.asarray(a).dtype)
    streams = None if state.hist_streams is None else tuple(jnp.zeros_like(h) for h in state.hist_streams)
    return state.replace(acc=jax.tree_util.tree_map(jnp.zeros_like, state.theta),
                         kernels={t: jnp.array(k, copy=True) for t, k in base_kernels.items()},
                         hist_para=jax.tree_util.tree_map(empty, turns.paraphrase),
                         hist_loc=jax.tree_util.tree_map(empty, turns.locality),
                         hist_len=jnp.zeros((), jnp.int32), hist_streams=streams)


def finish_trajectory(state: MetaState, meta: MetaConfig) -> MetaState:
    """RLEdit: the one Adam step of the trajectory with the accumulated (re-clipped) gradient."""
    opt = _optimizer(meta)
    updates, opt_state = opt.update(state.acc, state.opt_state, state.theta)
    return state.replace(theta=optax.apply_updates(state.theta, updates), opt_state=opt_state)


def fingerprint(model_kernels: dict, turns: TrainTurns, net: hn.NetConfig, meta: MetaConfig) -> dict:
    """What must match for a meta-training checkpoint to be resumed: base kernels and data digest, configs."""
    return {"data_and_model_sha256": digest((model_kernels, turns)), "net": repr(net), "meta": repr(meta)}


def _open_checkpoint(checkpoint_dir: Optional[str], resume: bool, state: MetaState, base: dict,
                     turns: TrainTurns, net: hn.NetConfig, meta: MetaConfig, total: int, log: Callable):
    """``train``'s checkpointer: ``(ckpt, config, first, state, collected)``, i.e. the ``RunCheckpointer`` and
    run fingerprint (None without ``checkpoint_dir``), the turns already done, the state to continue from and the
    diagnostics saved so far (a list of per-turn dicts); with ``resume`` from the newest good checkpoint."""
    first, collected = 0, []
    ckpt = config = None
    if checkpoint_dir is not None:
        ckpt = RunCheckpointer(checkpoint_dir)
        config = fingerprint(base, turns, net, meta)
        if resume:
            got = ckpt.latest(state, config, log=log)
            if got is not None:
                first, state, saved, _ = got
                collected = [saved] if saved else []
                log(f"meta-training resumes after {first} of {total} turns from {ckpt.path(first)}")
    return ckpt, config, first, state, collected


def _progress_bar(progress: bool, total: int, first: int, meta: MetaConfig, net: hn.NetConfig):
    """A tqdm bar over ``total`` turns starting at ``first``, or None when ``progress`` is off."""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=first, desc=f"meta-training {meta.algorithm} ({net.normalization})",
                   unit="turn")
    return bar


def _log_learned(state: MetaState, net: hn.NetConfig, meta: MetaConfig, done: int, steps: int,
                 log: Callable) -> dict:
    """``hn.summary`` of the trained θ (learned ``lr[m]``, ``lamda[m]``, ``‖B‖`` per group), each group logged."""
    learned = hn.summary(state.theta)
    for group, s in learned.items():
        log(f"{meta.algorithm} ({net.normalization}) after {done} turns ({steps} Adam steps), group {group}: "
            f"lr[m] = "
            f"{['%.3g' % x for x in s['lr']]}, lamda[m] = {['%.3g' % x for x in s['lamda']]}, "
            f"||B|| = {s['B_norm']:.4g}")
    return learned


def _stream_shapes(apply: Callable, layout: tuple, params, turns: TrainTurns, reuse_prefix: bool,
                   meta: MetaConfig) -> Optional[tuple]:
    """The shapes of one turn's paraphrase and locality streams that RLEdit's history keeps (``_runner``), or None
    when it runs the whole model (MALMEN/MEND always)."""
    run = _runner(apply, tuple(t[0] for t in layout), reuse_prefix and meta.algorithm == "rledit")
    if run.start is None:
        return None
    first_turn = lambda tb: jax.tree_util.tree_map(lambda a: np.asarray(a)[0], tb)  # noqa: E731
    return tuple(jax.eval_shape(run.stream, params, first_turn(tb)) for tb in (turns.paraphrase, turns.locality))


def train(model, targets: Sequence[str], turns: TrainTurns, net: hn.NetConfig, meta: MetaConfig, *,
          checkpoint_dir: Optional[str] = None, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, stop_after: Optional[int] = None,
          reuse_prefix: bool = True) -> tuple[hn.Trained, dict]:
    """Meta-train a hypernetwork for ``targets`` of ``model`` (``.params``, ``.apply``) on ``turns``.

    Runs ``meta.n_epochs`` passes over the first ``meta.num_seq`` turns (all by default), one jitted step per
    turn (see the module docstring). With ``checkpoint_dir`` the state and cursor are saved every
    ``meta.checkpoint_every`` turns and at the end (``lnjax.io.checkpoint.RunCheckpointer``, per-turn diagnostics
    beside it); ``resume=True`` continues from the newest good checkpoint there, bit for bit as an uninterrupted
    run (a checkpoint saved for another model, data or config is refused). ``stop_after`` stops after that many
    turns in total (for tests of the resume). ``reuse_prefix=False``: RLEdit runs the whole model in every loss
    term (module docstring, "Cost"; the same result).

    Returns ``(trained, report)``: the ``hypernet.Trained`` net and statistics, and a report with the per-turn
    diagnostics (numpy arrays), the learned ``lr[m]``, ``lamda[m]`` and ``‖B‖`` per group (also logged), and the
    number of Adam steps taken.
    """
    targets = tuple(targets)
    frozen, base = frozen_and_kernels(model.params, targets)
    layout = hn.target_layout({t: tuple(k.shape) for t, k in base.items()})
    T = turns.n_turns if meta.num_seq is None else min(meta.num_seq, turns.n_turns)
    total = T * meta.n_epochs
    max_rows = feature_rows(turns, net.token)
    # one compiled step serves every run length and checkpoint interval
    step = make_turn_step(model.apply, layout, net,
                          dataclasses.replace(meta, n_epochs=1, num_seq=None, checkpoint_every=1), max_rows,
                          reuse_prefix)
    state = init_state(net, meta, layout, base, turns,
                       _stream_shapes(model.apply, layout, join(frozen, base), turns, reuse_prefix, meta))
    ckpt, config, first, state, collected = _open_checkpoint(checkpoint_dir, resume, state, base, turns, net,
                                                             meta, total, log)
    bar = _progress_bar(progress, total, first, meta, net)
    stop = total if stop_after is None else min(total, stop_after)
    for g in range(first, stop):
        t = g % T
        if meta.algorithm == "rledit" and t == 0 and g > 0:
            state = start_trajectory(state, meta, base, turns)
        batch = tuple(jax.tree_util.tree_map(lambda a: np.asarray(a)[t], tb)
                      for tb in (turns.edit, turns.paraphrase, turns.locality))
        state, diag = step(state, frozen, base, batch)
        if meta.algorithm == "rledit" and t == T - 1:
            state = finish_trajectory(state, meta)
        part = {k: np.asarray(v)[None] for k, v in diag.items()}
        collected.append(part)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(gen=f"{float(diag['gen_loss']):.3f}", loc=f"{float(diag['loc_loss']):.3f}")
        if ckpt is not None:
            ckpt.diagnostics.append(g, part)
            if (g + 1) % meta.checkpoint_every == 0 or g + 1 == stop:
                ckpt.save(g + 1, state, config)
    if bar is not None:
        bar.close()
    done = stop
    diagnostics = {k: np.concatenate([p[k] for p in collected]) for k in collected[0]} if collected else {}
    steps = done if meta.algorithm != "rledit" else done // T
    learned = _log_learned(state, net, meta, done, steps, log)
    trained = hn.Trained(theta=state.theta, stats=state.stats, config=net, targets=layout)
    return trained, {"diagnostics": diagnostics, "learned": learned, "adam_steps": steps, "turns_done": done}


def save_trained(path: str, trained: hn.Trained, report: Optional[dict] = None) -> str:
    """Save a trained hypernetwork (θ and statistics) with its configs in the metadata; returns ``path``."""
    meta = {"net": dataclasses.asdict(trained.config), "targets": [list(t) for t in trained.targets],
            "learned": (report or {}).get("learned"), "adam_steps": (report or {}).get("adam_steps")}
    return save(path, {"theta": trained.theta, "stats": trained.stats}, meta)


def load_trained(path: str, net: hn.NetConfig, shapes: Mapping[str, tuple]) -> hn.Trained:
    """Load what ``save_trained`` wrote for targets of ``shapes`` under config ``net``."""
    like = hn.fresh(net, shapes)
    tree = load(path, {"theta": like.theta, "stats": like.stats})
    return like.replace(theta=tree["theta"], stats=tree["stats"])
