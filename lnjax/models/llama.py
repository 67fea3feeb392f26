"""Llama-family decoders (Llama 2/3/3.1, Mistral, Qwen2/2.5): RMSNorm, GQA, rotary, SwiGLU MLP.

Parameters mirror HF module paths: ``params["model"]["layers"][i]["mlp"]["down_proj"]["kernel"]`` (in, out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .layers import (ACTIVATIONS, attend, attention_bias, block_output, linear, rms_norm, rope_frequencies,
                     rotate_half)


def _proj(d_in: int, d_out: int, bias: bool) -> dict:
    return {"kernel": (d_in, d_out), **({"bias": (d_out,)} if bias else {})}


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of parameter shapes (tuples) for ``cfg``."""
    d, hd = cfg.d_model, cfg.hd
    layer = {
        "input_layernorm": {"scale": (d,)},
        "self_attn": {
            "q_proj": _proj(d, cfg.n_heads * hd, cfg.qkv_bias),
            "k_proj": _proj(d, cfg.kv_heads * hd, cfg.qkv_bias),
            "v_proj": _proj(d, cfg.kv_heads * hd, cfg.qkv_bias),
            "o_proj": _proj(cfg.n_heads * hd, d, cfg.o_bias),
        },
        "post_attention_layernorm": {"scale": (d,)},
        "mlp": {
            "gate_proj": _proj(d, cfg.d_ff, cfg.mlp_bias),
            "up_proj": _proj(d, cfg.d_ff, cfg.mlp_bias),
            "down_proj": _proj(cfg.d_ff, d, cfg.mlp_bias),
        },
    }
    tree = {"model": {"embed_tokens": {"embedding": (cfg.vocab_size, d)},
                      "layers": [layer for _ in range(cfg.n_layers)],
                      "norm": {"scale": (d,)}}}
    if not cfg.tie_embeddings:
        tree["lm_head"] = {"kernel": (d, cfg.vocab_size)}
    return tree


def hidden_states(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final normalized hidden states [B, L, d_model] for ids/mask [B, L]."""
    B, L = input_ids.shape
    hd = cfg.hd
    m = params["model"]
    h = m["embed_tokens"]["embedding"][input_ids]
    positions = jnp.arange(L)
    inv_freq = rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling_dict())
    allowed = attention_bias(attention_mask, cfg.sliding_window)
    act = ACTIVATIONS[cfg.activation]
    for layer in m["layers"]:
        x = rms_norm(h, layer["input_layernorm"], cfg.norm_eps)
        a = layer["self_attn"]
        q = linear(x, a["q_proj"]).reshape(B, L, cfg.n_heads, hd)
        k = linear(x, a["k_proj"]).reshape(B, L, cfg.kv_heads, hd)
        v = linear(x, a["v_proj"]).reshape(B, L, cfg.kv_heads, hd)
        q = rotate_half(q, positions, inv_freq)
        k = rotate_half(k, positions, inv_freq)
        h = h + linear(attend(q, k, v, allowed, hd ** -0.5), a["o_proj"])
        x = rms_norm(h, layer["post_attention_layernorm"], cfg.norm_eps)
        f = layer["mlp"]
        mlp_out = linear(act(linear(x, f["gate_proj"])) * linear(x, f["up_proj"]), f["down_proj"])
        h = block_output(h + mlp_out, layer)
    return rms_norm(h, m["norm"], cfg.norm_eps)


def apply(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [B, L, vocab] float32 for ids/mask [B, L]."""
    h = hidden_states(params, input_ids, attention_mask, cfg)
    if cfg.tie_embeddings:
        return (h @ params["model"]["embed_tokens"]["embedding"].T).astype(jnp.float32)
    return linear(h, params["lm_head"]).astype(jnp.float32)
