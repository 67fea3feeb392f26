"""Sharded runs on 8 simulated CPU devices agree with the single-device run."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    import lnjax as lx
    from lnjax.core.turns import pack_turns
    from lnjax.models import Model, ModelConfig, get_module, init_params
    from lnjax.engine.sharding import make_mesh
    assert len(jax.devices()) == 8
    cfg = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(0), std=0.2))
    rng = np.random.default_rng(0)
    ex = [(list(rng.integers(1, 64, rng.integers(2, 6))), list(rng.integers(1, 64, rng.integers(1, 3))))
          for _ in range(48)]
    tb = pack_turns(ex, 16)[0]
    T = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    # shifts of about a tenth of the weights' size, as in real edits
    ed = lx.editors.stableedit(lr=0.002, alpha=1.0)
    a = lx.edit_sequence(model, ed, tb, T, chunk=2, progress=False)
    w0 = {t: np.asarray(get_module(model.params, t)["kernel"], np.float64) for t in T}
    for spec in ("data=2,model=4", "data=8", "model=8"):
        b = lx.edit_sequence(model, ed, tb, T, chunk=2, progress=False, mesh=make_mesh(spec))
        for t in T:
            x = np.asarray(get_module(a.params, t)["kernel"], np.float64)
            y = np.asarray(get_module(b.params, t)["kernel"], np.float64)
            rel = np.linalg.norm(x - y) / np.linalg.norm(x)
            shift = np.linalg.norm(x - w0[t]) / np.linalg.norm(x)
            assert 0.02 < shift and rel < 1e-6, (spec, t, rel, shift)
            print(spec, t, "relative difference", rel, "shift/weights", shift)
        sh = get_module(b.params, T[0])["kernel"].sharding
        assert len(sh.device_set) > 1, sh
    print("SHARDING-OK")
''')


def test_sharded_run_matches_single_device():
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert "SHARDING-OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_mesh_spec_errors():
    import pytest

    from lnjax.engine.sharding import make_mesh
    with pytest.raises(ValueError, match="expected entries like"):
        make_mesh("data=two")
    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh("data=8,model=8")
