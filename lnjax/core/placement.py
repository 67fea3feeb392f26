"""Arrays between the host and devices when a run spans several processes (``jax.distributed``).

In a multi-process run an array may be split over devices of other processes: it can neither be read whole by
``np.asarray`` nor moved from one process's devices to another's. Every process holds the same host value, so
``put`` builds each process's own shards from it, and ``to_host`` reads an array back whole on every process
(gathering the shards of others when it is not replicated). In a single process both are ``device_put`` and
``np.asarray``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def put(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x`` (an array or host value, the same on every process) placed with ``sharding``."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(to_host(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(tree: Any) -> Any:
    """``tree`` with every leaf as a NumPy array of its full value, on every process."""

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(get, tree)


def local_sharding() -> jax.sharding.Sharding:
    """This process's first device: where a process-local array (a loaded model, say) goes, since a
    checkpoint's recorded device (``cpu:0``, ``cuda:0``) may belong to another process."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
