"""Decoder language models as pure functions over nested-dict parameters mirroring HF module paths."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from . import gpt2, gptj, llama
from .config import ARCHITECTURES, ModelConfig
from .layers import linear
from lnjax.core.tree import get_module, leaf_paths, split_path, with_module_leaf  # noqa: F401  (re-exported)

_MODULES = {"llama": llama, "mistral": llama, "qwen2": llama, "gpt2": gpt2, "gptj": gptj}


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A decoder: ``config``, ``params`` (nested dict) and ``apply(params, input_ids, attention_mask) -> logits``.

    ``apply`` takes ids and mask [B, L] (int32; mask 1 for real tokens) and returns float32 logits [B, L, vocab];
    it is ``head(params, apply_hidden(params, ids, mask))``, the hidden states [B, L, d_model] then the vocabulary
    projection, which callers needing a few positions' logits apply to those positions only.
    ``hf_config`` keeps the ``config.json`` a model was loaded from, so saving writes it back unchanged.
    """

    config: ModelConfig
    params: Any
    hf_config: Optional[dict] = None

    @property
    def apply(self) -> Callable:
        return apply_fn(self.config)

    @property
    def apply_hidden(self) -> Callable:
        return hidden_fn(self.config)

    @property
    def head(self) -> Callable:
        return head_fn(self.config)


@functools.lru_cache(maxsize=None)
def apply_fn(cfg: ModelConfig) -> Callable:
    """The pure ``apply(params, input_ids, attention_mask) -> logits`` of architecture ``cfg`` (cached, so
    repeated calls give the same function object and jit caches hit)."""
    return functools.partial(_MODULES[cfg.arch].apply, cfg=cfg)


@functools.lru_cache(maxsize=None)
def hidden_fn(cfg: ModelConfig) -> Callable:
    """``apply_hidden(params, input_ids, attention_mask) -> h``: the final normalized hidden states [B, L, d_model]
    of architecture ``cfg``, everything of ``apply`` but the vocabulary projection (cached like ``apply_fn``)."""
    return functools.partial(_MODULES[cfg.arch].hidden_states, cfg=cfg)


@functools.lru_cache(maxsize=None)
def head_fn(cfg: ModelConfig) -> Callable:
    """``head(params, h) -> logits``: the vocabulary projection of hidden states [..., d_model] to float32
    logits [..., vocab] (``lm_head`` or the tied embeddings); ``apply = head(hidden(...))`` exactly."""
    return functools.partial(_MODULES[cfg.arch].head, cfg=cfg)


def split_apply(apply: Callable) -> Optional[tuple[Callable, Callable]]:
    """``(apply_hidden, head)`` of an ``apply`` made by ``apply_fn`` (``Model.apply``), so that a caller needing
    logits at a few positions (``lnjax.eval``) projects only those; None for any other function."""
    if isinstance(apply, functools.partial) and "cfg" in apply.keywords and not apply.args:
        cfg = apply.keywords["cfg"]
        module = _MODULES.get(getattr(cfg, "arch", None))
        if module is not None and apply.func is module.apply:
            return hidden_fn(cfg), head_fn(cfg)
    return None


@dataclasses.dataclass(frozen=True)
class Stages:
    """A decoder cut at a block boundary, for callers that reuse the residual stream below the blocks an edit
    changes (``lnjax.eval.FrozenPrefix``): ``prefix(params, ids, mask, stop) -> h`` [B, L, d_model], the residual
    stream entering block ``stop``; ``suffix(params, h, ids, mask, start)``: the final normalized hidden states
    from the stream entering block ``start``; ``head`` as ``Model.head``; ``layers``, the path of the blocks' list
    in the params tree. ``suffix(p, prefix(p, ids, mask, s), ids, mask, s)`` is ``apply_hidden(p, ids, mask)``."""

    prefix: Callable
    suffix: Callable
    head: Callable
    layers: tuple
    n_layers: int

    def frozen_leaves(self, params, start: int) -> list:
        """The leaves of ``params`` that ``prefix(params, ..., start)`` may read: every leaf but the blocks
        ``start`` and above (the final norm and head are kept too, which only makes a cache built on them
        stricter than it needs to be)."""
        blocks = params
        for k in self.layers:
            blocks = blocks[k]
        upper = {id(leaf) for b in blocks[start:] for leaf in jax.tree_util.tree_leaves(b)}
        return [leaf for leaf in jax.tree_util.tree_leaves(params) if id(leaf) not in upper]

    def first_block(self, targets) -> Optional[int]:
        """The lowest block any of ``targets`` (HF module paths, e.g. ``model.layers.25.mlp.down_proj``) lies
        in; None when a target is outside the blocks (an edit could then change the prefix)."""
        head = ".".join(self.layers) + "."
        found = []
        for t in targets:
            if not t.startswith(head) or not t[len(head):].split(".")[0].isdigit():
                return None
            found.append(int(t[len(head):].split(".")[0]))
        return min(found) if found else None


@functools.lru_cache(maxsize=None)
def stage_fns(cfg: ModelConfig) -> Stages:
    """``Stages`` of architecture ``cfg`` (cached like ``apply_fn``)."""
    module = _MODULES[cfg.arch]

    def prefix(params, ids, mask, stop: int):
        return module.hidden_states(params, ids, mask, cfg=cfg, stop=stop)

    def suffix(params, h, ids, mask, start: int):
        emb = params
        for k in module.EMBEDDING:
            emb = emb[k]
        # a stream kept in float32 goes back to the model's own dtype, as the blocks below would have passed it
        return module.hidden_states(params, ids, mask, cfg=cfg, start=start, h=h.astype(emb.dtype))

    return Stages(prefix, suffix, head_fn(cfg), module.LAYERS, cfg.n_layers)


def split_stages(apply: Callable) -> Optional[Stages]:
    """``Stages`` of an ``apply`` made by ``apply_fn`` (``Model.apply``); None for any other function."""
    parts = split_apply(apply)
    return None if parts is None else stage_fns(apply.keywords["cfg"])


def architecture(arch: str):
    """The module implementing architecture ``arch`` (``param_shapes``, ``apply``, ``config_from_hf``,
    ``config_to_hf``); ValueError for an unknown one."""
    if arch not in _MODULES:
        raise ValueError(f"unknown architecture {arch!r}; supported: {ARCHITECTURES}")
    return _MODULES[arch]


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of parameter shapes (tuples) for ``cfg``."""
    return _MODULES[cfg.arch].param_shapes(cfg)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """Parameters as ``jax.ShapeDtypeStruct`` leaves: the model's shape without allocating it."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), param_shapes(cfg),
                                  is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random parameters: normal(0, std) kernels and embeddings, unit norm scales, zero biases."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = path[-1].key
        if name == "scale":
            out.append(jnp.ones(shape, dtype))
        elif name == "bias":
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = ["ARCHITECTURES", "Model", "ModelConfig", "Stages", "split_stages", "stage_fns", "abstract_params", "apply_fn", "architecture", "get_module",
           "head_fn", "hidden_fn", "init_params", "leaf_paths", "linear", "param_shapes", "split_apply",
           "split_path", "with_module_leaf"]
