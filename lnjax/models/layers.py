"""Building blocks shared by the decoders: linear maps, norms, rotary embeddings, attention.

Every function is pure over arrays and nested-dict parameters. Kernels are ``(in, out)``. ``linear`` applies its
kernel with ``x @ kernel`` so that ``lnjax.models.probe`` can stand a tap in for an edited kernel (see ``probe.Tap``).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp


def linear(x: jax.Array, p: dict) -> jax.Array:
    """``x @ p["kernel"] (+ p["bias"])`` for x [..., in] → [..., out]."""
    y = x @ p["kernel"]
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def block_output(h: jax.Array, layer: dict) -> jax.Array:
    """The residual stream ``h`` [B, L, d_model] after a block, passed through ``layer["residual"]`` when a caller
    has put a function there (``lnjax.editors.locate`` reads and shifts block outputs this way); otherwise ``h``."""
    hook = layer.get("residual")
    return h if hook is None else hook(h)


def keep_topk(x: jax.Array, k: int) -> jax.Array:
    """``x`` [..., d] with all but its ``k`` largest-magnitude entries (per row) set to zero; ``k`` = 0 keeps all.

    Ties at the k-th magnitude keep every tied entry. Gradients flow through the kept entries only.
    """
    if not k:
        return x
    kth = jax.lax.top_k(jnp.abs(x), k)[0][..., -1:]
    return jnp.where(jnp.abs(x) >= kth, x, jnp.zeros_like(x))


def anchored(input_ids: jax.Array, anchor: int, offsets: int) -> Optional[tuple]:
    """Where an anchored memory reads (``ModelConfig.memory_anchor``), for ids [B, L]: ``(source [B, L] int32,
    offset one-hot [B, L, offsets] bool)`` — the latest position at or before each one holding ``anchor`` (0
    where there is none) and the distance to it, all-false where there is no anchor or it lies ``offsets`` or
    more positions back. None when ``anchor`` < 0 (the memory reads at each position itself)."""
    if anchor < 0:
        return None
    pos = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
    last = jax.lax.cummax(jnp.where(input_ids == anchor, pos, -1), axis=input_ids.ndim - 1)
    hot = ((pos - last)[..., None] == jnp.arange(offsets)) & (last >= 0)[..., None]
    return jnp.maximum(last, 0), hot


def memory_read(x: jax.Array, memory: dict, threshold: float, code: str = "zscore",
                anchor: Optional[tuple] = None, winner: bool = False) -> jax.Array:
    """A sparse key-value memory read; x [..., d] → [..., d] (x [B, L, d] when ``anchor`` is given).

    ``code="cosine"``: the input is whitened, ``u = in_proj(x)``, and a slot fires when the cosine of ``u`` with
    its key column (``key_proj`` holds unit columns) exceeds ``threshold``; the code ``relu(cos - t) / (1 - t)``
    lies in [0, 1], 1 for an input pointing exactly at the slot. Slots keyed by the facts a model knows give
    every fact its own slot (experiments/grow_memory.py ``--slot-keys facts``). With ``anchor`` (from ``anchored``)
    the cosine code is computed from the input at each position's anchor and spread over one copy of the slots
    per offset from it (slot ``j * keys + i`` = key i at offset j); ``winner`` keeps only each token's
    best-matching key (a hard nearest-key read: a fact close to another reads its own slot alone).
    Otherwise (``"zscore"``):

    Slot scores ``s = x @ key_proj (+ bias)`` [..., slots] are z-scored over the token's own slots, so about the
    same small fraction fires for every token (for Gaussian scores, 0.6% at ``threshold`` 2.5) at the cost of two
    reductions, not a top-k. The code ``relu(z - threshold)`` is then shifted and scaled by its mean and standard
    deviation under a standard normal ``z``, so each slot's activation has about zero mean and unit variance over
    tokens: the code's raw values are already what lifelong normalization would make of them. Returns
    ``code @ value_proj``.
    """
    if code == "cosine":
        if anchor is not None:
            x = jnp.take_along_axis(x, anchor[0][..., None], axis=1)
        u = linear(x, memory["in_proj"]).astype(jnp.float32)
        cos = linear(u * jax.lax.rsqrt(jnp.sum(u * u, axis=-1, keepdims=True) + 1e-12), memory["key_proj"])
        if winner and isinstance(memory["value_proj"]["kernel"], jax.Array):
            return _winner_gather(cos, threshold, memory["value_proj"], anchor, x.dtype)
        c = jax.nn.relu(cos - threshold) / (1.0 - threshold)
        if winner:
            c = jnp.where(cos >= jnp.max(cos, axis=-1, keepdims=True), c, 0.0)
        if anchor is not None:
            c = (anchor[1][..., :, None] * c[..., None, :]).reshape(*c.shape[:-1], -1)
        return linear(c.astype(x.dtype), memory["value_proj"])
    s = linear(x, memory["key_proj"])
    z = (s - jnp.mean(s, axis=-1, keepdims=True)) * jax.lax.rsqrt(jnp.var(s, axis=-1, keepdims=True) + 1e-6)
    mean, std = _relu_moments(threshold)
    return linear((jax.nn.relu(z - threshold) - mean) / std, memory["value_proj"])


def _winner_gather(cos: jax.Array, threshold: float, value_proj: dict, anchor: Optional[tuple],
                   dtype) -> jax.Array:
    """The winner-take-all read as a gather, cos [..., keys] → [..., d]: the best key's value row (at each
    offset of an anchored read) times its code — what ``code @ value_proj`` gives when the code has one non-zero
    per offset, without the [tokens, slots] product (most of a forward pass's cost with one slot per fact). An
    exact tie between two keys (two identical keys) reads the first of them where the product would sum both.
    A probed kernel (the probe's ``Tap``, which must see the dense code) takes the product instead."""
    kernel = value_proj["kernel"]
    best = jnp.argmax(cos, axis=-1)
    val = jax.nn.relu(jnp.max(cos, axis=-1) - threshold) / (1.0 - threshold)
    out_dtype = jnp.result_type(dtype, kernel.dtype)
    if anchor is None:
        y = val[..., None].astype(out_dtype) * kernel[best].astype(out_dtype)
    else:
        hot = anchor[1]                                             # [B, L, offsets]
        rows = jnp.arange(hot.shape[-1]) * cos.shape[-1] + best[..., None]
        w = (hot * val[..., None]).astype(out_dtype)
        y = jnp.einsum("...o,...od->...d", w, kernel[rows].astype(out_dtype))
    if "bias" in value_proj:
        y = y + value_proj["bias"].astype(y.dtype)
    return y


def _relu_moments(t: float) -> tuple[float, float]:
    """Mean and standard deviation of ``relu(Z - t)`` for a standard normal Z."""
    pdf = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(t / math.sqrt(2))
    mean = pdf - t * tail
    second = (1 + t * t) * tail - t * pdf
    return mean, math.sqrt(second - mean * mean)


def rms_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back, as HF Llama/Mistral/Qwen2 do; x [..., d]."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return p["scale"] * xf.astype(x.dtype)


def layer_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    """LayerNorm with scale and bias, statistics in float32; x [..., d]."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GPT-2's ``gelu_new``: the tanh approximation of GELU."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> jax.Array:
    """Inverse frequencies (head_dim/2,) float32, with ``linear`` or Llama-3.1 (``llama3``) scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported")


def rotate_half(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout (Llama family); x [B, L, H, hd], positions [L]."""
    ang = positions[:, None].astype(jnp.float32) * inv_freq[None, :]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[None, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[None, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def rotate_interleaved(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float = 10000.0) -> jax.Array:
    """GPT-J's rotary embedding: interleaved pairs on the first ``rotary_dim`` dims of each head."""
    inv = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    ang = positions[:, None].astype(jnp.float32) * inv[None, :]
    sin = jnp.repeat(jnp.sin(ang), 2, axis=-1)[None, :, None, :].astype(x.dtype)
    cos = jnp.repeat(jnp.cos(ang), 2, axis=-1)[None, :, None, :].astype(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = jnp.stack([-rot[..., 1::2], rot[..., ::2]], axis=-1).reshape(rot.shape)
    return jnp.concatenate([rot * cos + pairs * sin, rest], axis=-1)


def attention_bias(attention_mask: jax.Array, sliding_window: Optional[int] = None) -> jax.Array:
    """Boolean [B, 1, L, L]: query i may see key j iff j <= i, key j is real, and i - j < window."""
    L = attention_mask.shape[1]
    i = jnp.arange(L)[:, None]
    j = jnp.arange(L)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    return allowed[None, None] & attention_mask.astype(bool)[:, None, None, :]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
           upcast: bool = False) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    q [B, L, H, hd], k/v [B, L, Hkv, hd], allowed [B, 1, L, L] → [B, L, H*hd]. Scores and softmax in float32;
    ``upcast`` also computes the score matmul in float32 (GPT-J).
    """
    B, L, H, hd = q.shape
    groups = H // k.shape[2]
    if groups > 1:
        k = jnp.repeat(k, groups, axis=2)
        v = jnp.repeat(v, groups, axis=2)
    if upcast:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    else:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = jnp.where(allowed, scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(B, L, H * v.shape[-1])
