"""Optax-shaped editors: ``Editor(init, update)`` pairs of pure functions over features.

    ed = ultraedit(lr=1e-6, alpha=1.0)
    state = ed.init({"a": (d_in, d_out), "b": (d_in, d_out)})
    deltas, state = ed.update({"a": Features(...), "b": Features(...)}, state)   # deltas[name]: (d_in, d_out)

An editor knows no model: it maps one turn's features to one parameter shift per target and carries the
lifelong-normalization statistics in its state (docs/method.md §3-5). Targets of equal shape pool one statistics
state by default (``pooling="shape"``); ``pooling="target"`` keeps one per target.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Union

import jax
import jax.numpy as jnp

from lnjax.core import ln
from lnjax.core.features import Features
# Bound under a private name: ``lnjax.editors.ft`` stays the FT module (FTConfig, ft_editor), the registry's "ft".
from lnjax.editors.ft import ft as _ft
from lnjax.editors.hypernet import REGISTRY as _META_TRAINED
from lnjax.editors.locate import alphaedit, memit
from lnjax.core.protocol import (NEEDS, Editor, EditorState, check_features, fold_group_features, group_members,
                                 reject_nonfinite, target_shapes)
from lnjax.core.solve import METHODS, ridge_shift

# Editor, EditorState and NEEDS live in lnjax.core.protocol and are re-exported here, where users look for them.
__all__ = ["NEEDS", "REGISTRY", "Editor", "EditorState", "LNConfig", "alphaedit", "get", "key_metric",
           "ln_editor", "memit", "no_normalization", "per_turn_normalization", "stableedit", "stableedit_algorithm1",
           "ultraedit"]

NORMALIZATIONS = ("lifelong", "per_turn", "none")
KEY_METRICS = ("identity", "second_moment", "diagonal")
POOLINGS = ("shape", "target")


@dataclasses.dataclass(frozen=True)
class LNConfig:
    """Everything that defines an LN-family editor (see the factories below for meanings and defaults)."""

    lr: float
    alpha: float
    normalization: str = "lifelong"
    variance: str = "exact"
    pooling: str = "shape"
    whiten: bool = False
    whiten_in_warmup: bool = False
    eps0: float = 0.0
    nu0: Union[float, str] = 0.0
    eig_floor: float = 1e-6
    solve_method: str = "auto"
    whitening: str = "eigh"
    key_metric: str = "identity"
    key_prior: float = 1e-2

    @property
    def keeps_stats(self) -> bool:
        """Statistics are kept for normalization, or (even without it) for the key metric."""
        return self.normalization != "none" or self.key_metric != "identity"

    @property
    def tracks_keys(self) -> bool:
        return self.key_metric == "second_moment"

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.variance not in ln.VARIANCE_MODES:
            raise ValueError(f"variance must be one of {ln.VARIANCE_MODES}, got {self.variance!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.solve_method not in METHODS:
            raise ValueError(f"solve_method must be one of {METHODS}, got {self.solve_method!r}")
        if self.alpha < 0 or self.lr < 0:
            raise ValueError(f"lr and alpha must be >= 0, got lr={self.lr}, alpha={self.alpha}")
        if isinstance(self.nu0, str) and self.nu0 != "min":
            raise ValueError(f"nu0 must be a number or 'min' (d_out + 2), got {self.nu0!r}")
        if self.whitening not in ln.WHITENING_METHODS:
            raise ValueError(f"whitening must be one of {ln.WHITENING_METHODS}, got {self.whitening!r}")
        if self.whiten and self.normalization == "none":
            raise ValueError("whitening needs normalization statistics (normalization != 'none')")
        if self.key_metric not in KEY_METRICS:
            raise ValueError(f"key_metric must be one of {KEY_METRICS}, got {self.key_metric!r}")
        if self.key_prior <= 0:
            raise ValueError(f"key_prior must be > 0 (it keeps the key metric invertible), got {self.key_prior}")


def _group_of(name: str, d_in: int, d_out: int, pooling: str) -> str:
    return f"{d_in}x{d_out}" if pooling == "shape" else name


def _as_bool(flag: Union[bool, jax.Array]) -> jax.Array:
    return jnp.asarray(flag, dtype=bool)


def _init_state(cfg: LNConfig, shapes: Mapping[str, tuple[int, int]]) -> EditorState:
    targets = [(name, d_in, d_out, _group_of(name, d_in, d_out, cfg.pooling))
               for name, d_in, d_out in target_shapes(shapes)]
    stats = {}
    if cfg.keeps_stats:
        for _, d_in, d_out, group in targets:
            stats.setdefault(group, ln.init(d_in, d_out, cfg.whiten, cfg.tracks_keys))
    return EditorState(stats=stats, turns=jnp.zeros((), jnp.int32), rejected=jnp.zeros((), jnp.int32),
                       targets=tuple(targets))


def _merged_stats(cfg: LNConfig, state: EditorState, features: Mapping[str, Features], rows: dict) -> dict:
    """The statistics after this turn, merged once per (mini-batch, target) before any shift
    (docs/method.md §3); empty when no statistics are kept."""
    if not cfg.keeps_stats:
        return {}
    new_stats = {}
    for group, names in group_members(state.targets).items():
        base = state.stats[group]
        if cfg.normalization == "per_turn":
            base = ln.init(base.d_in, base.d_out, cfg.whiten, cfg.tracks_keys)
        new_stats[group] = fold_group_features(base, features, rows, names, cfg.variance)
    return new_stats


def _whitening(cfg: LNConfig, new_stats: dict, warmup: jax.Array) -> dict:
    """group -> (use full whitening?, whitening matrix), once per turn per group (StableEdit, docs/method.md §5);
    empty when the editor does not whiten."""
    white = {}
    if not cfg.whiten:
        return white
    for group, stats in new_stats.items():
        nu0 = float(stats.d_out + 2) if cfg.nu0 == "min" else float(cfg.nu0)
        use = ln.can_whiten(stats, nu0) & (stats.count > 0)
        if not cfg.whiten_in_warmup:
            use = use & ~warmup
        mat = jax.lax.cond(use, lambda s: ln.whitening_matrix(s, cfg.eps0, nu0, cfg.eig_floor, cfg.whitening),
                           lambda s: jnp.eye(s.d_out, dtype=jnp.float32), stats)
        white[group] = (use, mat)
    return white


def key_metric(stats: ln.LNStats, prior: float, kind: str = "second_moment") -> jax.Array:
    """The ridge metric from the keys' lifelong statistics; the prior keeps it invertible (scale-free).

    ``"second_moment"``: ``A = E[k kᵀ] + prior · mean(diag E[k kᵀ]) · I`` (d_in, d_in). ``"diagonal"``: its
    diagonal only, ``a = E[k²] + prior · mean(E[k²])`` (d_in,), from the per-dimension mean and variance that
    lifelong normalization keeps anyway (``E[k²] = var + mean²``, variance with ``n`` in the denominator).
    """
    if kind == "diagonal":
        n = jnp.maximum(stats.count.astype(jnp.float32), 1.0)
        mu = ln.mean(stats)[:stats.d_in]
        moment = jnp.maximum(stats.m2 - stats.m2_c, 0.0)[:stats.d_in] / n + mu * mu
        moment = jnp.where(stats.count > 0, moment, 0.0)
        return moment + prior * jnp.maximum(jnp.mean(moment), 1e-12)
    moment = ln.key_second_moment(stats)
    scale = jnp.maximum(jnp.mean(jnp.diag(moment)), 1e-12)
    return moment + prior * scale * jnp.eye(stats.d_in, dtype=jnp.float32)


def _shifts(cfg: LNConfig, state: EditorState, features: Mapping[str, Features], rows: dict, new_stats: dict,
            white: dict) -> dict:
    """Pseudo-values and ridge shifts per target (docs/method.md §4-5; the key metric, once per turn per group,
    is the lnjax extension of §13)."""
    with jax.named_scope("solve"):
        metrics = {group: key_metric(stats, cfg.key_prior, cfg.key_metric) for group, stats in new_stats.items()} \
            if cfg.key_metric != "identity" else {}
    deltas = {}
    for name, d_in, d_out, group in state.targets:
        f = features[name]
        mask = rows[name][0]
        k = f.keys.astype(jnp.float32)
        g = f.value_grads.astype(jnp.float32)
        if cfg.normalization == "none":
            k_hat, g_hat = k, g
        else:
            stats = new_stats[group]
            z_hat = ln.standardize(stats, jnp.concatenate([k, g], axis=1))
            k_hat, g_hat = z_hat[:, :d_in], z_hat[:, d_in:]
            if group in white:
                use, mat = white[group]
                g_hat = jnp.where(use, ln.whiten(stats, g, mat), g_hat)
        values = ln.value_step(k_hat, g_hat, cfg.lr)
        values = jnp.where(mask[:, None], values, 0.0)
        with jax.named_scope("solve"):
            deltas[name] = ridge_shift(k, values, cfg.alpha, mask, cfg.solve_method, metrics.get(group))
    return deltas


def ln_editor(config: LNConfig) -> Editor:
    """An editor of the LN family from a full ``LNConfig`` (the named factories below fill it in).

    ``init(shapes)``: one statistics state per group of targets; ``update(features, state, warmup=False)``:
    statistics merged with the turn's rows, optional whitening, pseudo-values, ridge shifts
    ({target: (d_in, d_out) float32}); a turn with a non-finite shift or statistics is rejected whole
    (``lnjax.core.protocol.reject_nonfinite``: no weight change, statistics as before, ``rejected`` counted).
    """
    cfg = config

    def init(shapes: Mapping[str, tuple[int, int]]) -> EditorState:
        return _init_state(cfg, shapes)

    def update(features: Mapping[str, Features], state: EditorState, warmup: Union[bool, jax.Array] = False, *,
               params=None, turn=None) -> tuple[dict, EditorState]:
        del params, turn  # the LN family needs features only (``needs`` is the default)
        rows = check_features(features, state)
        with jax.named_scope("statistics"):
            new_stats = _merged_stats(cfg, state, features, rows)
        with jax.named_scope("whitening"):
            white = _whitening(cfg, new_stats, _as_bool(warmup))
        deltas = _shifts(cfg, state, features, rows, new_stats, white)
        return deltas, state.replace(stats=new_stats if cfg.keeps_stats else state.stats)

    return reject_nonfinite(Editor(init=init, update=update, config=cfg))


def ultraedit(lr: float = 1e-6, alpha: float = 1.0, *,
              variance: str = "ddof1", pooling: str = "shape", solve_method: str = "auto",
              key_metric: str = "identity", key_prior: float = 1e-2) -> Editor:
    """UltraEdit as its released code runs it: lifelong diagonal LN with the ddof=1 merge, ridge ``α = 1``.

    ``key_metric="second_moment"`` (an lnjax extension, not in the papers; docs/method.md §13) penalises the
    shift in the metric of the keys' lifelong second moment, ``ΔW = (KᵀK + αA)⁻¹KᵀV`` with
    ``A = E[kkᵀ] + key_prior·mean(diag)·I`` over every key seen so far, so a turn changes the outputs of earlier
    keys as little as the edits allow; ``key_metric="diagonal"`` uses only the diagonal of ``A`` (no extra state,
    affordable for very wide keys such as a memory layer's).
    """
    return ln_editor(LNConfig(lr=lr, alpha=alpha, normalization="lifelong", variance=variance, pooling=pooling,
                              solve_method=solve_method, key_metric=key_metric, key_prior=key_prior))


def stableedit(lr: float = 1e-6, alpha: float = 10.0, *, whiten: bool = True,
               variance: str = "exact", pooling: str = "shape", eps0: float = 0.0, nu0: Union[float, str] = 0.0,
               whiten_in_warmup: bool = False, eig_floor: float = 1e-6, solve_method: str = "auto",
               key_metric: str = "identity", key_prior: float = 1e-2, whitening: str = "eigh") -> Editor:
    """StableEdit as its released code runs it: lifelong LN (ddof=0 merge), full ZCA whitening of the value
    gradients once ``n > d_out + 1`` (diagonal before that and during warm-up), ridge ``α = 10``.

    The paper's Algorithm-1 reading: ``eps0 > 0`` (prior scatter ``ε0·I``), ``nu0`` prior degrees of freedom
    (a number, or ``"min"`` for ``d_out + 2``, the least that makes the estimate defined from the first row),
    ``pooling="target"``, ``whiten_in_warmup=True`` — see ``stableedit_algorithm1``. ``key_metric`` and
    ``key_prior``: the key-preconditioned ridge, as in ``ultraedit``. ``whitening``: how the ZCA matrix is
    computed (``lnjax.core.ln.whitening_matrix``): ``"eigh"``, the published eigendecomposition, or
    ``"newton_schulz"``, matrix products only (for accelerators, where one large eigendecomposition per turn
    costs more than the rest of the turn; BUILD.md, Performance).
    """
    return ln_editor(LNConfig(lr=lr, alpha=alpha, normalization="lifelong", variance=variance, pooling=pooling,
                              whiten=whiten, whiten_in_warmup=whiten_in_warmup, eps0=eps0, nu0=nu0,
                              eig_floor=eig_floor, solve_method=solve_method, key_metric=key_metric,
                              key_prior=key_prior, whitening=whitening))


def stableedit_algorithm1(lr: float = 1e-6,
                          alpha: float = 10.0, *, eps0: float = 1e-3,
                          solve_method: str = "auto") -> Editor:
    """The paper's Algorithm 1 as we read it: Normal-inverse-Wishart estimate with prior ``Ψ0 = ε0·I`` and
    ``ν0 = d_out + 2`` (so whitening is defined from the first turn), per-layer statistics, whitening in both
    phases."""
    return stableedit(lr, alpha, eps0=eps0, nu0="min", pooling="target", whiten_in_warmup=True,
                      solve_method=solve_method)


def no_normalization(lr: float = 1e-6, alpha: float = 1.0, *,
                     solve_method: str = "auto", key_metric: str = "identity", key_prior: float = 1e-2) -> Editor:
    """Ablation: raw keys and value gradients in the same formula ``V = -lr ||k||² g``. No statistics, unless
    ``key_metric="second_moment"`` (then only the keys' second moment is kept, for the ridge metric)."""
    return ln_editor(LNConfig(lr=lr, alpha=alpha, normalization="none", solve_method=solve_method,
                              key_metric=key_metric, key_prior=key_prior))


def per_turn_normalization(lr: float = 1e-6,
                           alpha: float = 1.0, *, variance: str = "exact",
                           pooling: str = "shape", solve_method: str = "auto") -> Editor:
    """Ablation: diagonal normalization with statistics of the current turn only (reset every turn)."""
    return ln_editor(LNConfig(lr=lr, alpha=alpha, normalization="per_turn", variance=variance, pooling=pooling,
                              solve_method=solve_method))


REGISTRY = {
    "ultraedit": ultraedit,
    "stableedit": stableedit,
    "stableedit_algorithm1": stableedit_algorithm1,
    "no_normalization": no_normalization,
    "per_turn_normalization": per_turn_normalization,
    "ft": _ft,
    "memit": memit,
    "alphaedit": alphaedit,
    **_META_TRAINED,   # rledit, malmen, mend and their *_no_normalization ablations (lnjax.editors.hypernet)
}


def get(name: str, **kwargs) -> Editor:
    """Editor by registry name (``ultraedit``, ``stableedit``, ``rledit``, ...), with keyword overrides."""
    if name not in REGISTRY:
        raise ValueError(f"unknown editor {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)
