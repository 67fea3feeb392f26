"""Hugging Face checkpoints in and out: ``config.json`` + (sharded) safetensors ↔ ``lnjax.models.Model``.

    model = load("path/to/checkpoint_dir", dtype="float32")      # or "bfloat16"
    logits = model.apply(model.params, input_ids, attention_mask)
    save(model, edited_params, "path/to/out_dir")                 # loadable by transformers
    tok = load_tokenizer("path/to/checkpoint_dir")                 # tokenizer.json via `tokenizers`

HF linear weights are ``(out, in)``; lnjax kernels are ``(in, out)``: the transpose happens here, once. GPT-2's
Conv1D weights are already ``(in, out)``. Unsupported config options are refused by name, never ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from lnjax.io import builtin_models
from lnjax.io import gguf
from lnjax.io.checkpoint import CheckpointError
from lnjax.io.hf_layout import DTYPES as _DTYPES
from lnjax.io.hf_layout import (Tokenizer, check_complete, config_from_hf, config_to_hf, empty_tree, hf_key_map,
                        put_tensor)
from lnjax.models import Model, get_module

__all__ = ["CheckpointError", "Tokenizer", "check_complete", "config_from_hf", "config_to_hf", "hf_key_map", "load",
           "load_tokenizer", "put_tensor", "save"]

# Buffers some checkpoints carry that are not parameters (recomputed by the model).
_BUFFER_KEYS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")
_SHARD_BYTES = 4 * 1024 ** 3


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


def _gguf_file(path: str) -> Optional[str]:
    """The GGUF file ``path`` names: a built-in model name (``lnjax.io.builtin_models``, fetched once) or a
    ``.gguf`` file; None for an HF checkpoint directory."""
    if builtin_models.is_builtin(path):
        return builtin_models.path(path)
    return path if str(path).endswith(".gguf") else None


# Bumped whenever the GGUF reader's output changes, so stale conversions are never reused.
_CONVERSION_VERSION = 1
# Smaller GGUF files parse in well under a second: converting them would only fill the cache.
_CONVERT_MIN_BYTES = 1 << 20


def converted_gguf(gguf_file: str) -> Optional[str]:
    """An HF checkpoint directory holding ``gguf_file`` as ``lnjax.io.gguf`` reads it (float32 weights, its
    ``config.json`` and ``tokenizer.json``), written once under ``builtin_models.cache_dir()/converted``; None
    when ``LNJAX_GGUF_CACHE=0``, the file is under 1 MiB or the cache cannot be written (callers then read the
    GGUF itself).

    Why: parsing the GGUF metadata (a 49K-token vocabulary and its merges, element by element) and dequantizing
    cost ~15-30 s per load on two cores, reading float32 safetensors well under a second. The weights are the
    float32 dequantized tensors the GGUF reader casts from, so any ``dtype`` loads bit-identical parameters."""
    if os.environ.get("LNJAX_GGUF_CACHE", "1") == "0":
        return None
    st = os.stat(gguf_file)
    if st.st_size < _CONVERT_MIN_BYTES:
        return None
    key = hashlib.sha256(f"{os.path.realpath(gguf_file)}|{st.st_size}|{st.st_mtime_ns}|{_CONVERSION_VERSION}"
                         .encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(gguf_file))[0]
    root = os.path.join(builtin_models.cache_dir(), "converted")
    out = os.path.join(root, f"{stem}-{key}")
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        return out
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".part-")
        try:
            model = gguf.load(gguf_file, "float32")
            save(model, model.params, tmp)
            gguf.load_tokenizer(gguf_file).save(tmp)  # last: its presence marks a complete conversion
            os.replace(tmp, out)
        except OSError:
            if not os.path.exists(os.path.join(out, "tokenizer.json")):  # not another process's finished copy
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return None
    return out


def load(path: str, dtype: str = "float32") -> Model:
    """Load an HF decoder checkpoint directory as a ``Model`` with parameters in ``dtype``; a built-in name
    (``"smollm2"``) or a ``.gguf`` file is read by ``lnjax.io.gguf`` (once: later loads read its conversion,
    ``converted_gguf``).

    Streams tensor by tensor (peak host memory about one copy of the weights), checks every shape against the
    architecture, and raises CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    gguf_file = _gguf_file(path)
    if gguf_file:
        converted = converted_gguf(gguf_file)
        if converted is None:
            return gguf.load(gguf_file, dtype)
        model = load(converted, dtype)
        # the config gguf.load gives (torch_dtype = the dtype asked for), so both paths return the same Model
        return Model(model.config, model.params, hf_config={**model.hf_config, "torch_dtype": dtype})
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    from safetensors import SafetensorError, safe_open

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{cfg_path}: file not found")
    with open(cfg_path) as f:
        try:
            hf_cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not a JSON config ({e})") from None
    cfg = config_from_hf(hf_cfg, cfg_path)
    expected = hf_key_map(cfg)
    tree = empty_tree(cfg)
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


def save(model: Model, params: Any, out_dir: str, dtype: Optional[str] = None) -> str:
    """Write ``params`` (same structure as ``model.params``) as an HF checkpoint: ``config.json`` and safetensors
    (sharded with an index above 4 GiB). ``dtype`` defaults to the parameters' dtype. Returns ``out_dir``."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config
    tensors: dict[str, np.ndarray] = {}
    for key, (module, leaf, shape, transpose) in hf_key_map(cfg).items():
        arr = get_module(params, module)[leaf]
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


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of checkpoint directory ``path`` (its ``tokenizer.json``), or of a built-in model name or
    ``.gguf`` file (from the GGUF metadata)."""
    gguf_file = _gguf_file(path)
    if gguf_file:
        converted = converted_gguf(gguf_file)
        return gguf.load_tokenizer(gguf_file) if converted is None else load_tokenizer(converted)
    from tokenizers import Tokenizer as _HFTokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: file not found (lnjax reads tokenizer.json only)")
    return Tokenizer(_HFTokenizer.from_file(file), file)
