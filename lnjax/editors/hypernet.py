"""Hypernetwork editors (lifelong MALMEN, RLEdit, MEND): the shared ``RLEditNet``, its LN statistics, the
per-turn shift and the meta-gradient, as pure functions over pytrees.

- The net (one per shape group, i.e. all targets sharing ``(d_in, d_out)``; ``m`` is a target's index in its
  group, in target order) maps one row ``z = [k, g]`` of width ``size = d_in + d_out`` to pseudo-features
  ``[k̃, g̃]``: ``y = standardize(z)``, then per block ``y ← y + scale_m ⊙ relu(y A B + bias) + shift_m``.
  ``A`` (size × rank) is i.i.d. N(0, 1) with no fan-in scaling, ``B`` and ``bias`` are zeros, ``scale_m = 1``,
  ``shift_m = 0``: at initialisation the net is exactly the LN standardization. Per module it also holds the
  trainable edit learning rate ``lr[m]`` (initially ``NetConfig.lr``) and log-ridge ``lamda[m]`` (initially 0).
- The statistics are ``lnjax.core.ln`` statistics of ``[k, g]`` pooled over the group, updated on every turn before
  the shift is computed (a turn is normalized with statistics that include it), during meta-training and
  evaluation alike, never reset in between (``normalization="lifelong"``, the released code). The reference
  merge is ``variance="ddof1"`` (UltraEdit/RLEdit/MALMEN codebases); ``"exact"`` is StableEdit's.
- The shift of one target (no gradient in the reference): ridge form (MALMEN, RLEdit)
  ``c_i = -lr[m] ⟨k_i, k̃_i⟩`` (raw key with pseudo-key), ``D = c ⊙ G̃``,
  ``ΔW = (KᵀK + e^{lamda[m]} I)⁻¹ Kᵀ D`` (solved in the dual form when cheaper); MEND form
  ``ΔW = -lr[m] K̃ᵀ G̃``.
- The meta-gradient is ``jax.vjp`` of θ ↦ ΔW(θ) with cotangent ``G_W = ∂L/∂W`` at ``W + ΔW`` (statistics and raw
  features are constants), which equals the reference's decoupled closed forms ``∂L/∂D = K S⁻¹ G_W`` and
  ``∂L/∂lamda = -e^{lamda} ⟨S⁻¹ G_W, ΔW⟩`` with ``S = KᵀK + e^{lamda} I``.

``normalization`` (the Fig. 1a ablation has no switch in the released code; there are three readings):
``"lifelong"`` (default, the released behaviour), ``"none"`` (identity normalizer in training and evaluation;
statistics still accumulate, for diagnostics only), ``"per_turn"`` (statistics of the current turn only),
``"frozen_after_train"`` (statistics accumulate in meta-training, frozen in evaluation, as original MEND). The
editors' ``reset_at_eval=True`` zeroes the statistics between meta-training and evaluation (the never-called
``reset_hypernet_normalizers`` of the released code).

Deliberate differences from the released code, all numerically inert or documented: rows are processed all at
once with a mask (the reference's zero-padded chunks of 128 rows have no numerical effect); statistics and
solves run in float32 with compensated sums; a one-row mini-batch adds zero variance under ``ddof1`` where the
reference produces NaN (see ``lnjax.core.ln``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from lnjax.core import ln
from lnjax.core.protocol import (Editor, EditorState, check_features, fold_group_features, group_members,
                                 reject_nonfinite, target_shapes)
from lnjax.core.features import Features
from lnjax.core.turns import REFERENCE_MINIBATCH_SIZE
from lnjax.models.probe import TurnBatch, turn_features
from lnjax.core.solve import METHODS, ridge_shift

KINDS = ("ridge", "mend")
NORMALIZATIONS = ("lifelong", "none", "per_turn", "frozen_after_train")
TOKENS = ("ans", "all")
PHASES = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """What defines a hypernetwork editor's net and shift.

    ``kind``: ``"ridge"`` (MALMEN, RLEdit) or ``"mend"``; ``rank``, ``n_blocks``: the net's low-rank blocks
    (published: 1024 and 4 for MALMEN/RLEdit, 1920 and 2 for MEND); ``lr``: initial per-module edit learning
    rate (1e-6); ``normalization``: see the module docstring; ``variance``: the statistics' merge (``"ddof1"``
    as the released UltraEdit/RLEdit/MALMEN code, ``"exact"`` as StableEdit's); ``cap_rank``: use
    ``min(rank, size)`` (an option for small models; the reference never caps); ``token``: feature rows at
    answer positions (``"ans"``, MALMEN/RLEdit) or at every attended position (``"all"``, MEND);
    ``solve_method``: ``lnjax.core.solve`` form of the ridge; ``seed``: the initialisation of ``A``.
    """

    kind: str = "ridge"
    rank: int = 1024
    n_blocks: int = 4
    lr: float = 1e-6
    normalization: str = "lifelong"
    variance: str = "ddof1"
    cap_rank: bool = False
    token: str = "ans"
    solve_method: str = "auto"
    seed: int = 0

    def __post_init__(self):
        for field, allowed in (("kind", KINDS), ("normalization", NORMALIZATIONS), ("token", TOKENS),
                               ("variance", ln.VARIANCE_MODES), ("solve_method", METHODS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.rank < 1 or self.n_blocks < 0:
            raise ValueError(f"rank must be >= 1 and n_blocks >= 0, got rank={self.rank}, n_blocks={self.n_blocks}")

    def block_rank(self, size: int) -> int:
        """The rank of ``A``/``B`` for a group of width ``size``."""
        return min(self.rank, size) if self.cap_rank else self.rank

    @property
    def normalize(self) -> bool:
        return self.normalization != "none"


def target_layout(shapes: Mapping[str, tuple]) -> tuple:
    """``(name, d_in, d_out, group)`` per target in the given order; the group is the shape ``"d_inxd_out"``."""
    return tuple((name, d_in, d_out, f"{d_in}x{d_out}") for name, d_in, d_out in target_shapes(shapes))


def module_indices(targets: tuple) -> dict[str, tuple[str, int]]:
    """Target name -> (group, index ``m`` of the target inside its group)."""
    return {n: (g, m) for g, names in group_members(targets).items() for m, n in enumerate(names)}


def init_theta(cfg: NetConfig, targets: tuple, key: Optional[jax.Array] = None) -> dict:
    """Fresh net parameters, group -> {``A`` [n_blocks, size, rank], ``B`` [n_blocks, rank, size], ``bias``
    [n_blocks, size], ``scale``/``shift`` [n_blocks, n_modules, size], ``lr``/``lamda`` [n_modules]} (float32)."""
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    theta = {}
    members = group_members(targets)
    shape_of = {g: (d_in, d_out) for _, d_in, d_out, g in targets}
    for i, group in enumerate(sorted(members)):
        size = sum(shape_of[group])
        n_mod, rank, nb = len(members[group]), cfg.block_rank(size), cfg.n_blocks
        theta[group] = {
            "A": jax.random.normal(jax.random.fold_in(key, i), (nb, size, rank), jnp.float32),
            "B": jnp.zeros((nb, rank, size), jnp.float32),
            "bias": jnp.zeros((nb, size), jnp.float32),
            "scale": jnp.ones((nb, n_mod, size), jnp.float32),
            "shift": jnp.zeros((nb, n_mod, size), jnp.float32),
            "lr": jnp.full((n_mod,), cfg.lr, jnp.float32),
            "lamda": jnp.zeros((n_mod,), jnp.float32),
        }
    return theta


def init_stats(targets: tuple) -> dict:
    """Empty statistics, group -> ``ln.LNStats`` of width ``d_in + d_out``."""
    stats = {}
    for _, d_in, d_out, group in targets:
        stats.setdefault(group, ln.init(d_in, d_out))
    return stats


def clamp0(x: jax.Array) -> jax.Array:
    """``max(x, 0)`` with the reference's gradient: torch's ``clamp(min=0)`` passes the gradient where
    ``x >= 0``, so it is 1 at exactly 0 (``relu`` and ``jnp.maximum`` give 0 and 1/2). At initialisation every
    pre-activation is exactly 0 (``B = 0``, ``bias = 0``), so this decides whether ``A``, ``B`` and ``bias``
    receive any gradient at all."""
    return jnp.where(x >= 0.0, x, 0.0)


def net_forward(p: dict, y: jax.Array, m: int) -> jax.Array:
    """The residual blocks of one group's net ``p`` on rows ``y`` [N, size] for module ``m`` → [N, size]."""
    for b in range(p["A"].shape[0]):
        x = clamp0((y @ p["A"][b]) @ p["B"][b] + p["bias"][b])
        y = y + p["scale"][b, m] * x + p["shift"][b, m]
    return y


def pseudo_features(p: dict, stats: ln.LNStats, k: jax.Array, g: jax.Array, m: int,
                    normalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(k̃ [N, d_in], g̃ [N, d_out])``: the net on ``[k, g]``, standardized first when ``normalize``."""
    z = jnp.concatenate([k, g], axis=1).astype(jnp.float32)
    y = ln.standardize(stats, z) if normalize else z
    y = net_forward(p, y, m)
    return y[:, :k.shape[1]], y[:, k.shape[1]:]


def module_shift(cfg: NetConfig, p: dict, stats: ln.LNStats, k: jax.Array, g: jax.Array, mask: jax.Array,
                 m: int) -> jax.Array:
    """ΔW (d_in, d_out) of module ``m`` from raw keys ``k`` [N, d_in] and value gradients ``g`` [N, d_out]
    (rows with ``mask`` False take no part): the ridge form or MEND's ``-lr K̃ᵀG̃`` (module docstring)."""
    k = k.astype(jnp.float32)
    w = mask.astype(jnp.float32)
    kt, gt = pseudo_features(p, stats, k, g, m, cfg.normalize)
    if cfg.kind == "mend":
        return -p["lr"][m] * ((kt * w[:, None]).T @ gt)
    coef = -p["lr"][m] * jnp.sum(k * kt, axis=1) * w
    return ridge_shift(k, coef[:, None] * gt, jnp.exp(p["lamda"][m]), mask, cfg.solve_method)


def shifts(cfg: NetConfig, theta: dict, stats: dict, features: Mapping[str, Features], targets: tuple) -> dict:
    """ΔW per target (name -> (d_in, d_out) float32) for one turn's ``features`` under ``theta`` and
    ``stats`` (the statistics already including the turn)."""
    out = {}
    for name, (group, m) in module_indices(targets).items():
        f = features[name]
        mask = jnp.ones(f.keys.shape[:1], bool) if f.mask is None else f.mask
        out[name] = module_shift(cfg, theta[group], stats[group], f.keys, f.value_grads, mask, m)
    return out


def fold_turn(cfg: NetConfig, stats: dict, features: Mapping[str, Features], rows: dict, targets: tuple,
              phase: str) -> dict:
    """The statistics after one turn's features under ``cfg.normalization`` in ``phase`` (``"train"`` or
    ``"eval"``): merged per (mini-batch, target) as the reference caches them; reset first for ``per_turn``;
    left as they are in evaluation for ``frozen_after_train``."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if cfg.normalization == "frozen_after_train" and phase == "eval":
        return stats
    out = {}
    for group, names in group_members(targets).items():
        base = stats[group]
        if cfg.normalization == "per_turn":
            base = ln.init(base.d_in, base.d_out)
        out[group] = fold_group_features(base, features, rows, names, cfg.variance)
    return out


def shift_vjp(cfg: NetConfig, theta: dict, stats: dict, features: Mapping[str, Features],
              targets: tuple) -> tuple[dict, Callable[[dict], dict]]:
    """``(ΔW, pullback)``: the turn's shifts and ``pullback(grad_w) -> ∂L/∂θ``, the vector-Jacobian product of
    θ ↦ ΔW(θ) with cotangent ``grad_w`` (name -> ``∂L/∂W`` (d_in, d_out) at ``W + ΔW``, taken in float32);
    statistics and raw features are constants. Meta-training (``lnjax.engine.meta``) needs ΔW before it can
    compute ``grad_w``, hence the two steps; ``meta_gradient`` is both at once."""
    deltas, vjp = jax.vjp(lambda th: shifts(cfg, th, stats, features, targets), theta)

    def pullback(grad_w: dict) -> dict:
        (g_theta,) = vjp({n: grad_w[n].astype(jnp.float32) for n in deltas})
        return g_theta

    return deltas, pullback


def meta_gradient(cfg: NetConfig, theta: dict, stats: dict, features: Mapping[str, Features], targets: tuple,
                  grad_w: dict) -> tuple[dict, dict]:
    """``(ΔW, ∂L/∂θ)``: the turn's shifts and the vector-Jacobian product of θ ↦ ΔW(θ) with cotangent
    ``grad_w`` (name -> ``∂L/∂W`` (d_in, d_out) at ``W + ΔW``); ``shift_vjp`` in one call."""
    deltas, pullback = shift_vjp(cfg, theta, stats, features, targets)
    return deltas, pullback(grad_w)


def summary(theta: dict) -> dict:
    """What meta-training learned, for logs: per group the learned ``lr`` and ``lamda`` per module and ``‖B‖``
    (Frobenius, all blocks) as Python floats."""
    return {g: {"lr": [float(x) for x in p["lr"]], "lamda": [float(x) for x in p["lamda"]],
                "B_norm": float(jnp.linalg.norm(p["B"]))} for g, p in theta.items()}


@struct.dataclass
class Trained:
    """A (meta-)trained hypernetwork: ``theta`` and ``stats`` (group -> ...), its ``config`` and ``targets``
    (static)."""

    theta: dict
    stats: dict
    config: NetConfig = struct.field(pytree_node=False)
    targets: tuple = struct.field(pytree_node=False)


def fresh(cfg: NetConfig, shapes: Mapping[str, tuple]) -> Trained:
    """An untrained hypernetwork (identity blocks, empty statistics) for targets of ``shapes``."""
    targets = target_layout(shapes)
    return Trained(theta=init_theta(cfg, targets), stats=init_stats(targets), config=cfg, targets=targets)


@struct.dataclass
class HypernetState(EditorState):
    """Evaluation state of a hypernetwork editor: an ``EditorState`` (LN ``stats`` per group, ``turns`` and
    ``rejected`` counters, static ``targets``) plus the frozen net parameters ``theta``."""

    theta: dict


def hypernet_editor(trained: Trained, *, reset_at_eval: bool = False, apply: Optional[Callable] = None,
                    minibatch_size: int = REFERENCE_MINIBATCH_SIZE) -> Editor:
    """The evaluation-time editor of a trained hypernetwork: θ frozen, statistics updated per
    ``trained.config.normalization`` in the ``"eval"`` phase, ``reset_at_eval`` starting from empty statistics.

    With ``token="ans"`` the editor consumes the engine's features (``needs={"features"}``). With ``token="all"``
    (MEND) it computes its own rows at every attended position from ``params`` and ``turn`` with ``apply``
    (``needs={"params", "turn"}``). A non-finite shift is rejected whole (``lnjax.core.protocol.reject_nonfinite``:
    zero deltas, state as before).
    """
    cfg = trained.config
    if cfg.token == "all" and apply is None:
        raise ValueError("token='all' editors compute their own features: pass apply=model.apply")

    def init(shapes: Mapping[str, tuple]) -> HypernetState:
        targets = target_layout(shapes)
        if targets != trained.targets:
            raise ValueError(f"the hypernetwork was trained for targets {list(trained.targets)}, "
                             f"the run edits {list(targets)}")
        stats = init_stats(targets) if reset_at_eval else trained.stats
        copy = lambda t: jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), t)
        return HypernetState(theta=copy(trained.theta), stats=copy(stats), turns=jnp.zeros((), jnp.int32),
                             rejected=jnp.zeros((), jnp.int32), targets=targets)

    def update(features: Optional[Mapping[str, Features]], state: HypernetState,
               warmup: Union[bool, jax.Array] = False, params: Any = None,
               turn: Any = None) -> tuple[dict, HypernetState]:
        del warmup  # the hypernetwork editors have no warm-up phase
        if cfg.token == "all":
            if params is None or turn is None:
                raise ValueError("this editor (token='all') needs the engine to pass params and turn")
            edit = turn.edit if hasattr(turn, "edit") else turn
            features, _, _ = turn_features(apply, params, state.target_names(), edit,
                                           minibatch_size=minibatch_size, positions="all")
        rows = check_features(features, state)
        stats = fold_turn(cfg, state.stats, features, rows, state.targets, "eval")
        deltas = shifts(cfg, state.theta, stats, features, state.targets)
        return deltas, state.replace(stats=stats)

    needs = frozenset({"params", "turn"}) if cfg.token == "all" else frozenset({"features"})
    return reject_nonfinite(Editor(init=init, update=update, config=cfg, needs=needs))


# The published configurations of the released code (the initial edit lr, 1e-6 for all three, is NetConfig.lr);
# normalization "none" is the Fig. 1a ablation.
FAMILIES = {
    "malmen": NetConfig(kind="ridge", rank=1024, n_blocks=4, token="ans"),
    "rledit": NetConfig(kind="ridge", rank=1024, n_blocks=4, token="ans"),
    "mend": NetConfig(kind="mend", rank=1920, n_blocks=2, token="all"),
}
ABLATION_SUFFIX = "_no_normalization"


def family_of(name: str) -> tuple[str, str]:
    """``(family, normalization)`` of a registry name: ``"rledit"`` -> (rledit, lifelong),
    ``"malmen_no_normalization"`` -> (malmen, none)."""
    base = name[:-len(ABLATION_SUFFIX)] if name.endswith(ABLATION_SUFFIX) else name
    if base not in FAMILIES:
        raise ValueError(f"unknown hypernetwork editor {name!r}; known: {sorted(REGISTRY)}")
    return base, ("none" if base != name else "lifelong")


def _factory(name: str) -> Callable[..., Editor]:
    family, normalization = family_of(name)

    def make(trained: Optional[Trained] = None, *, reset_at_eval: bool = False, apply: Optional[Callable] = None,
             minibatch_size: int = REFERENCE_MINIBATCH_SIZE, **other) -> Editor:
        if other:
            raise ValueError(f"{name}: options {sorted(other)} do not apply (lr and lamda are learned per module)")
        if trained is None:
            raise ValueError(f"{name} edits with a meta-trained hypernetwork: pass trained=... "
                             f"(lnjax.engine.meta.train or lnjax.app.train_editor.trained_editor)")
        cfg = trained.config
        if cfg.kind != FAMILIES[family].kind or (cfg.normalization == "none") != (normalization == "none"):
            raise ValueError(f"{name} needs a {FAMILIES[family].kind} net trained with normalization "
                             f"{'none' if normalization == 'none' else '!= none'}; got kind={cfg.kind!r}, "
                             f"normalization={cfg.normalization!r}")
        return hypernet_editor(trained, reset_at_eval=reset_at_eval, apply=apply, minibatch_size=minibatch_size)

    make.__name__ = name
    which = "no normalization: the Fig. 1a ablation" if normalization == "none" else "lifelong normalization"
    make.__doc__ = f"The {family} editor ({which}) of a meta-trained hypernetwork ``trained`` (``hypernet_editor``)."
    return make


REGISTRY = {n: _factory(n) for f in FAMILIES for n in (f, f + ABLATION_SUFFIX)}
