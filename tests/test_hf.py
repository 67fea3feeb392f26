"""Parity with `transformers` on tiny random models built and saved by the tests themselves (offline)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lnjax as lx  # noqa: E402
from lnjax.io.hf import CheckpointError  # noqa: E402
from lnjax.models import get_module, with_module_leaf  # noqa: E402
from fixtures import world_config  # noqa: E402

V = 101


def _configs():
    T = transformers
    rope31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 4}
    return {
        "gpt2": T.GPT2Config(vocab_size=V, n_embd=24, n_layer=2, n_head=3, n_positions=32, n_inner=40),
        "gptj": T.GPTJConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32,
                             n_inner=48),
        "llama": T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, rope_scaling=rope31,
                               rope_theta=500000.0, attention_bias=True),
        "mistral": T.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=12, sliding_window=4),
        "qwen2": T.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    }


def _build(arch, tmp_path):
    torch.manual_seed(0)
    cfg = _configs()[arch]
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    out = tmp_path / arch
    model.save_pretrained(out)
    return model, str(out)


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0    # right padding
    mask[2, 3:] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "mistral", "qwen2"])
def test_logits_match_transformers(arch, tmp_path):
    hf_model, path = _build(arch, tmp_path)
    ids, mask = _batch()
    model = lx.hf.load(path, dtype="float32")
    ours = np.asarray(jax.jit(model.apply)(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    ref = _hf_logits(hf_model, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edit_save_and_reload_with_transformers(arch, tmp_path):
    _, path = _build(arch, tmp_path)
    model = lx.hf.load(path)
    target = {"llama": "model.layers.1.mlp.down_proj", "gpt2": "transformer.h.1.mlp.c_proj"}[arch]
    kernel = get_module(model.params, target)["kernel"]
    edited = with_module_leaf(model.params, target, "kernel", kernel + 0.3 * jnp.ones_like(kernel))
    out = str(tmp_path / "edited")
    lx.hf.save(model, edited, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = _batch()
    ours = np.asarray(model.apply(edited, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], _hf_logits(reloaded, ids, mask)[valid], atol=1e-5, rtol=1e-5)
    again = lx.hf.load(out)
    np.testing.assert_array_equal(np.asarray(get_module(again.params, target)["kernel"]),
                                  np.asarray(get_module(edited, target)["kernel"]))


def test_bfloat16_load_and_forward(tmp_path):
    _, path = _build("llama", tmp_path)
    model = lx.hf.load(path, dtype="bfloat16")
    assert get_module(model.params, "model.layers.0.mlp.up_proj")["kernel"].dtype == jnp.bfloat16
    ids, mask = _batch()
    logits = model.apply(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    ref = lx.hf.load(path).apply(lx.hf.load(path).params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.2 * np.abs(np.asarray(ref)).max()


def test_sharded_checkpoint_loads(tmp_path):
    hf_model, _ = _build("qwen2", tmp_path)
    out = tmp_path / "sharded"
    hf_model.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    model = lx.hf.load(str(out))
    ids, mask = _batch()
    ours = np.asarray(model.apply(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], _hf_logits(hf_model, ids, mask)[valid], atol=1e-5, rtol=1e-5)
    # a missing shard is named
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(out / shard)
    with pytest.raises(CheckpointError, match=f"shard file '{shard}' is missing"):
        lx.hf.load(str(out))


def test_bad_checkpoints_are_named(tmp_path):
    _, path = _build("llama", tmp_path)
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    # truncated safetensors
    st = os.path.join(path, "model.safetensors")
    data = open(st, "rb").read()
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lx.hf.load(str(bad))
    # shape mismatch: config says a wider MLP than the tensors hold
    (bad / "model.safetensors").write_bytes(data)
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 60}))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.\w+_proj.weight' has shape \("):
        lx.hf.load(str(bad))
    # unknown model type, unsupported option
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'mamba'"):
        lx.hf.load(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "pretraining_tp": 2}))
    with pytest.raises(CheckpointError, match="unsupported config option pretraining_tp=2"):
        lx.hf.load(str(bad))
    rope = dict(cfg.get("rope_parameters") or {})
    rope["rope_type"] = "yarn"
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_parameters": rope}))
    with pytest.raises(CheckpointError, match="rope_type='yarn'"):
        lx.hf.load(str(bad))
    # missing tensors are listed by name
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.2"):
        lx.hf.load(str(bad))
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        lx.hf.load(str(tmp_path / "nowhere"))


def test_full_size_configs_instantiate_abstractly():
    """eval_shape of the four published 7B/8B models' forward passes, nothing allocated."""
    for name, hf in lx.presets.MODELS.items():
        cfg = lx.hf.config_from_hf(hf, name)
        params = lx.models.abstract_params(cfg, jnp.bfloat16)
        n = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
        assert 5.5e9 < n < 8.5e9, (name, n)
        ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
        out = jax.eval_shape(lx.models.apply_fn(cfg), params, ids, ids)
        assert out.shape == (1, 16, cfg.vocab_size)


def test_presets_name_real_modules():
    for model_name in lx.presets.MODELS:
        for method in ("ultraedit", "stableedit"):
            preset = lx.presets.get(model_name, method)
            assert preset.targets and preset.lr > 0
            cfg = lx.hf.config_from_hf(lx.presets.MODELS[model_name], model_name)
            params = lx.models.abstract_params(cfg)
            for t in preset.targets:
                assert "kernel" in get_module(params, t)
    assert lx.presets.targets("llama3-8b", "stableedit")[0] == "model.layers.11.mlp.down_proj"


def test_lnjax_built_model_exports_to_transformers_with_tokenizer(tmp_path):
    """A model that never came from HF (config generated by lnjax) and the world tokenizer round-trip."""
    from lnjax.world import World, WorldSpec

    world = World(WorldSpec(n_subjects=40))
    cfg = world_config(len(world.vocab))
    params = lx.models.init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    model = lx.models.Model(cfg, params)
    out = str(tmp_path / "export")
    lx.hf.save(model, params, out)
    world.save_tokenizer(out)
    tok = lx.hf.load_tokenizer(out)
    text = world.prompt(3, 1, 0)
    assert tok.encode(text) == world.tokenizer().encode(text) and tok.encode(text)[0] == 1
    assert tok.decode(tok.encode(" " + world.answer(3, 1), False)) == world.answer(3, 1)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = _batch()
    ours = np.asarray(model.apply(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], _hf_logits(hf_model, ids, mask)[valid], atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="tokenizer.json: file not found"):
        lx.hf.load_tokenizer(str(tmp_path))
