"""Benchmark timing for the experiment scripts (one home for how lnjax times a compiled call)."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np


def median_seconds(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` (its result awaited with ``jax.block_until_ready``).

    ``warmup``: one untimed call first, so compilation is not counted. ``repeats=0``: a single timed call,
    compilation included (for sizes where a call takes minutes)."""
    if repeats == 0:
        t = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t
    if warmup:
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))
