"""``lnjax run --distributed`` for real: two processes on this machine (one CPU device each, ``--mesh data=2``
spanning both) against one process with two devices, checkpoints moved between the two set-ups, and a process
killed mid-run. Each command is the one BUILD.md documents; ports are picked free at run time."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lnjax.io import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--model", os.path.join(ROOT, "lnjax", "assets", "world_model"), "--editor", "ultraedit", "--lr", "0.01",
        "--alpha", "1", "--turns", "4",
        "--edits-per-turn", "8", "--eval-every", "1", "--no-generation", "--quiet", "--mesh", "data=2"]
TIMEOUT = 150  # seconds any one command may take before the test calls it a hang


def _env(devices: int) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env.pop("JAX_DEFAULT_MATMUL_PRECISION", None)  # as a user runs it (both set-ups alike)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(*extra) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "lnjax", "run", *ARGS, *extra], env=_env(2), capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _pair(*extra, heartbeat: int = 10) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "lnjax", "run", *ARGS, *extra, "--distributed", "--coordinator",
                              f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                              "--heartbeat-timeout", str(heartbeat)],
                             env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs) -> list[str]:
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process of the pair hung")
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def _results(out_dir) -> dict:
    with open(os.path.join(out_dir, "results.json")) as f:
        res = json.load(f)
    res.pop("metadata")
    return res


def _assert_close(a, b, path="results"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-6 or (np.isnan(a) and np.isnan(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _same_run(dir_a, dir_b):
    _assert_close(_results(dir_a), _results(dir_b))
    lines_a = [json.loads(x) for x in open(os.path.join(dir_a, "diagnostics.jsonl"))]
    lines_b = [json.loads(x) for x in open(os.path.join(dir_b, "diagnostics.jsonl"))]
    _assert_close(lines_a, lines_b, "diagnostics")


def _final_kernels(ck) -> dict:
    r = checkpoint.RunCheckpointer(os.path.join(ck, "ultraedit"))
    flat = checkpoint._load_flat(r.path(r.steps()[-1]))
    return {k: np.asarray(v) for k, v in flat.items() if k.startswith("['carry'].kernels")}


def _interrupted_copy(ck, dst) -> str:
    """A copy of the finished run ``ck`` as if it had been stopped after its next-to-last checkpoint."""
    shutil.copytree(ck, dst)
    run = checkpoint.RunCheckpointer(os.path.join(dst, "ultraedit"))
    os.remove(os.path.join(run.directory, checkpoint.DONE_FILE))
    shutil.rmtree(run.path(run.steps()[-1]))
    return dst


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run (two devices, the same mesh) every multi-process run must equal: (out, checkpoints)."""
    tmp = tmp_path_factory.mktemp("reference")
    _single("--out", str(tmp / "ref"), "--checkpoint-dir", str(tmp / "ck_ref"))
    return tmp / "ref", tmp / "ck_ref"


def test_two_processes_equal_one_and_checkpoints_cross_over(tmp_path, reference):
    t0 = time.time()
    ref, ck_ref = reference
    pair, ck_pair = tmp_path / "pair", tmp_path / "ck_pair"
    _finish(_pair("--out", str(pair), "--checkpoint-dir", str(ck_pair)))
    _same_run(ref, pair)
    k_ref, k_pair = _final_kernels(str(ck_ref)), _final_kernels(str(ck_pair))
    assert k_ref and set(k_ref) == set(k_pair)
    for k in k_ref:
        np.testing.assert_allclose(k_pair[k], k_ref[k], rtol=0, atol=1e-6)
    # the pair's checkpoint resumed by one process, and one process's by the pair
    one = tmp_path / "resumed_by_one"
    _single("--resume", _interrupted_copy(str(ck_pair), str(tmp_path / "ck_pair_cut")), "--out", str(one))
    _same_run(ref, one)
    two = tmp_path / "resumed_by_pair"
    _finish(_pair("--resume", _interrupted_copy(str(ck_ref), str(tmp_path / "ck_ref_cut")), "--out", str(two)))
    _same_run(ref, two)
    print(f"two-process equivalence and cross-resume: {time.time() - t0:.0f}s")


def test_killed_process_stops_its_partner_and_the_pair_resumes(tmp_path, reference):
    ref = reference[0]
    ck = tmp_path / "ck"
    procs = _pair("--out", str(tmp_path / "killed"), "--checkpoint-dir", str(ck))
    deadline = time.time() + TIMEOUT
    first = ck / "ultraedit"
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if first.exists() and any(x.name.startswith("turn_") for x in first.iterdir()):
            break
        time.sleep(0.1)
    assert all(p.poll() is None for p in procs), "the pair finished (or failed) before it could be killed"
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    try:
        _, err = procs[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("process 0 hung after process 1 was killed")
    waited = time.time() - t_kill
    procs[1].wait()
    assert procs[0].returncode != 0
    # one of two clear endings: lnjax's one line (a collective failed) or the JAX runtime's own fatal message
    assert ("lnjax: error: process 0 of 2" in err) or ("another task died" in err) or ("heartbeat" in err), \
        err[-3000:]
    last = [x for x in err.strip().splitlines() if x.strip() and not x.startswith("    @")][-3:]
    print(f"process 0 stopped {waited:.1f}s after process 1 was killed (exit {procs[0].returncode}); it printed, "
          "last:\n" + "\n".join(x[:300] for x in last))
    resumed = tmp_path / "resumed"
    _finish(_pair("--resume", str(ck), "--out", str(resumed)))
    _same_run(ref, resumed)
