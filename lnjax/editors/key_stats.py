"""Second-moment statistics of edited modules' inputs (MEMIT's and AlphaEdit's ``C``; docs/method.md §14).

``C = (1/T) Σ_t k_t k_tᵀ`` is the **uncentered** second moment of a module's input ``k`` over every non-pad token
of a corpus (the released MEMIT code calls it "cov"). It is accumulated in float32 as a sum
and a token count, streamed over fixed-shape chunks, so a corpus of any size costs one compile.

Everything here is a pure function of a model's ``apply``, its parameters and a corpus. On the embedded world
the corpus is the world's pretraining text (``lnjax.world.world_model.world_corpus``), the analogue of Wikipedia
for a real model; never the edit records or evaluation probes. The disk cache of these statistics lives in
``lnjax.io.stats_cache``; a MEMIT-format ``.npz`` (``mom2.mom2``: sum of outer products, ``mom2.count``) can be
read instead (``read_memit_npz``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lnjax.models import get_module, with_module_leaf
from lnjax.core.turns import TurnBatch
from lnjax.models.probe import Tap

_HP = jax.lax.Precision.HIGHEST


@struct.dataclass
class KeyStats:
    """Streaming second moment of one module's input: ``mom2`` = Σ k kᵀ [d_in, d_in] float32 and ``count``
    (tokens, float32 so that large corpora do not overflow int32)."""

    mom2: jax.Array
    count: jax.Array

    def moment(self) -> jax.Array:
        """``C = mom2 / count`` [d_in, d_in] float32 (NaN when no token was seen)."""
        return self.mom2 / self.count


def init(d_in: int) -> KeyStats:
    """Empty statistics for a module with input width ``d_in``."""
    return KeyStats(mom2=jnp.zeros((d_in, d_in), jnp.float32), count=jnp.zeros((), jnp.float32))


def accumulate(stats: KeyStats, keys: jax.Array, mask: jax.Array) -> KeyStats:
    """Add the rows of ``keys`` [N, d_in] where ``mask`` [N] is true to ``stats``."""
    w = mask.astype(jnp.float32)
    k = keys.astype(jnp.float32) * w[:, None]
    return KeyStats(mom2=stats.mom2 + jnp.matmul(k.T, k, precision=_HP), count=stats.count + jnp.sum(w))


def tap_inputs(params, targets: Sequence[str], batch_shape: tuple, sink: dict):
    """``params`` with every target kernel replaced by a ``probe.Tap`` that records its input into ``sink``
    (adding nothing to the output); ``batch_shape`` is the (B, L) of the ids the model will see."""
    tapped = params
    for name in targets:
        kernel = get_module(params, name)["kernel"]
        zero = jnp.zeros(tuple(batch_shape) + (kernel.shape[1],), jnp.float32)
        tapped = with_module_leaf(tapped, name, "kernel", Tap(kernel, zero, sink, name))
    return tapped


def check_tapped(sink: dict, targets: Sequence[str]) -> None:
    """Raise naming the targets a forward pass never applied as ``x @ kernel``."""
    missing = [n for n in targets if n not in sink]
    if missing:
        raise ValueError(f"target(s) {missing} were never applied with `x @ kernel` by the model")


def module_inputs(apply: Callable, params, targets: Sequence[str], ids: jax.Array, mask: jax.Array) -> dict:
    """The inputs [B, L, d_in] of every target module (applied as ``x @ kernel``) for ids/mask [B, L]."""
    sink: dict = {}
    apply(tap_inputs(params, targets, ids.shape, sink), ids, mask)
    check_tapped(sink, targets)
    return sink


def collect(apply: Callable, params, targets: Sequence[str], corpus: TurnBatch, *, batch_size: int = 256,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Second-moment statistics {target: KeyStats} over every non-pad token (``attention_mask == 1``) of
    ``corpus`` ([n, L] arrays), in fixed chunks of ``batch_size`` sequences (the last padded with empty rows)."""
    targets = tuple(targets)
    ids_all, mask_all = np.asarray(corpus.input_ids), np.asarray(corpus.attention_mask)
    n, L = ids_all.shape

    @jax.jit
    def step(stats, params, ids, mask):
        inputs = module_inputs(apply, params, targets, ids, mask)
        flat = mask.reshape(-1).astype(bool)
        return {t: accumulate(stats[t], inputs[t].reshape(flat.shape[0], -1), flat) for t in targets}

    stats = {t: init(get_module(params, t)["kernel"].shape[0]) for t in targets}
    for start in range(0, n, batch_size):
        ids, mask = ids_all[start:start + batch_size], mask_all[start:start + batch_size]
        pad = batch_size - ids.shape[0]
        if pad:
            ids = np.concatenate([ids, np.zeros((pad, L), ids.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, L), mask.dtype)])
        stats = step(stats, params, jnp.asarray(ids), jnp.asarray(mask))
        if log is not None and (start // batch_size) % 50 == 0:
            log(f"key statistics: {min(start + batch_size, n)}/{n} sequences")
    return stats


def tokens(stats: Mapping[str, KeyStats]) -> int:
    """The token count of statistics (the same for every target collected together)."""
    counts = {int(np.asarray(s.count)) for s in stats.values()}
    return counts.pop() if len(counts) == 1 else max(counts)


def read_memit_npz(path: str) -> KeyStats:
    """Statistics from a MEMIT-format ``.npz`` (``mom2.mom2`` = Σ k kᵀ, ``mom2.count`` = tokens); a missing key
    or a non-square matrix raises ValueError naming the file and the field."""
    with np.load(path, allow_pickle=False) as z:
        for field in ("mom2.mom2", "mom2.count"):
            if field not in z.files:
                raise ValueError(f"{path}: field {field!r} missing (found {sorted(z.files)})")
        mom2, count = np.asarray(z["mom2.mom2"], np.float32), float(np.asarray(z["mom2.count"]))
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise ValueError(f"{path}: field 'mom2.mom2' has shape {mom2.shape}, expected a square matrix")
    if not count > 0:
        raise ValueError(f"{path}: field 'mom2.count' is {count}, expected a positive token count")
    return KeyStats(mom2=jnp.asarray(mom2), count=jnp.asarray(count, jnp.float32))
