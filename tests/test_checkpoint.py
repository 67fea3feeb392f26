import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lnjax as lx
from lnjax.io import checkpoint
from lnjax.models import get_module
from lnjax.engine.sequence import NonFiniteShift, edit_sequence

from fixtures import small_model_and_turns

TARGETS = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_editor_state_round_trip(tmp_path):
    ed = lx.editors.stableedit()
    state = ed.init({"a": (4, 3)})
    f = lx.Features(keys=jnp.arange(24.0).reshape(6, 4), value_grads=jnp.ones((6, 3)) * jnp.arange(6.0)[:, None])
    _, state = ed.update({"a": f}, state)
    path = checkpoint.save(str(tmp_path / "state"), state)
    back = checkpoint.load(path, ed.init({"a": (4, 3)}))
    for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(checkpoint.CheckpointError, match=r"item .stats\['5x3'\].count is missing"):
        checkpoint.load(path, ed.init({"a": (5, 3)}))
    per_target = lx.editors.stableedit(pooling="target")
    path2 = checkpoint.save(str(tmp_path / "state2"), per_target.init({"a": (4, 3)}))
    with pytest.raises(checkpoint.CheckpointError, match=r"item .stats\['a'\].mean has shape \(7,\)"):
        checkpoint.load(path2, per_target.init({"a": (5, 3)}))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint here"):
        checkpoint.load(str(tmp_path / "nothing"), state)


class _Crash(Exception):
    pass


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    model, tb = small_model_and_turns(6)
    ed = lx.editors.stableedit(lr=0.05, alpha=1.0)
    full = edit_sequence(model, ed, tb, TARGETS, chunk=2, progress=False)

    def crash_after_four(done, carry, diag):
        if done == 4:
            raise _Crash()

    ck = str(tmp_path / "ck")
    with pytest.raises(_Crash):
        edit_sequence(model, ed, tb, TARGETS, chunk=2, progress=False, checkpoint_dir=ck, callback=crash_after_four)
    assert checkpoint.RunCheckpointer(ck).steps() == [2]
    resumed = edit_sequence(model, ed, tb, TARGETS, chunk=2, progress=False, checkpoint_dir=ck, resume=True,
                            log=lambda m: None)
    for t in TARGETS:
        np.testing.assert_array_equal(np.asarray(get_module(full.params, t)["kernel"]),
                                      np.asarray(get_module(resumed.params, t)["kernel"]))
    for k in full.diagnostics:
        np.testing.assert_array_equal(full.diagnostics[k], resumed.diagnostics[k])
    # a damaged newest checkpoint falls back to the previous good one
    steps = checkpoint.RunCheckpointer(ck).steps()
    assert steps == [4, 6]
    newest = checkpoint.RunCheckpointer(ck).path(6)
    for root, _, files in os.walk(newest):
        for name in files:
            if name.endswith(".json") or "manifest" in name or name.startswith("_"):
                with open(os.path.join(root, name), "w") as f:
                    f.write("{garbage")
    messages = []
    again = edit_sequence(model, ed, tb, TARGETS, chunk=2, progress=False, checkpoint_dir=ck, resume=True,
                          log=messages.append)
    assert any("not usable" in m for m in messages) and any("resuming after 4" in m for m in messages)
    np.testing.assert_array_equal(np.asarray(get_module(again.params, TARGETS[0])["kernel"]),
                                  np.asarray(get_module(full.params, TARGETS[0])["kernel"]))


def test_resume_with_another_config_is_refused(tmp_path):
    model, tb = small_model_and_turns(2)
    ck = str(tmp_path / "ck")
    edit_sequence(model, lx.editors.ultraedit(lr=0.01), tb, TARGETS, chunk=1, progress=False, checkpoint_dir=ck)
    with pytest.raises(checkpoint.ConfigMismatch, match="editor"):
        edit_sequence(model, lx.editors.ultraedit(lr=0.02), tb, TARGETS, chunk=1, progress=False,
                      checkpoint_dir=ck, resume=True)


def test_non_finite_shifts_skip_or_stop(tmp_path):
    model, tb = small_model_and_turns(3)
    ed = lx.editors.ultraedit(lr=float("inf"))
    res = edit_sequence(model, ed, tb, TARGETS, chunk=2, progress=False)
    assert res.diagnostics["rejected"].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(np.asarray(get_module(res.params, TARGETS[0])["kernel"]),
                                  np.asarray(get_module(model.params, TARGETS[0])["kernel"]))
    with pytest.raises(NonFiniteShift, match="turn 0"):
        edit_sequence(model, ed, tb, TARGETS, chunk=2, progress=False, on_nonfinite="stop")


def test_killed_cli_run_resumes_to_identical_results(tmp_path):
    """SIGKILL a `lnjax run` at a random point after its first checkpoint, resume it, compare with a clean run."""
    import json
    import signal
    import subprocess
    import sys
    import time

    # one seed: the checkpoint directory then holds one run per editor (several seeds nest it under seed<N>/)
    args = ["--turns", "6", "--edits-per-turn", "10", "--eval-every", "1", "--editor", "stableedit,ultraedit",
            "--seeds", "1", "--no-generation", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "lnjax", "run", *args, "--out", str(clean)], check=True, env=env,
                   capture_output=True)
    ck = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-m", "lnjax", "run", *args, "--out", str(tmp_path / "killed"),
                             "--checkpoint-dir", str(ck)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rng = np.random.default_rng(int(time.time()))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ck / "stableedit").exists() and any(p.name.startswith("turn_") for p in (ck / "stableedit").iterdir()):
            break
        time.sleep(0.2)
    time.sleep(float(rng.uniform(0.0, 4.0)))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = tmp_path / "resumed"
    subprocess.run([sys.executable, "-m", "lnjax", "run", "--resume", str(ck), "--out", str(resumed), "--quiet"],
                   check=True, env=env, capture_output=True)
    a = json.loads((clean / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    a.pop("metadata"), b.pop("metadata")
    assert a == b
    assert (clean / "diagnostics.jsonl").read_text() == (resumed / "diagnostics.jsonl").read_text()
    # the final checkpoint's edited weights equal a clean checkpointed run's
    ck2 = tmp_path / "ck2"
    subprocess.run([sys.executable, "-m", "lnjax", "run", *args, "--out", str(tmp_path / "again"),
                    "--checkpoint-dir", str(ck2)], check=True, env=env, capture_output=True)
    for name in ("stableedit", "ultraedit"):
        r1, r2 = checkpoint.RunCheckpointer(str(ck / name)), checkpoint.RunCheckpointer(str(ck2 / name))
        assert r1.steps()[-1] == r2.steps()[-1] == (7 if name == "stableedit" else 6)
        f1 = checkpoint._load_flat(r1.path(r1.steps()[-1]))
        f2 = checkpoint._load_flat(r2.path(r2.steps()[-1]))
        kernels = [k for k in f1 if k.startswith("['carry'].kernels")]
        assert kernels
        for k in kernels:
            np.testing.assert_array_equal(np.asarray(f1[k]), np.asarray(f2[k]))


def test_diagnostics_log_truncates_and_refuses_gaps(tmp_path):
    log = checkpoint.DiagnosticsLog(str(tmp_path / "diag"))
    for start in (0, 3, 6):
        log.append(start, {"loss": np.arange(start, start + 3, dtype=np.float32)})
    np.testing.assert_array_equal(log.read(6)["loss"], np.arange(6))
    log.truncate(6)
    assert log.spans() == [(0, 3), (3, 6)]
    os.remove(os.path.join(log.directory, "diag_00000003_00000006.npz"))
    with pytest.raises(checkpoint.CheckpointError, match="stop at turn 3"):
        log.read(6)
    log.append(6, {"loss": np.zeros(3, np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        log.read(9)


def test_drop_states_deletes_the_checkpoints_and_keeps_the_diagnostics(tmp_path):
    """What ``trained_editor`` calls once a meta-trained net is saved: no resume state is left (they were 1-5 GB a
    network), the per-turn diagnostics stay readable."""
    ck = checkpoint.RunCheckpointer(str(tmp_path / "train"))
    carry = {"w": jnp.arange(6.0).reshape(2, 3)}
    for n in (2, 4, 6):
        ck.diagnostics.append(n - 2, {"loss": np.array([float(n), float(n) + 1])})
        ck.save(n, carry, {"a": 1})
    assert ck.steps() == [4, 6]
    ck.drop_states()
    assert ck.steps() == [] and ck.latest(carry, {"a": 1}) is None
    np.testing.assert_array_equal(ck.diagnostics.read(6)["loss"], [2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
