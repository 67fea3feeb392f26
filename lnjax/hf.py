"""Hugging Face checkpoints in and out: ``config.json`` + (sharded) safetensors ↔ ``lnjax.models.Model``.

    model = load("path/to/checkpoint_dir", dtype="float32")      # or "bfloat16"
    logits = model.apply(model.params, input_ids, attention_mask)
    save(model, edited_params, "path/to/out_dir")                 # loadable by transformers
    tok = load_tokenizer("path/to/checkpoint_dir")                 # tokenizer.json via `tokenizers`

HF linear weights are ``(out, in)``; lnjax kernels are ``(in, out)``: the transpose happens here, once. GPT-2's
Conv1D weights are already ``(in, out)``. Unsupported config options are refused by name, never ignored.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .models import Model, ModelConfig, param_shapes
from .models.layers import ACTIVATIONS

SUPPORTED_ROPE = ("default", "linear", "llama3")
# Buffers some checkpoints carry that are not parameters (recomputed by the model).
_BUFFER_KEYS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_SHARD_BYTES = 4 * 1024 ** 3


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and tensor or option."""


def _refuse(where: str, option: str, value: Any, why: str) -> None:
    raise CheckpointError(f"{where}: unsupported config option {option}={value!r} ({why})")


def _rope(hf: dict, where: str) -> tuple[float, Optional[tuple]]:
    """(theta, scaling) from either the v4 (``rope_theta`` + ``rope_scaling``) or v5 (``rope_parameters``) form."""
    params = hf.get("rope_parameters") or {}
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = merged.pop("rope_type", merged.pop("type", "default"))
    if kind not in SUPPORTED_ROPE:
        _refuse(where, "rope_scaling.rope_type", kind, f"supported: {SUPPORTED_ROPE}")
    if kind == "default":
        return theta, None
    keep = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keep if k not in merged]
    if missing:
        raise CheckpointError(f"{where}: rope scaling {kind!r} lacks {missing}")
    return theta, tuple([("rope_type", kind)] + [(k, float(merged[k])) for k in keep])


def _activation(hf: dict, key: str, where: str, default: str) -> str:
    act = hf.get(key) or default
    if act not in ACTIVATIONS:
        _refuse(where, key, act, f"supported: {sorted(ACTIVATIONS)}")
    return act


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict; CheckpointError naming any unsupported option."""
    mt = hf.get("model_type")
    common = dict(vocab_size=int(hf["vocab_size"]), bos_token_id=hf.get("bos_token_id"),
                  eos_token_id=hf.get("eos_token_id") if not isinstance(hf.get("eos_token_id"), list)
                  else hf["eos_token_id"][0])
    if mt in ("llama", "mistral", "qwen2"):
        if hf.get("pretraining_tp", 1) != 1:
            _refuse(where, "pretraining_tp", hf["pretraining_tp"], "only 1 is supported")
        theta, scaling = _rope(hf, where)
        window = None
        if mt == "mistral":
            window = hf.get("sliding_window")
        if mt == "qwen2" and hf.get("use_sliding_window"):
            _refuse(where, "use_sliding_window", True, "Qwen2 sliding-window layers are not implemented")
        qkv_bias = mt == "qwen2" or bool(hf.get("attention_bias", False))
        return ModelConfig(
            arch=mt, d_model=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
            n_heads=int(hf["num_attention_heads"]), n_kv_heads=int(hf.get("num_key_value_heads")
                                                                    or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"), d_ff=int(hf["intermediate_size"]), norm_eps=float(hf["rms_norm_eps"]),
            rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=mt != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)), sliding_window=window,
            activation=_activation(hf, "hidden_act", where, "silu"), **common)
    if mt == "gpt2":
        for opt, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if hf.get(opt, ok) != ok:
                _refuse(where, opt, hf[opt], f"only {ok} is supported")
        d = int(hf["n_embd"])
        return ModelConfig(arch="gpt2", d_model=d, n_layers=int(hf["n_layer"]), n_heads=int(hf["n_head"]),
                           d_ff=int(hf.get("n_inner") or 4 * d), norm_eps=float(hf["layer_norm_epsilon"]),
                           max_positions=int(hf["n_positions"]), tie_embeddings=True,
                           activation=_activation(hf, "activation_function", where, "gelu_new"), **common)
    if mt == "gptj":
        if hf.get("tie_word_embeddings", False):
            _refuse(where, "tie_word_embeddings", True, "GPT-J has an untied, biased head")
        d = int(hf["n_embd"])
        return ModelConfig(arch="gptj", d_model=d, n_layers=int(hf["n_layer"]), n_heads=int(hf["n_head"]),
                           d_ff=int(hf.get("n_inner") or 4 * d), norm_eps=float(hf["layer_norm_epsilon"]),
                           rotary_dim=hf.get("rotary_dim"), max_positions=int(hf["n_positions"]),
                           activation=_activation(hf, "activation_function", where, "gelu_new"), **common)
    raise CheckpointError(f"{where}: unknown model_type {mt!r}; supported: llama, mistral, qwen2, gpt2, gptj")


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF ``config.json`` dict for ``cfg`` (used when a model was not loaded from HF)."""
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
              "torch_dtype": dtype, "tie_word_embeddings": cfg.tie_embeddings}
    if cfg.arch in ("llama", "mistral", "qwen2"):
        hf = {"model_type": cfg.arch, "architectures": [{"llama": "LlamaForCausalLM", "mistral":
              "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.arch]],
              "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd,
              "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": cfg.activation,
              "max_position_embeddings": cfg.max_positions, **common}
        if cfg.rope_scaling:
            hf["rope_scaling"] = dict(cfg.rope_scaling)
        if cfg.arch == "llama":
            hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if cfg.arch == "mistral":
            hf["sliding_window"] = cfg.sliding_window
        return hf
    name = {"gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM"}[cfg.arch]
    hf = {"model_type": cfg.arch, "architectures": [name], "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
          "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps,
          "n_positions": cfg.max_positions, "activation_function": cfg.activation, **common}
    if cfg.arch == "gptj":
        hf["rotary_dim"] = cfg.rotary_dim
    return hf


def hf_key_map(cfg: ModelConfig) -> dict[str, tuple[str, str, tuple, bool]]:
    """HF tensor name -> (module path, leaf, lnjax shape, transpose?) for every parameter of ``cfg``."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, shape in leaves:
        parts = [str(getattr(p, "key", getattr(p, "idx", None))) for p in path]
        module, leaf = ".".join(parts[:-1]), parts[-1]
        transpose = leaf == "kernel" and cfg.arch != "gpt2"
        out[f"{module}.{_LEAF_TO_HF[leaf]}"] = (module, leaf, tuple(shape), transpose)
    return out


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(path, name)):
                raise CheckpointError(f"{index}: shard file {name!r} is missing from {path}")
        return [os.path.join(path, n) for n in files]
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _set_leaf(tree: dict, module: str, leaf: str, value) -> None:
    node = tree
    for part in module.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[leaf] = value


def _empty_tree(cfg: ModelConfig) -> dict:
    """A mutable copy of the parameter structure with None leaves, filled tensor by tensor while loading."""
    def rec(node):
        if isinstance(node, dict):
            return {k: rec(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rec(v) for v in node]
        return None
    return rec(param_shapes(cfg))


def _gguf_file(path: str) -> Optional[str]:
    """The GGUF file ``path`` names: a built-in model name (``lnjax.builtin_models``, fetched once) or a
    ``.gguf`` file; None for an HF checkpoint directory."""
    from . import builtin_models
    if builtin_models.is_builtin(path):
        return builtin_models.path(path)
    return path if str(path).endswith(".gguf") else None


def load(path: str, dtype: str = "float32") -> Model:
    """Load an HF decoder checkpoint directory as a ``Model`` with parameters in ``dtype``; a built-in name
    (``"smollm2"``) or a ``.gguf`` file is read by ``lnjax.gguf``.

    Streams tensor by tensor (peak host memory about one copy of the weights), checks every shape against the
    architecture, and raises CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    gguf_file = _gguf_file(path)
    if gguf_file:
        from . import gguf
        return gguf.load(gguf_file, dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    from safetensors import SafetensorError, safe_open

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{cfg_path}: file not found")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    cfg = config_from_hf(hf_cfg, cfg_path)
    expected = hf_key_map(cfg)
    tree = _empty_tree(cfg)
    seen, unexpected = set(), []
    jdtype = _DTYPES[dtype]
    for file in _weight_files(path):
        try:
            handle = safe_open(file, framework="flax")
        except (SafetensorError, OSError, Exception) as e:  # safetensors raises several types on a bad header
            raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
        with handle as f:
            for key in f.keys():
                if key not in expected:
                    if _BUFFER_KEYS.search(key) or (cfg.tie_embeddings and key == "lm_head.weight"):
                        continue
                    unexpected.append(key)
                    continue
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e})") from None
                put_tensor(tree, expected[key], t, jdtype, f"{file}: tensor {key!r}")
                seen.add(key)
    check_complete(path, expected, seen, unexpected)
    return Model(cfg, tree, hf_config=hf_cfg)


def put_tensor(tree: dict, entry: tuple, t, jdtype, where: str) -> None:
    """Check HF-layout tensor ``t`` against its ``hf_key_map`` entry, cast it and set it in ``tree``."""
    module, leaf, shape, transpose = entry
    got = tuple(t.shape[::-1]) if transpose else tuple(t.shape)
    if got != shape:
        raise CheckpointError(f"{where} has shape {tuple(t.shape)}, the config implies "
                              f"{shape[::-1] if transpose else shape}")
    t = jnp.asarray(t).astype(jdtype)
    _set_leaf(tree, module, leaf, t.T if transpose else t)


def check_complete(path: str, expected: dict, seen: set, unexpected: list) -> None:
    """CheckpointError naming missing and unexpected tensors, if any."""
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                              f"unexpected tensors {unexpected[:10]}")


def save(model: Model, params: Any, out_dir: str, dtype: Optional[str] = None) -> str:
    """Write ``params`` (same structure as ``model.params``) as an HF checkpoint: ``config.json`` and safetensors
    (sharded with an index above 4 GiB). ``dtype`` defaults to the parameters' dtype. Returns ``out_dir``."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config
    tensors: dict[str, np.ndarray] = {}
    for key, (module, leaf, shape, transpose) in hf_key_map(cfg).items():
        node = params
        for part in module.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        arr = node[leaf]
        if tuple(arr.shape) != shape:
            raise ValueError(f"parameter {module}.{leaf} has shape {tuple(arr.shape)}, expected {shape}")
        if dtype is not None:
            arr = jnp.asarray(arr).astype(_DTYPES[dtype])
        arr = np.asarray(arr.T if transpose else arr)
        tensors[key] = np.ascontiguousarray(arr)
    out_dtype = dtype or str(np.asarray(next(iter(tensors.values()))).dtype)
    hf_cfg = dict(model.hf_config) if model.hf_config else config_to_hf(cfg, out_dtype)
    hf_cfg["torch_dtype"] = out_dtype
    hf_cfg.pop("dtype", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    shards, current, size = [], {}, 0
    for key, arr in tensors.items():
        if current and size + arr.nbytes > _SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = arr
        size += arr.nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return out_dir
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out_dir


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the two calls lnjax needs: ``encode(text, add_special_tokens)`` → ids and
    ``decode(ids)`` → text."""

    def __init__(self, tok, source: str):
        self._tok, self.source = tok, source

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of checkpoint directory ``path`` (its ``tokenizer.json``), or of a built-in model name or
    ``.gguf`` file (from the GGUF metadata)."""
    gguf_file = _gguf_file(path)
    if gguf_file:
        from . import gguf
        return gguf.load_tokenizer(gguf_file)
    from tokenizers import Tokenizer as _HFTokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: file not found (lnjax reads tokenizer.json only)")
    return Tokenizer(_HFTokenizer.from_file(file), file)
