"""Every study script runs in --quick mode (seconds), so the scripts do not rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("study", ["ln_onoff", "cumulative", "theory", "ablations"])
def test_study_quick_mode(study, tmp_path):
    out = tmp_path / "studies"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "studies.py"), study, "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = out / study
    assert (d / "summary.md").read_text().startswith("#")
    results = json.loads((d / "results.json").read_text())
    assert results and json.loads((d / "config.json").read_text()) is not None
