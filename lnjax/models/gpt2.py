"""GPT-2: learned positions, LayerNorm, fused QKV (HF Conv1D weights are already (in, out)), tied head."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from .config import ModelConfig, hf_activation, hf_common, hf_common_out, refuse
from .layers import ACTIVATIONS, attend, attention_bias, block_output, layer_norm, linear


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of parameter shapes for ``cfg``."""
    d = cfg.d_model
    ln = {"scale": (d,), "bias": (d,)}
    layer = {
        "ln_1": ln,
        "attn": {"c_attn": {"kernel": (d, 3 * d), "bias": (3 * d,)}, "c_proj": {"kernel": (d, d), "bias": (d,)}},
        "ln_2": ln,
        "mlp": {"c_fc": {"kernel": (d, cfg.d_ff), "bias": (cfg.d_ff,)},
                "c_proj": {"kernel": (cfg.d_ff, d), "bias": (d,)}},
    }
    return {"transformer": {"wte": {"embedding": (cfg.vocab_size, d)},
                            "wpe": {"embedding": (cfg.max_positions, d)},
                            "h": [layer for _ in range(cfg.n_layers)],
                            "ln_f": ln}}


LAYERS = ("transformer", "h")  # where the decoder blocks' list sits in the params tree
EMBEDDING = ("transformer", "wte", "embedding")  # the token embeddings: their dtype is the residual stream's


def hidden_states(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig,
                  start: int = 0, stop: Optional[int] = None, h: Optional[jax.Array] = None) -> jax.Array:
    """Final normalized hidden states [B, L, d_model] for ids/mask [B, L]; blocks ``[start, stop)`` from the
    residual stream ``h`` as in ``lnjax.models.llama.hidden_states``."""
    B, L = input_ids.shape
    if L > cfg.max_positions:
        raise ValueError(f"sequence length {L} exceeds GPT-2's {cfg.max_positions} learned positions")
    t = params["transformer"]
    hd = cfg.d_model // cfg.n_heads
    if h is None:
        h = t["wte"]["embedding"][input_ids] + t["wpe"]["embedding"][jnp.arange(L)][None]
    allowed = attention_bias(attention_mask)
    act = ACTIVATIONS[cfg.activation]
    for layer in t["h"][start:stop]:
        x = layer_norm(h, layer["ln_1"], cfg.norm_eps)
        q, k, v = jnp.split(linear(x, layer["attn"]["c_attn"]), 3, axis=-1)
        q, k, v = (y.reshape(B, L, cfg.n_heads, hd) for y in (q, k, v))
        h = h + linear(attend(q, k, v, allowed, hd ** -0.5), layer["attn"]["c_proj"])
        x = layer_norm(h, layer["ln_2"], cfg.norm_eps)
        h = block_output(h + linear(act(linear(x, layer["mlp"]["c_fc"])), layer["mlp"]["c_proj"]), layer)
    return h if stop is not None else layer_norm(h, t["ln_f"], cfg.norm_eps)


def head(params: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [..., vocab] float32 of final hidden states ``h`` [..., d_model] (the tied embeddings)."""
    return (h @ params["transformer"]["wte"]["embedding"].T).astype(jnp.float32)


def apply(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [B, L, vocab] float32 for ids/mask [B, L]."""
    return head(params, hidden_states(params, input_ids, attention_mask, cfg), cfg)


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig from a GPT-2 ``config.json`` dict; CheckpointError for attention-scaling variants and
    cross-attention, which lnjax does not implement."""
    for opt, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if hf.get(opt, ok) != ok:
            refuse(where, opt, hf[opt], f"only {ok} is supported")
    d = int(hf["n_embd"])
    return ModelConfig(arch="gpt2", d_model=d, n_layers=int(hf["n_layer"]), n_heads=int(hf["n_head"]),
                       d_ff=int(hf.get("n_inner") or 4 * d), norm_eps=float(hf["layer_norm_epsilon"]),
                       max_positions=int(hf["n_positions"]), tie_embeddings=True,
                       activation=hf_activation(hf, "activation_function", where, "gelu_new"), **hf_common(hf))


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF ``config.json`` dict for a GPT-2 ``cfg``."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps,
            "n_positions": cfg.max_positions, "activation_function": cfg.activation, **hf_common_out(cfg, dtype)}
