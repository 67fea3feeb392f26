"""Parameter-tree utilities, the one home of each: HF module paths into nested dicts (get, set, list), the
split of a model's parameters into frozen weights and edited kernels and their join, and a pytree digest.

Paths are HF module paths (``"model.layers.3.mlp.down_proj"``); a numeric part indexes a list or an int key.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np


def split_path(path: str) -> list:
    """``"model.layers.3.mlp.down_proj"`` → ``["model", "layers", 3, "mlp", "down_proj"]``."""
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def get_module(params: Any, path: str) -> Any:
    """The sub-dict of ``params`` at HF module path ``path``; KeyError naming the missing part."""
    node = params
    for i, part in enumerate(split_path(path)):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            raise KeyError(f"module path {path!r}: no {'.'.join(map(str, split_path(path)[:i + 1]))!r} "
                           "in the parameters") from None
    return node


def leaf_paths(tree: Any, is_leaf: Optional[Callable] = None) -> list[tuple[str, str, Any]]:
    """``(module path, leaf name, value)`` of every leaf of a nested params-like tree, in flattening order
    (``("model.layers.0.mlp.down_proj", "kernel", x)``); ``is_leaf`` as in ``jax.tree_util``."""
    out = []
    for path, value in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        parts = [str(getattr(p, "key", getattr(p, "idx", None))) for p in path]
        out.append((".".join(parts[:-1]), parts[-1], value))
    return out


def with_module_leaf(params: Any, path: str, leaf: str, value: Any) -> Any:
    """A copy of ``params`` with ``params[path][leaf] = value`` (only the containers on the path are copied)."""
    parts = split_path(path) + [leaf]

    def rec(node, i):
        if i == len(parts):
            return value
        part = parts[i]
        if isinstance(node, list):
            new = list(node)
        else:
            new = dict(node)
        new[part] = rec(node[part], i + 1)
        return new

    get_module(params, path)  # raises a clear error first
    return rec(params, 0)


def frozen_and_kernels(params, targets: Sequence[str]):
    """Split ``params`` into (frozen params with target kernels removed, name -> kernel)."""
    kernels = {t: get_module(params, t)["kernel"] for t in targets}
    frozen = params
    for t in targets:
        frozen = with_module_leaf(frozen, t, "kernel", None)
    return frozen, kernels


def join(frozen, kernels: dict):
    """Full parameters from frozen params and edited kernels."""
    params = frozen
    for t, k in kernels.items():
        params = with_module_leaf(params, t, "kernel", k)
    return params


def digest(tree) -> str:
    """SHA-256 (hex) of a pytree's leaves: each leaf's shape, dtype and bytes, in tree order. Host-side (reads
    every leaf to NumPy); the fingerprint of data, models and statistics in checkpoints and caches."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
