"""GPT-J: one LayerNorm feeding attention and MLP in parallel, partial interleaved rotary, biased LM head."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from .config import ModelConfig, hf_activation, hf_common, hf_common_out, refuse
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


LAYERS = ("transformer", "h")  # where the decoder blocks' list sits in the params tree
EMBEDDING = ("transformer", "wte", "embedding")  # the token embeddings: their dtype is the residual stream's


def hidden_states(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig,
                  start: int = 0, stop: Optional[int] = None, h: Optional[jax.Array] = None) -> jax.Array:
    """Final normalized hidden states [B, L, d_model] for ids/mask [B, L]; blocks ``[start, stop)`` from the
    residual stream ``h`` as in ``lnjax.models.llama.hidden_states``."""
    B, L = input_ids.shape
    t = params["transformer"]
    hd = cfg.d_model // cfg.n_heads
    rotary_dim = cfg.rotary_dim or hd
    positions = jnp.arange(L)
    if h is None:
        h = t["wte"]["embedding"][input_ids]
    allowed = attention_bias(attention_mask)
    act = ACTIVATIONS[cfg.activation]
    for layer in t["h"][start:stop]:
        x = layer_norm(h, layer["ln_1"], cfg.norm_eps)
        a = layer["attn"]
        q, k, v = (linear(x, a[n]).reshape(B, L, cfg.n_heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
        q = rotate_interleaved(q, positions, rotary_dim)
        k = rotate_interleaved(k, positions, rotary_dim)
        attn_out = linear(attend(q, k, v, allowed, hd ** -0.5, upcast=True), a["out_proj"])
        mlp_out = linear(act(linear(x, layer["mlp"]["fc_in"])), layer["mlp"]["fc_out"])
        h = block_output(h + attn_out + mlp_out, layer)
    return h if stop is not None else layer_norm(h, t["ln_f"], cfg.norm_eps)


def head(params: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [..., vocab] float32 of final hidden states ``h`` [..., d_model] (``lm_head``)."""
    return linear(h, params["lm_head"]).astype(jnp.float32)


def apply(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [B, L, vocab] float32 for ids/mask [B, L]."""
    return head(params, hidden_states(params, input_ids, attention_mask, cfg), cfg)


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig from a GPT-J ``config.json`` dict; CheckpointError for tied embeddings (GPT-J's head is
    untied and biased)."""
    if hf.get("tie_word_embeddings", False):
        refuse(where, "tie_word_embeddings", True, "GPT-J has an untied, biased head")
    d = int(hf["n_embd"])
    return ModelConfig(arch="gptj", d_model=d, n_layers=int(hf["n_layer"]), n_heads=int(hf["n_head"]),
                       d_ff=int(hf.get("n_inner") or 4 * d), norm_eps=float(hf["layer_norm_epsilon"]),
                       rotary_dim=hf.get("rotary_dim"), max_positions=int(hf["n_positions"]),
                       activation=hf_activation(hf, "activation_function", where, "gelu_new"), **hf_common(hf))


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF ``config.json`` dict for a GPT-J ``cfg``."""
    return {"model_type": "gptj", "architectures": ["GPTJForCausalLM"], "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps,
            "n_positions": cfg.max_positions, "activation_function": cfg.activation, "rotary_dim": cfg.rotary_dim,
            **hf_common_out(cfg, dtype)}
