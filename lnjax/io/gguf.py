"""GGUF files (llama.cpp's format) in: a Llama ``Model`` and its byte-level BPE tokenizer.

    model = load("SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")   # quantized tensors dequantized
    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

Read with the ``gguf`` package (``GGUFReader`` and ``gguf.quants.dequantize``, which covers F32/F16/BF16, Q8_0,
Q4_0/Q4_1/Q5_x and the k-quants). Only ``general.architecture == "llama"`` is supported; anything else, and any
option lnjax's Llama does not implement, raises ``CheckpointError`` naming the file and metadata key.

Two layout facts the reader undoes, both as transformers' GGUF loader does:

- llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` within each head from HF's rotate-half rope
  layout to its interleaved one; ``_unpermute_qk`` is the inverse (heads = ``head_count`` for Q and
  ``head_count_kv`` for K).
- the embeddings are tied when the file has no ``output.weight``.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` with ``tokenizers`` (no transformers at run time): the
byte-level vocabulary and merges, control tokens as special tokens, BOS added when ``add_bos_token`` says so, and
the pre-tokenizer that llama.cpp uses for the file's ``tokenizer.ggml.pre`` (e.g. ``smollm`` splits every digit
on its own before the GPT-2 split, which transformers' GGUF tokenizer does not do).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from lnjax.io.checkpoint import CheckpointError
from lnjax.io.hf_layout import DTYPES as _DTYPES
from lnjax.io.hf_layout import Tokenizer, check_complete, config_to_hf, empty_tree, hf_key_map, put_tensor
from lnjax.models import Model, ModelConfig

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the splits llama.cpp applies in order (llama-vocab.cpp, regex_exprs).
PRE_TOKENIZER_SPLITS = {
    "default": (_GPT2_SPLIT,), "gpt2": (_GPT2_SPLIT,), "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT), "starcoder": (r"\p{N}", _GPT2_SPLIT), "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,), "llama3": (_LLAMA3_SPLIT,), "llama-v3": (_LLAMA3_SPLIT,),
}
# GGUF tensor name (after "blk.N.") -> HF module name, for llama.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _reader(path: str):
    from gguf import GGUFReader

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on a bad header
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, path: str, key: str, default=None, required: bool = False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise CheckpointError(f"{path}: metadata key {key!r} missing")
        return default
    return f.contents()


def hf_name(gguf_name: str) -> str:
    """The HF tensor name of a llama GGUF tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); CheckpointError for a name lnjax does not know."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    raise CheckpointError(f"unknown llama GGUF tensor {gguf_name!r}")


def config_from_gguf(reader, path: str) -> ModelConfig:
    """The Llama ``ModelConfig`` of a GGUF file's ``llama.*`` metadata."""
    arch = _field(reader, path, "general.architecture", required=True)
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture={arch!r} is not supported (only 'llama')")
    scaling = _field(reader, path, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{path}: unsupported metadata llama.rope.scaling.type={scaling!r}")
    n_heads = int(_field(reader, path, "llama.attention.head_count", required=True))
    d_model = int(_field(reader, path, "llama.embedding_length", required=True))
    head_dim = _field(reader, path, "llama.attention.key_length") or _field(reader, path, "llama.rope.dimension_count")
    if head_dim is not None and int(head_dim) * n_heads != d_model and \
            _field(reader, path, "llama.attention.key_length") is None:
        head_dim = None  # rope.dimension_count may be a partial rotary width; lnjax rotates the whole head
    tokens = _field(reader, path, "tokenizer.ggml.tokens")
    vocab = _field(reader, path, "llama.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise CheckpointError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        arch="llama", vocab_size=int(vocab), d_model=d_model,
        n_layers=int(_field(reader, path, "llama.block_count", required=True)), n_heads=n_heads,
        n_kv_heads=int(_field(reader, path, "llama.attention.head_count_kv", n_heads)),
        head_dim=None if head_dim is None else int(head_dim),
        d_ff=int(_field(reader, path, "llama.feed_forward_length", required=True)),
        norm_eps=float(_field(reader, path, "llama.attention.layer_norm_rms_epsilon", required=True)),
        rope_theta=float(_field(reader, path, "llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_down.bias" in names,
        bos_token_id=_field(reader, path, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, path, "tokenizer.ggml.eos_token_id"))


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's rope row permutation of a Q or K weight/bias with rows ``n_heads * head_dim``:
    rows (head, pair, 2) in the file -> (head, 2, pair) in HF's rotate-half order."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_array(tensor) -> np.ndarray:
    """A GGUF tensor as a float32 array in NumPy order (GGUF's dims reversed, i.e. HF's ``(out, in)``)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in tensor.shape[::-1])
    if tensor.tensor_type == GGMLQuantizationType.F32:
        return np.asarray(tensor.data, np.float32).reshape(shape)
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)


def load(path: str, dtype: str = "float32") -> Model:
    """A GGUF llama file as a ``Model`` with parameters in ``dtype`` (quantized tensors dequantized to float32
    first). Every tensor is checked against the architecture; missing, unexpected or mis-shaped tensors raise
    CheckpointError naming the file and tensor. ``model.hf_config`` is the equivalent HF ``config.json``, so
    ``lnjax.hf.save`` writes a checkpoint transformers loads."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    reader = _reader(path)
    cfg = config_from_gguf(reader, path)
    expected = hf_key_map(cfg)
    tree = empty_tree(cfg)
    seen, unexpected = set(), []
    for tensor in reader.tensors:
        try:
            key = hf_name(tensor.name)
        except CheckpointError:
            unexpected.append(tensor.name)
            continue
        if key not in expected:
            unexpected.append(tensor.name)
            continue
        try:
            arr = tensor_array(tensor)
        except Exception as e:  # an unsupported quantization type or a truncated file
            raise CheckpointError(f"{path}: tensor {tensor.name!r} ({tensor.tensor_type.name}) cannot be read "
                                  f"({e})") from None
        heads = cfg.n_heads if ".attn_q." in tensor.name else cfg.kv_heads if ".attn_k." in tensor.name else 0
        if heads and arr.shape[0] % (2 * heads) == 0:  # a mis-shaped tensor is refused by put_tensor instead
            arr = _unpermute_qk(arr, heads)
        put_tensor(tree, expected[key], arr, _DTYPES[dtype], f"{path}: tensor {tensor.name!r}")
        seen.add(key)
    check_complete(path, expected, seen, unexpected)
    hf_cfg = config_to_hf(cfg, dtype)
    # Llama has no position table; the context length only goes into config.json, as HF checkpoints carry it.
    hf_cfg["max_position_embeddings"] = int(_field(reader, path, "llama.context_length", cfg.max_positions))
    return Model(cfg, tree, hf_config=hf_cfg)


def _byte_level_vocab(tokens: list) -> dict:
    """Vocabulary in the byte-level alphabet; a token stored in plain UTF-8 is respelled byte by byte."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    table = _bytes_to_unicode()
    return {tok if set(tok) <= alphabet else "".join(table[b] for b in tok.encode("utf-8")): i
            for i, tok in enumerate(tokens)}


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"),
                                                                                              ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_tokenizer(path: str, pre: Optional[str] = None) -> Tokenizer:
    """The tokenizer a GGUF file describes, as an ``lnjax.hf.Tokenizer``. Byte-level BPE (``tokenizer.ggml.model
    == "gpt2"``) only; ``pre`` overrides ``tokenizer.ggml.pre`` (the pre-tokenizer; see PRE_TOKENIZER_SPLITS)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as _HFTokenizer

    reader = _reader(path)
    kind = _field(reader, path, "tokenizer.ggml.model", required=True)
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE, "
                              "'gpt2')")
    pre = pre or _field(reader, path, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported; known: "
                              f"{sorted(PRE_TOKENIZER_SPLITS)}")
    tokens = list(_field(reader, path, "tokenizer.ggml.tokens", required=True))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, path, "tokenizer.ggml.merges", required=True)]
    types = _field(reader, path, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = _HFTokenizer(models.BPE(_byte_level_vocab(tokens), merges, fuse_unk=False))
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = set(_bytes_to_unicode().values())
    control = [t for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]  # 3: llama.cpp CONTROL
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == 4]  # 4: USER_DEFINED, matched whole by llama.cpp
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    bos = _field(reader, path, "tokenizer.ggml.bos_token_id")
    if _field(reader, path, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           special_tokens=[(tokens[bos], int(bos))])
    return Tokenizer(tok, path)
