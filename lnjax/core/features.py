"""The data an editor consumes: one turn's keys and value gradients for one target module."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Features:
    """One turn's features of one target module.

    ``keys`` [N, d_in]: the module's input rows at supervised positions; ``value_grads`` [N, d_out]:
    d(mini-batch loss)/d(module output) at the same rows; ``mask`` [N] bool: which rows are real (padding rows
    take no part anywhere); ``segment`` [N] int: the reference mini-batch of each row, so statistics are merged
    per mini-batch as the reference does. ``num_segments`` (static) bounds ``segment``; 0 means "infer it from
    the concrete array" (not possible under ``jit``).
    """

    keys: jax.Array
    value_grads: jax.Array
    mask: Optional[jax.Array] = None
    segment: Optional[jax.Array] = None
    num_segments: int = struct.field(pytree_node=False, default=0)


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer inside ``jit``/``scan``)."""
    return not isinstance(x, jax.core.Tracer)


def resolved(name: str, f: Features) -> tuple[jax.Array, jax.Array, int]:
    """``(mask [N] bool, segment [N] int32, num_segments)`` of ``f`` with defaults filled in and shapes checked.

    Raises ValueError naming target ``name`` when a shape is off or ``num_segments`` cannot be known.
    """
    if f.keys.ndim != 2 or f.value_grads.ndim != 2:
        raise ValueError(f"target {name!r}: keys {tuple(f.keys.shape)} and value_grads "
                         f"{tuple(f.value_grads.shape)} must both be 2-D [rows, width]")
    n = f.keys.shape[0]
    if f.value_grads.shape[0] != n:
        raise ValueError(f"target {name!r}: keys have {n} rows but value_grads have {f.value_grads.shape[0]}")
    mask = jnp.ones((n,), bool) if f.mask is None else f.mask
    if mask.shape != (n,):
        raise ValueError(f"target {name!r}: mask has shape {tuple(mask.shape)}, expected ({n},)")
    if f.segment is None:
        return mask.astype(bool), jnp.zeros((n,), jnp.int32), 1
    if f.segment.shape != (n,):
        raise ValueError(f"target {name!r}: segment has shape {tuple(f.segment.shape)}, expected ({n},)")
    num = f.num_segments
    if num <= 0:
        if not is_concrete(f.segment):
            raise ValueError(f"target {name!r}: pass Features(num_segments=...) when segment is traced")
        seg = np.asarray(f.segment)
        if seg.size and seg.min() < 0:
            raise ValueError(f"target {name!r}: segment ids must be >= 0")
        num = int(seg.max()) + 1 if seg.size else 1
    return mask.astype(bool), f.segment.astype(jnp.int32), num
