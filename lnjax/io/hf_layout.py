"""The HF parameter layout shared by every checkpoint format lnjax reads or writes (safetensors in ``lnjax.hf``,
GGUF in ``lnjax.io.gguf``): config.json mapping, tensor names ↔ parameter paths (with the one transpose of
``(out, in)`` weights into ``(in, out)`` kernels), dtype names, tensor placement with shape checks, and the
tokenizer wrapper. It imports neither format module, so both build on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lnjax.io.checkpoint import CheckpointError
from lnjax.models import ARCHITECTURES, ModelConfig, architecture, get_module, leaf_paths, param_shapes

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict (each architecture's mapping sits next to its model);
    CheckpointError naming any unsupported option."""
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unknown model_type {mt!r}; supported: {', '.join(ARCHITECTURES)}")
    return architecture(mt).config_from_hf(hf, where)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF ``config.json`` dict for ``cfg`` (used when a model was not loaded from HF)."""
    return architecture(cfg.arch).config_to_hf(cfg, dtype)


def hf_key_map(cfg: ModelConfig) -> dict[str, tuple[str, str, tuple, bool]]:
    """HF tensor name -> (module path, leaf, lnjax shape, transpose?) for every parameter of ``cfg``."""
    out = {}
    for module, leaf, shape in leaf_paths(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)):
        transpose = leaf == "kernel" and cfg.arch != "gpt2"
        out[f"{module}.{_LEAF_TO_HF[leaf]}"] = (module, leaf, tuple(shape), transpose)
    return out


def empty_tree(cfg: ModelConfig) -> dict:
    """A mutable copy of the parameter structure with None leaves, filled tensor by tensor while loading."""
    return jax.tree_util.tree_map(lambda _: None, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def put_tensor(tree: dict, entry: tuple, t, jdtype, where: str) -> None:
    """Check HF-layout tensor ``t`` against its ``hf_key_map`` entry, cast it and set it in ``tree``."""
    module, leaf, shape, transpose = entry
    got = tuple(t.shape[::-1]) if transpose else tuple(t.shape)
    if got != shape:
        raise CheckpointError(f"{where} has shape {tuple(t.shape)}, the config implies "
                              f"{shape[::-1] if transpose else shape}")
    t = jnp.asarray(t).astype(jdtype)
    finite = jnp.isfinite(t)
    if not bool(jnp.all(finite)):  # NaN/Inf in the file, or a value too large for ``jdtype`` (float16)
        bad = int(jnp.size(t) - jnp.sum(finite))
        raise CheckpointError(f"{where} has {bad} non-finite values (NaN/Inf) in {jnp.dtype(jdtype).name}; "
                              "refusing weights no edit could be computed on")
    get_module(tree, module)[leaf] = t.T if transpose else t


def check_complete(path: str, expected: dict, seen: set, unexpected: list) -> None:
    """CheckpointError naming missing and unexpected tensors, if any."""
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                              f"unexpected tensors {unexpected[:10]}")


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

    def save(self, directory: str) -> str:
        """Write ``tokenizer.json`` into ``directory`` (an exported checkpoint carries its tokenizer); its path."""
        import os
        path = os.path.join(directory, "tokenizer.json")
        self._tok.save(path)
        return path
