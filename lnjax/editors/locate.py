"""Locate-then-edit editors: MEMIT and AlphaEdit as sequential, jittable ``Editor``s, as their
released code runs them (docs/method.md §14).

One turn of either editor, for the turn's E edits (all in one batch, fixed shapes, no per-edit Python loop):

1. **Target vectors** (``compute_z``): a shift ``δ_e`` of the residual stream after the *last* edited block, at the
   subject's last token, found by Adam(``v_lr``) on ``NLL(target) + kl_factor·KL(p ‖ p_init) +
   v_weight_decay·‖δ‖/‖h‖²`` with at most ``v_num_grad_steps − 1`` updates, a per-edit early exit once its loss
   is below ``stop_loss`` (5e-2) and ``‖δ‖ ≤ clamp_norm_factor·‖h‖`` after every step; ``z = h + δ``.
2. **Layer by layer**, lowest first, on the partially updated model: keys ``K`` (the edited module's input at the
   subject-last token, averaged over the context prefixes by group, ``compute_ks``), the current block output
   ``cur_z``, the residual ``R = (z − cur_z)/(L − i)`` spread over the remaining layers, and the shift
   - MEMIT: ``ΔW = (λ C + KᵀK)⁻¹ Kᵀ R`` (the paper's ``R Kᵀ(λC + KKᵀ)⁻¹`` in lnjax's (in, out) layout);
   - AlphaEdit: ``ΔW = [P (KᵀK + cache_c) + α I]⁻¹ P Kᵀ R``, ``P`` the null-space projector of ``C``;
   applied at once so the next layer's keys see it.
3. AlphaEdit only: ``cache_c += KᵀK`` with the keys recomputed on the edited model (a sum over every past edit).

Deviations from the released code, all forced or stated:
- **Precision.** The reference solves MEMIT in float64; JAX runs without float64 unless ``jax_enable_x64`` is
  set, so the solves are float32 by default (``dtype="float64"`` when x64 is enabled). AlphaEdit is float32 in
  the reference too.
- **KL prompt.** The reference's KL prompt is ``"{subject} is a"`` read at the subject's last token; lnjax knows
  only the subject's last token (``EditTurn.subject_last``), so the KL is read at that token of the edit prompt
  itself (the prompt's words up to and including the subject). Only tokens up to the subject matter in either.
- **Context templates.** The reference samples 5 prefixes from the unedited model without a seed; here the
  prefixes are given as token ids (``prefixes``; ``generate_prefixes`` samples them with a seed). The bare prompt
  is always the first template and its group weighs 1/2 when prefixes are given (1 without), as in the reference.
- ``fact_token="prompt_last"`` (an option, not the published setting) reads keys and writes ``δ`` at the last
  prompt token instead of the subject's last token (ROME's "last" token; the released MEMIT raises on it). The
  embedded world's model looks facts up at the question mark, after the subject, which is where this points.
- Edits without a known subject position (``subject_last < 0``) or without answer tokens are masked out of the
  solve (a concrete turn with such a real edit raises instead).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from lnjax.core.protocol import EditCounters, Editor, reject_nonfinite, target_shapes
from lnjax.core.features import is_concrete
from lnjax.editors.key_stats import KeyStats, check_tapped, tap_inputs
from lnjax.models import get_module, split_path, split_stages, with_module_leaf
from lnjax.core.turns import IGNORE, TurnBatch
from lnjax.models.probe import supervised_slots, token_log_likelihood

_HP = jax.lax.Precision.HIGHEST
THRESHOLD_MODES = ("absolute", "relative")
FACT_TOKENS = ("subject_last", "prompt_last")


@struct.dataclass
class LocateState(EditCounters):
    """State of a MEMIT/AlphaEdit editor (an immutable pytree).

    ``second_moment``: target -> ``C`` [d_in, d_in] (MEMIT); ``projector``: target -> ``P`` and ``cache_c``:
    target -> Σ KᵀK of past edits (AlphaEdit); ``null_dims``: target -> number of null directions kept in ``P``
    (int32); ``z_loss``: the last turn's mean target-vector loss before and after optimisation [2];
    the counters of ``lnjax.core.protocol.EditCounters``; ``targets`` (static): ``(name, d_in, d_out)`` in edit order
    (lowest layer first).
    """

    second_moment: dict
    projector: dict
    cache_c: dict
    null_dims: dict
    z_loss: jax.Array


@dataclasses.dataclass(frozen=True)
class LocateConfig:
    """Hyperparameters of MEMIT (``method="memit"``) and AlphaEdit (``"alphaedit"``).

    z: ``v_lr``, ``v_num_grad_steps``, ``v_weight_decay``, ``clamp_norm_factor``, ``kl_factor``, ``stop_loss``;
    MEMIT: ``mom2_update_weight`` (λ); AlphaEdit: ``l2`` (α), ``nullspace_threshold``, ``threshold_mode``
    (absolute | relative), ``null_rank``; context: ``prefixes`` (token ids), ``insert_at``; ``fact_token``
    (subject_last | prompt_last); ``dtype`` of the solves (float32 | float64, the latter with x64 enabled).
    """

    method: str
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    stop_loss: float = 5e-2
    mom2_update_weight: float = 15000.0
    l2: float = 10.0
    nullspace_threshold: float = 2e-2
    threshold_mode: str = "absolute"
    null_rank: Optional[int] = None
    prefixes: tuple = ()
    insert_at: int = 1
    dtype: str = "float32"
    fact_token: str = "subject_last"

    def __post_init__(self):
        if self.method not in ("memit", "alphaedit"):
            raise ValueError(f"method must be 'memit' or 'alphaedit', got {self.method!r}")
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}")
        if self.v_num_grad_steps < 1:
            raise ValueError(f"v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("dtype='float64' needs jax.config.update('jax_enable_x64', True)")
        if self.insert_at < 0:
            raise ValueError(f"insert_at must be >= 0, got {self.insert_at}")
        for i, p in enumerate(self.prefixes):
            if not all(isinstance(t, (int, np.integer)) for t in p):
                raise ValueError(f"prefixes[{i}] must be a sequence of token ids, got {p!r}")
        # Hashable and with a stable repr (checkpoint fingerprints use it).
        object.__setattr__(self, "prefixes", tuple(tuple(int(t) for t in p) for p in self.prefixes))


# ----------------------------------------------------------------------------------------------- the solves


def memit_shift(keys: jax.Array, resid: jax.Array, second_moment: jax.Array, mom2_update_weight: float,
                dtype=jnp.float32) -> jax.Array:
    """MEMIT's shift ``(λ C + KᵀK)⁻¹ Kᵀ R`` (d_in, d_out) for keys [n, d_in], residuals [n, d_out] and the
    second moment ``C`` [d_in, d_in] (rows of zeros contribute nothing). LU solve, as the reference."""
    K, R, C = (a.astype(dtype) for a in (keys, resid, second_moment))
    lhs = mom2_update_weight * C + jnp.matmul(K.T, K, precision=_HP)
    return jnp.linalg.solve(lhs, jnp.matmul(K.T, R, precision=_HP)).astype(jnp.float32)


def alphaedit_shift(keys: jax.Array, resid: jax.Array, projector: jax.Array, cache_c: jax.Array, l2: float,
                    dtype=jnp.float32) -> jax.Array:
    """AlphaEdit's shift ``[P (KᵀK + cache_c) + α I]⁻¹ P Kᵀ R`` (d_in, d_out) for keys [n, d_in], residuals
    [n, d_out], projector ``P`` and the past edits' ``cache_c`` (both [d_in, d_in]). Its columns lie in range(P)."""
    K, R, P, cache = (a.astype(dtype) for a in (keys, resid, projector, cache_c))
    gram = jnp.matmul(K.T, K, precision=_HP) + cache
    lhs = jnp.matmul(P, gram, precision=_HP) + l2 * jnp.eye(P.shape[0], dtype=dtype)
    rhs = jnp.matmul(P, jnp.matmul(K.T, R, precision=_HP), precision=_HP)
    return jnp.linalg.solve(lhs, rhs).astype(jnp.float32)


def null_space_projector(second_moment: jax.Array, threshold: float = 2e-2, mode: str = "absolute",
                         null_rank: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """AlphaEdit's projector ``P = U₀U₀ᵀ`` [d, d] onto the directions of ``C`` [d, d] with small singular values,
    and their number (int32).

    ``mode="absolute"`` (published): singular values ``< threshold``; ``"relative"``: ``< threshold·σ_max``;
    ``null_rank=r`` overrides both and keeps the ``r`` smallest. ``C`` is symmetric PSD, so its singular vectors
    are its eigenvectors and its singular values the absolute eigenvalues.
    """
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    C = second_moment.astype(jnp.float32)
    evals, U = jnp.linalg.eigh(0.5 * (C + C.T))
    sigma = jnp.abs(evals)
    if null_rank is not None:
        if not 0 <= null_rank <= C.shape[0]:
            raise ValueError(f"null_rank must be in [0, {C.shape[0]}], got {null_rank}")
        keep = jnp.argsort(jnp.argsort(sigma)) < null_rank
    elif mode == "absolute":
        keep = sigma < threshold
    else:
        keep = sigma < threshold * jnp.max(sigma)
    P = jnp.matmul(U * keep.astype(jnp.float32)[None, :], U.T, precision=_HP)
    return P, jnp.sum(keep).astype(jnp.int32)


# ------------------------------------------------------------------------------------- prompts and forwards


def block_path(target: str) -> tuple[str, int]:
    """``("model.layers", 3)`` for ``"model.layers.3.mlp.down_proj"``: the block list and the block index."""
    parts = split_path(target)
    for i, p in enumerate(parts):
        if isinstance(p, int):
            return ".".join(map(str, parts[:i])), p
    raise ValueError(f"target {target!r} has no block index (expected a path like 'model.layers.3.mlp.down_proj')")


def prefix_arrays(prefixes: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Context prefixes as arrays: tokens [P, Lmax] (row 0 the empty, bare template), lengths [P] and the key
    averaging weights [P] (bare group 1/2, each prefix 1/(2·n); 1 for the bare template alone)."""
    rows = [()] + [tuple(int(t) for t in p) for p in prefixes]
    width = max(len(r) for r in rows)
    toks = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        toks[i, :len(r)] = r
    n = len(rows) - 1
    weights = np.array([1.0] if n == 0 else [0.5] + [0.5 / n] * n, np.float32)
    return toks, np.array([len(r) for r in rows], np.int32), weights


def context_rows(edit: TurnBatch, subject_last: jax.Array, toks: np.ndarray, lens: np.ndarray,
                 insert_at: int) -> tuple[TurnBatch, jax.Array]:
    """Every edit under every context prefix: the prefix's tokens inserted at position ``insert_at`` (after BOS
    by default) of each edit row. Returns rows [E·P, L + Lmax] (edit-major) and their subject-last position
    [E·P]."""
    ids, attn, labels = edit.input_ids, edit.attention_mask, edit.labels
    E, L = ids.shape
    P, width = toks.shape
    k = jnp.arange(L + width)[None, :]
    plen = jnp.asarray(lens)[:, None]
    in_prefix = (k >= insert_at) & (k < insert_at + plen)
    src = jnp.where(k < insert_at, k, k - plen)
    real = (src >= 0) & (src < L) & ~in_prefix
    src = jnp.clip(src, 0, L - 1)
    pre = jnp.asarray(toks)[jnp.arange(P)[:, None], jnp.clip(k - insert_at, 0, max(width - 1, 0))] if width else \
        jnp.zeros((P, L), jnp.int32)

    def shifted(a, fill, prefix_value):
        got = a[:, src]  # [E, P, L']
        return jnp.where(in_prefix[None], prefix_value, jnp.where(real[None], got, fill))

    new_ids = shifted(ids, 0, pre[None] if width else 0)
    new_mask = shifted(attn, 0, 1)
    new_labels = jnp.where((k < insert_at + plen)[None], IGNORE, shifted(labels, IGNORE, IGNORE))
    pos = subject_last[:, None] + jnp.where(subject_last[:, None] >= insert_at, plen[:, 0][None], 0)
    flat = lambda a: a.reshape(E * P, -1).astype(jnp.int32)
    return TurnBatch(flat(new_ids), flat(new_mask), flat(new_labels)), pos.reshape(-1)


def _with_block_hook(params, target: str, hook: Callable):
    blocks, index = block_path(target)
    layer = get_module(params, blocks)[index]
    return with_module_leaf(params, blocks, index, {**layer, "residual": hook})


def _forward(apply: Callable, params, rows: TurnBatch, pos: jax.Array, z_target: str, key_targets=(),
             delta_rows: Optional[jax.Array] = None):
    """One pass over ``rows``: logits [B, L, V], the block output at ``pos`` of ``z_target``'s block [B, d]
    (before ``delta_rows`` [B, d] is added there) and each key target's input at ``pos`` [B, d_in]."""
    B = rows.input_ids.shape[0]
    sink: dict = {}
    at = (jnp.arange(B), pos)

    def hook(h):
        sink["h"] = h[at].astype(jnp.float32)
        if delta_rows is None:
            return h
        return h.at[at].add(delta_rows.astype(h.dtype))

    tapped = _with_block_hook(tap_inputs(params, key_targets, rows.input_ids.shape, sink), z_target, hook)
    logits = apply(tapped, rows.input_ids, rows.attention_mask)
    check_tapped(sink, key_targets)
    return logits, sink["h"], {t: sink[t][at].astype(jnp.float32) for t in key_targets}


def _z_stages(apply: Callable, z_target: str):
    """``(Stages, z block)`` when ``apply`` splits into blocks (``lnjax.models.split_stages``) and the z block is
    not the last one, else None. Then the blocks up to the z block run once per turn (δ is added after them, so
    they cannot depend on it) and only the blocks above it run at every step of the z optimisation."""
    stages = split_stages(apply)
    _, zb = block_path(z_target)
    if stages is None or zb + 1 >= stages.n_layers:
        return None
    return stages, zb


def _prefix_forward(stages, zb: int, params, rows: TurnBatch, pos: jax.Array, z_target: str, key_targets=()):
    """What ``_forward`` returns but the logits, running blocks ``0..zb`` only: the residual stream entering
    block ``zb + 1`` [B, L, d] (the z block's output), that output at ``pos`` [B, d] and each key target's input
    at ``pos`` [B, d_in] (every key target lies at or below the z block)."""
    B = rows.input_ids.shape[0]
    sink: dict = {}
    at = (jnp.arange(B), pos)
    tapped = tap_inputs(params, key_targets, rows.input_ids.shape, sink)
    h = stages.prefix(tapped, rows.input_ids, rows.attention_mask, zb + 1)
    check_tapped(sink, key_targets)
    return h, h[at].astype(jnp.float32), {t: sink[t][at].astype(jnp.float32) for t in key_targets}


def _safe_norm(x: jax.Array) -> jax.Array:
    # ‖0‖ has no gradient in JAX (0/0); the reference's torch norm uses 0 there, as does this.
    sq = jnp.sum(x * x, axis=-1)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _z_scorer(apply: Callable, params, rows: TurnBatch, pos: jax.Array, z_target: str, bare: jax.Array,
              max_rows: Optional[int]):
    """``(h0 [B, d], logp0 [E, V], score)``: the z block's output at ``pos`` and the log-probabilities at the bare
    rows' ``pos`` on the unshifted rows, and ``score(delta_rows)`` -> ``(ce [B] summed over each row's supervised
    positions, log-probabilities at the bare rows' ``pos`` [E, V])`` with ``delta_rows`` [B, d] added to the z
    block's output at ``pos``.

    Through ``Stages`` (``_z_stages``) the blocks up to the z block run once here and ``score`` runs the rest;
    with ``max_rows`` (a bound on the supervised positions of the rows) only those positions and the bare rows'
    ``pos`` are projected to the vocabulary. Otherwise every call runs the whole model (``_forward``)."""
    B, L = rows.labels.shape
    bare_logp = lambda logits: jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # noqa: E731
    split = _z_stages(apply, z_target)
    if split is None:
        def score(delta_rows):
            logits, _, _ = _forward(apply, params, rows, pos, z_target, delta_rows=delta_rows)
            ce, _ = token_log_likelihood(logits, rows.labels)
            return jnp.sum(ce, axis=1), bare_logp(logits[bare, pos[bare]])

        logits0, h0, _ = _forward(apply, params, rows, pos, z_target)  # one pass gives h0 and logp0
        return h0, bare_logp(logits0[bare, pos[bare]]), score
    stages, zb = split
    h_in, h0, _ = _prefix_forward(stages, zb, params, rows, pos, z_target)
    at = (jnp.arange(B), pos)
    if max_rows is not None:
        idx, real = supervised_slots(rows.labels, min(int(max_rows), B * L))
        slot_labels = jnp.where(real, rows.labels.reshape(-1)[idx], IGNORE)

    def score(delta_rows):
        hidden = stages.suffix(params, h_in.at[at].add(delta_rows.astype(h_in.dtype)), rows.input_ids,
                               rows.attention_mask, zb + 1)
        logp = bare_logp(stages.head(params, hidden[bare, pos[bare]]))
        if max_rows is None:
            ce, _ = token_log_likelihood(stages.head(params, hidden), rows.labels)
            return jnp.sum(ce, axis=1), logp
        ce, _ = token_log_likelihood(stages.head(params, hidden.reshape(B * L, -1)[idx]), slot_labels)
        return jax.ops.segment_sum(ce, idx // L, B), logp
    return h0, score(jnp.zeros_like(h0))[1], score


def compute_z(apply: Callable, params, rows: TurnBatch, pos: jax.Array, valid: jax.Array, z_target: str,
              cfg: LocateConfig, max_rows: Optional[int] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Target block outputs ``z = h + δ`` [E, d] at the last edited block (``z_target``'s), for rows
    [E·P, L'] from ``context_rows`` (row 0 of each edit the bare prompt) and ``valid`` [E]. ``max_rows``: a
    bound on the rows' supervised positions (P times the turn's), so that only those are projected to the
    vocabulary (``_z_scorer``). The optimisation stops once no edit is above ``stop_loss`` (the reference
    optimises each edit alone and breaks there; a stopped edit takes no further step either way).

    Returns ``(z, h_init, losses [2, E])``: per-edit loss before optimisation and at the returned ``δ``.
    """
    E = valid.shape[0]
    P = rows.input_ids.shape[0] // E
    row_edit = jnp.repeat(jnp.arange(E), P)
    bare = jnp.arange(E) * P
    h0, logp_init, score = _z_scorer(apply, params, rows, pos, z_target, bare, max_rows)
    h_init = h0[bare]
    d = h_init.shape[1]
    n_sup = jnp.maximum(jnp.sum(rows.labels != IGNORE, axis=1), 1)
    h_norm = _safe_norm(h_init)
    max_norm = cfg.clamp_norm_factor * h_norm

    def losses(delta):
        ce_rows, logp = score(delta[row_edit])
        nll = jnp.mean((ce_rows / n_sup).reshape(E, P), axis=1)
        kl = jnp.sum(jnp.exp(logp) * (logp - logp_init), axis=-1)
        wd = cfg.v_weight_decay * _safe_norm(delta) / jnp.maximum(h_norm ** 2, 1e-30)
        per_edit = jnp.where(valid, nll + cfg.kl_factor * kl + wd, 0.0)
        return jnp.sum(per_edit), per_edit

    opt = optax.adam(cfg.v_lr)
    grad = jax.value_and_grad(losses, has_aux=True)

    def step(carry):
        i, delta, opt_state, active = carry
        (_, per_edit), g = grad(delta)
        active = active & (per_edit >= cfg.stop_loss)
        upd, opt_state = opt.update(g, opt_state)
        new = delta + upd
        n = _safe_norm(new)
        new = jnp.where((n > max_norm)[:, None], new * (max_norm / jnp.maximum(n, 1e-30))[:, None], new)
        return i + 1, jnp.where(active[:, None], new, delta), opt_state, active

    delta0 = jnp.zeros((E, d), jnp.float32)
    # At most v_num_grad_steps - 1 updates: the reference breaks before stepping at its last iteration. Once
    # every edit is below stop_loss (inactive) no step changes anything, so the loop ends there.
    _, delta, _, _ = jax.lax.while_loop(lambda c: (c[0] < cfg.v_num_grad_steps - 1) & jnp.any(c[3]), step,
                                        (jnp.zeros((), jnp.int32), delta0, opt.init(delta0), valid))
    first = losses(delta0)[1]
    last = losses(delta)[1]
    return h_init + delta, h_init, jnp.stack([first, last])


def keys_and_z(apply: Callable, params, rows: TurnBatch, pos: jax.Array, weights: jax.Array, E: int,
               z_target: str, key_targets: Sequence[str]) -> tuple[dict, jax.Array]:
    """``compute_ks``: each key target's input at the subject-last token, averaged over the context prefixes
    with ``weights`` [P] → {target: [E, d_in]}; and the current block output at the bare prompts [E, d]."""
    split = _z_stages(apply, z_target)
    if split is None:
        _, h, keys = _forward(apply, params, rows, pos, z_target, key_targets)
    else:  # the keys and the z block's output lie at or below the z block: nothing above it runs
        _, h, keys = _prefix_forward(*split, params, rows, pos, z_target, key_targets)
    P = rows.input_ids.shape[0] // E
    avg = {t: jnp.einsum("epd,p->ed", k.reshape(E, P, -1), weights, precision=_HP) for t, k in keys.items()}
    return avg, h.reshape(E, P, -1)[:, 0]


# -------------------------------------------------------------------------------------------------- editor


def generate_prefixes(apply: Callable, params, starts: Sequence[Sequence[int]], *, length: int = 10,
                      top_k: int = 5, seed: int = 0, bos: Optional[int] = None) -> tuple:
    """Context prefixes sampled from the model, seeded (the reference samples them unseeded): for each start
    (token ids), ``length`` tokens in total by top-``k`` sampling after ``bos`` (when given) and the start.
    Returns a tuple of token-id tuples (the start included) for ``memit(..., prefixes=...)``."""
    key = jax.random.PRNGKey(seed)
    out = []
    for start in starts:
        seq = ([bos] if bos is not None else []) + [int(t) for t in start]
        n0 = len(seq)
        buf = np.zeros((1, n0 + length), np.int32)
        buf[0, :n0] = seq
        for t in range(n0, n0 + length - len(start)):
            mask = (np.arange(buf.shape[1]) < t).astype(np.int32)[None]
            logits = np.asarray(apply(params, jnp.asarray(buf), jnp.asarray(mask)))[0, t - 1]
            top = np.argsort(-logits)[:top_k]
            key, sub = jax.random.split(key)
            probs = np.asarray(jax.nn.softmax(jnp.asarray(logits[top])))
            buf[0, t] = int(top[int(jax.random.choice(sub, top_k, p=jnp.asarray(probs)))])
        out.append(tuple(int(x) for x in buf[0, (1 if bos is not None else 0):n0 + length - len(start)]))
    return tuple(out)


def _ordered_targets(shapes: Mapping[str, tuple[int, int]]) -> tuple:
    targets = []
    seen: dict = {}
    for name, d_in, d_out in target_shapes(shapes):
        blocks, index = block_path(name)
        if (blocks, index) in seen:
            raise ValueError(f"targets {seen[(blocks, index)]!r} and {name!r} are in the same block; MEMIT and "
                             "AlphaEdit edit one module per block")
        seen[(blocks, index)] = name
        targets.append((index, name, d_in, d_out))
    d_outs = {t[3] for t in targets}
    if len(d_outs) != 1:
        raise ValueError(f"edited modules must all write the residual stream (one d_out); got {sorted(d_outs)}")
    return tuple((name, d_in, d_out) for _, name, d_in, d_out in sorted(targets))


def _locate_init(shapes: Mapping[str, tuple[int, int]], stats: Mapping[str, KeyStats],
                 cfg: LocateConfig) -> LocateState:
    """The ``init`` of ``locate_editor``: targets ordered by block; per target (d_in, d_in) the second moment
    (MEMIT) or the null-space projector, its rank and a zero key cache (AlphaEdit); zero counters."""
    targets = _ordered_targets(shapes)
    moments, proj, cache, null = {}, {}, {}, {}
    for name, d_in, _ in targets:
        if name not in stats:
            raise ValueError(f"no key statistics for target {name!r} (have {sorted(stats)})")
        C = stats[name].moment()
        if C.shape != (d_in, d_in):
            raise ValueError(f"target {name!r}: key statistics are {C.shape}, expected ({d_in}, {d_in})")
        if cfg.method == "memit":
            moments[name] = C
        else:
            proj[name], null[name] = null_space_projector(C, cfg.nullspace_threshold, cfg.threshold_mode,
                                                          cfg.null_rank)
            cache[name] = jnp.zeros((d_in, d_in), jnp.float32)
    return LocateState(second_moment=moments, projector=proj, cache_c=cache, null_dims=null,
                       z_loss=jnp.zeros((2,), jnp.float32), turns=jnp.zeros((), jnp.int32),
                       rejected=jnp.zeros((), jnp.int32), targets=targets)


def _subject_positions(turn: Any, cfg: LocateConfig) -> tuple[jax.Array, jax.Array]:
    """The fact-token position of each edit [E] int32 (``cfg.fact_token``) and whether the edit is usable [E]
    bool (has answer tokens and a subject position)."""
    edit = turn.edit
    has_answer = jnp.any(edit.labels != IGNORE, axis=1)
    if cfg.fact_token == "prompt_last":  # the position predicting the first answer token
        subject_last = jnp.argmax(edit.labels != IGNORE, axis=1).astype(jnp.int32)
    else:
        subject_last = jnp.asarray(turn.subject_last, jnp.int32)
    # Outside jit a missing subject is a data error worth naming; under jit such edits are masked out.
    if is_concrete(subject_last) and is_concrete(edit.labels):
        bad = np.asarray(has_answer) & (np.asarray(subject_last) < 0)
        if bad.any():
            raise ValueError(f"{cfg.method}: edit {int(np.argmax(bad))} of the turn has no subject position "
                             "(subject_last = -1); the records need a 'subject'")
    return subject_last, has_answer & (subject_last >= 0)


def locate_editor(apply: Callable, stats: Mapping[str, KeyStats], cfg: LocateConfig) -> Editor:
    """A MEMIT or AlphaEdit ``Editor`` (by ``cfg.method``) over the pure ``apply`` with second-moment
    statistics ``stats`` {target: KeyStats} of the unedited model (``lnjax.editors.key_stats``). It needs the turn's
    ``params`` and ``turn`` (``turn.edit`` TurnBatch [E, L], ``turn.subject_last`` [E]) and takes the engine's
    ``max_rows`` (the turn's supervised positions at most; without it every position is projected to the
    vocabulary in the z optimisation); ``features`` is unused."""
    toks, lens, weights = prefix_arrays(cfg.prefixes)
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32

    def init(shapes: Mapping[str, tuple[int, int]]) -> LocateState:
        return _locate_init(shapes, stats, cfg)

    def update(features: Any, state: LocateState, *, warmup=False, params=None, turn=None, max_rows=None):
        if params is None or turn is None:
            raise ValueError(f"{cfg.method} needs the turn's params and turn (Editor.needs)")
        edit = turn.edit
        subject_last, valid = _subject_positions(turn, cfg)
        E = valid.shape[0]
        names = state.target_names()
        z_target = names[-1]
        rows, pos = context_rows(edit, jnp.maximum(subject_last, 0), toks, lens, cfg.insert_at)
        n_templates = rows.input_ids.shape[0] // E
        z, _, z_losses = compute_z(apply, params, rows, pos, valid, z_target, cfg,
                                   None if max_rows is None else max_rows * n_templates)
        w = jnp.asarray(weights)
        vmask = valid.astype(jnp.float32)[:, None]
        current = params
        deltas = {}
        for i, (name, _, _) in enumerate(state.targets):
            keys, cur_z = keys_and_z(apply, current, rows, pos, w, E, z_target, (name,))
            K = keys[name] * vmask
            R = (z - cur_z) * vmask / (len(names) - i)
            if cfg.method == "memit":
                dW = memit_shift(K, R, state.second_moment[name], cfg.mom2_update_weight, dtype)
            else:
                dW = alphaedit_shift(K, R, state.projector[name], state.cache_c[name], cfg.l2, dtype)
            deltas[name] = dW
            kernel = get_module(current, name)["kernel"]
            current = with_module_leaf(current, name, "kernel", kernel + dW.astype(kernel.dtype))
        cache = state.cache_c
        if cfg.method == "alphaedit":
            keys, _ = keys_and_z(apply, current, rows, pos, w, E, z_target, names)
            cache = {n: cache[n] + jnp.matmul((keys[n] * vmask).T, keys[n] * vmask, precision=_HP) for n in names}
        n_valid = jnp.maximum(jnp.sum(vmask), 1.0)
        z_loss = jnp.sum(z_losses, axis=1) / n_valid
        return deltas, state.replace(cache_c=cache, z_loss=z_loss)

    # A non-finite shift is rejected whole (no weight change, key cache as before); z_loss reports the attempt.
    return reject_nonfinite(Editor(init=init, update=update, config=cfg,
                                   needs=frozenset({"params", "turn", "max_rows"})), diagnostics=("z_loss",))


def memit(apply: Callable, stats: Mapping[str, KeyStats], **options) -> Editor:
    """MEMIT as a sequential editor; ``options`` are ``LocateConfig`` fields. Defaults are the
    released GPT-J row (v_lr 0.5, 25 steps, weight decay 0.5, clamp 0.75, KL 0.0625, λ = 15000), the subject's
    last token, and the bare prompt only (``prefixes`` adds context prefixes as token ids, inserted at
    ``insert_at``). Plain sequential MEMIT: nothing but the weights carries over between turns."""
    return locate_editor(apply, stats, LocateConfig("memit", **options))


def alphaedit(apply: Callable, stats: Mapping[str, KeyStats], **options) -> Editor:
    """AlphaEdit: MEMIT's z and keys, the shift projected on the null space of the unedited
    model's key second moment (``P``, fixed at ``init``; the state reports ``null_dims`` per target) and the
    past edits' keys accumulated in ``cache_c``; ``options`` are ``LocateConfig`` fields. Published: absolute
    threshold 2e-2, ``l2 = 10``; ``threshold_mode="relative"`` and ``null_rank`` are the documented small-model
    options for models whose activation scale differs from the 6-8B models the threshold was set for."""
    return locate_editor(apply, stats, LocateConfig("alphaedit", **options))
