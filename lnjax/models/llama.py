"""Llama-family decoders (Llama 2/3/3.1, Mistral, Qwen2/2.5): RMSNorm, GQA, rotary, SwiGLU MLP.

Parameters mirror HF module paths: ``params["model"]["layers"][i]["mlp"]["down_proj"]["kernel"]`` (in, out).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lnjax.core.errors import CheckpointError
from .config import ModelConfig, hf_activation, hf_common, hf_common_out, refuse
from .layers import (ACTIVATIONS, attend, attention_bias, anchored, block_output, keep_topk, linear, memory_read,
                     rms_norm, rope_frequencies, rotate_half)


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
    keys = cfg.memory_slots // cfg.memory_offsets
    memory = {"key_proj": _proj(d, keys, True), "value_proj": _proj(cfg.memory_slots, d, False)}
    if cfg.memory_code == "cosine":
        memory["in_proj"] = _proj(d, d, True)
    tree = {"model": {"embed_tokens": {"embedding": (cfg.vocab_size, d)},
                      "layers": [dict(layer, memory=memory) if i in cfg.memory_layers else layer
                                 for i in range(cfg.n_layers)],
                      "norm": {"scale": (d,)}}}
    if not cfg.tie_embeddings:
        tree["lm_head"] = {"kernel": (d, cfg.vocab_size)}
    return tree


LAYERS = ("model", "layers")  # where the decoder blocks' list sits in the params tree
EMBEDDING = ("model", "embed_tokens", "embedding")  # the token embeddings: their dtype is the residual stream's


def hidden_states(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig,
                  start: int = 0, stop: Optional[int] = None, h: Optional[jax.Array] = None) -> jax.Array:
    """Final normalized hidden states [B, L, d_model] for ids/mask [B, L].

    A layer range (``lnjax.models.stage_fns``): blocks ``[start, stop)`` only, from ``h`` [B, L, d_model], the
    residual stream entering block ``start`` (the embeddings when None); before the last block it returns the
    residual stream entering block ``stop``, un-normalized (whenever ``stop`` is given)."""
    B, L = input_ids.shape
    hd = cfg.hd
    m = params["model"]
    if h is None:
        h = m["embed_tokens"]["embedding"][input_ids]
    positions = jnp.arange(L)
    inv_freq = rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling_dict())
    allowed = attention_bias(attention_mask, cfg.sliding_window)
    act = ACTIVATIONS[cfg.activation]
    for layer in m["layers"][start:stop]:
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
        code = keep_topk(act(linear(x, f["gate_proj"])) * linear(x, f["up_proj"]), cfg.mlp_topk)
        mlp_out = linear(code, f["down_proj"])
        if "memory" in layer:
            mlp_out = mlp_out + memory_read(x, layer["memory"], cfg.memory_threshold, cfg.memory_code,
                                            anchored(input_ids, cfg.memory_anchor, cfg.memory_offsets),
                                            cfg.memory_winner)
        h = block_output(h + mlp_out, layer)
    return h if stop is not None else rms_norm(h, m["norm"], cfg.norm_eps)


def head(params: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [..., vocab] float32 of final hidden states ``h`` [..., d_model]: ``lm_head``, or the tied
    embeddings."""
    if cfg.tie_embeddings:
        return (h @ params["model"]["embed_tokens"]["embedding"].T).astype(jnp.float32)
    return linear(h, params["lm_head"]).astype(jnp.float32)


def apply(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits [B, L, vocab] float32 for ids/mask [B, L]."""
    return head(params, hidden_states(params, input_ids, attention_mask, cfg), cfg)


SUPPORTED_ROPE = ("default", "linear", "llama3")
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _rope(hf: dict, where: str) -> tuple[float, Optional[tuple]]:
    """(theta, scaling) from either the v4 (``rope_theta`` + ``rope_scaling``) or v5 (``rope_parameters``) form."""
    params = hf.get("rope_parameters") or {}
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = merged.pop("rope_type", merged.pop("type", "default"))
    if kind not in SUPPORTED_ROPE:
        refuse(where, "rope_scaling.rope_type", kind, f"supported: {SUPPORTED_ROPE}")
    if kind == "default":
        return theta, None
    keep = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keep if k not in merged]
    if missing:
        raise CheckpointError(f"{where}: rope scaling {kind!r} lacks {missing}")
    return theta, tuple([("rope_type", kind)] + [(k, float(merged[k])) for k in keep])


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig from a Llama, Mistral or Qwen2 ``config.json`` dict; CheckpointError naming unsupported
    options (tensor-parallel pretraining splits, rope types other than ``SUPPORTED_ROPE``, Qwen2 sliding
    windows)."""
    mt = hf["model_type"]
    if hf.get("pretraining_tp", 1) != 1:
        refuse(where, "pretraining_tp", hf["pretraining_tp"], "only 1 is supported")
    theta, scaling = _rope(hf, where)
    window = hf.get("sliding_window") if mt == "mistral" else None
    if mt == "qwen2" and hf.get("use_sliding_window"):
        refuse(where, "use_sliding_window", True, "Qwen2 sliding-window layers are not implemented")
    qkv_bias = mt == "qwen2" or bool(hf.get("attention_bias", False))
    return ModelConfig(
        arch=mt, d_model=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
        n_heads=int(hf["num_attention_heads"]),
        n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"), d_ff=int(hf["intermediate_size"]), norm_eps=float(hf["rms_norm_eps"]),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=mt != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), sliding_window=window,
        activation=hf_activation(hf, "hidden_act", where, "silu"), **hf_common(hf))


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF ``config.json`` dict for a Llama-family ``cfg``."""
    hf = {"model_type": cfg.arch, "architectures": [_HF_CLASSES[cfg.arch]],
          "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd,
          "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": cfg.activation,
          "max_position_embeddings": cfg.max_positions, **hf_common_out(cfg, dtype)}
    if cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.arch == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.arch == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    return hf
