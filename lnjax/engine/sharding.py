"""Device meshes for runs on several accelerators: parameters split over ``model``, edits over ``data``.

``edit_sequence(..., mesh=make_mesh("data=2,model=4"))`` places the frozen weights and edited kernels with
``param_sharding`` (each matrix split along its larger divisible dimension over ``model``, FSDP/tensor-parallel
style) and every turn's edits split over ``data``. XLA's partitioner then inserts the reductions: the per-turn
statistics become sums over all edits across devices, exactly what merging per-device ``lx.core.ln`` states gives.
Editor state is small and replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lnjax.core.placement import put

AXES = ("data", "model")


def make_mesh(spec: str) -> Mesh:
    """A mesh from ``"data=2,model=4"`` (axes absent from the spec get size 1); sizes must multiply to at most the
    number of devices."""
    sizes = {"data": 1, "model": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh spec {spec!r}: expected entries like data=2,model=4, got {part!r}")
        sizes[name] = int(value)
    n = sizes["data"] * sizes["model"]
    devices = jax.devices()
    if n > len(devices):
        raise ValueError(f"mesh {spec!r} needs {n} devices, {len(devices)} are available")
    return Mesh(np.asarray(devices[:n]).reshape(sizes["data"], sizes["model"]), AXES)


def _spec_for(shape: tuple, model_size: int) -> P:
    if len(shape) < 2 or model_size == 1:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % model_size == 0:
            return P(*[("model" if i == d else None) for i in range(len(shape))])
    return P()


def param_sharding(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of ``tree``: matrices split over ``model`` along their larger divisible dim."""
    m = mesh.shape["model"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _spec_for(tuple(np.shape(x)), m)), tree)


def shard_params(tree: Any, mesh: Mesh) -> Any:
    """``tree`` placed on ``mesh`` with ``param_sharding`` (``lnjax.core.placement.put``: also across processes)."""
    return jax.tree_util.tree_map(put, tree, param_sharding(tree, mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` replicated on every device of ``mesh``."""
    return jax.tree_util.tree_map(lambda x: put(x, NamedSharding(mesh, P())), tree)


def shard_turns(tree: Any, mesh: Mesh, axis: int = 1) -> Any:
    """Turn arrays ([K, E, L] ...) with the edit axis ``axis`` split over ``data`` (when divisible)."""
    d = mesh.shape["data"]

    def place(x):
        x = np.asarray(x)
        if x.ndim > axis and x.shape[axis] % d == 0 and d > 1:
            spec = [None] * x.ndim
            spec[axis] = "data"
            return put(x, NamedSharding(mesh, P(*spec)))
        return put(x, NamedSharding(mesh, P()))

    return jax.tree_util.tree_map(place, tree)
