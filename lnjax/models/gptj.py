"""GPT-J: one LayerNorm feeding attention and MLP in parallel, partial interleaved rotary, biased LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .layers import ACTIVATIONS, attend, attention_bias, block_output, layer_norm, linear, rotate_interleaved


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of parameter shapes for ``cfg``."""
    d = cfg.d_model
    ln = {"scale": (d,), "bias": (d,)}
    layer = {
        "ln_1": ln,
        "attn": {n: {"kernel": (d, d)} for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "mlp": {"fc_in": {"kernel": (d, cfg.d_ff), "bias": (cfg.d_ff,)},
                "fc_out": {"kernel": (cfg.d_ff, d), "bias": (d,)}},
    }
    return {"transformer": {"wte": {"embedding": (cfg.vocab_size, d)},
                            "h": [layer for _ in range(cfg.n_layers)],
                            "ln_f": ln},
            "lm_head": {"kernel": (d, cfg.vocab_size), "bias": (cfg.vocab_size,)}}


def apply(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [B, L, vocab] float32 for ids/mask [B, L]."""
    B, L = input_ids.shape
    t = params["transformer"]
    hd = cfg.d_model // cfg.n_heads
    rotary_dim = cfg.rotary_dim or hd
    positions = jnp.arange(L)
    h = t["wte"]["embedding"][input_ids]
    allowed = attention_bias(attention_mask)
    act = ACTIVATIONS[cfg.activation]
    for layer in t["h"]:
        x = layer_norm(h, layer["ln_1"], cfg.norm_eps)
        a = layer["attn"]
        q, k, v = (linear(x, a[n]).reshape(B, L, cfg.n_heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
        q = rotate_interleaved(q, positions, rotary_dim)
        k = rotate_interleaved(k, positions, rotary_dim)
        attn_out = linear(attend(q, k, v, allowed, hd ** -0.5, upcast=True), a["out_proj"])
        mlp_out = linear(act(linear(x, layer["mlp"]["fc_in"])), layer["mlp"]["fc_out"])
        h = block_output(h + attn_out + mlp_out, layer)
    h = layer_norm(h, t["ln_f"], cfg.norm_eps)
    return linear(h, params["lm_head"]).astype(jnp.float32)
