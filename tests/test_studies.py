"""Every study script runs in --quick mode (seconds), so the scripts do not rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("study", ["ln_onoff", "cumulative", "theory", "ablations", "meta_curves"])
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


def test_published_commands_parse_and_match_the_presets():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import published

    from lnjax.app import presets
    from lnjax.app.cli import build_parser

    for model in presets.MODELS:
        for dataset, (_, _, n_edits) in published.DATASETS.items():
            for method in ("stableedit", "ultraedit"):
                cmd = published.command(model, dataset, method, "/w", "/d", "/o")
                args = build_parser().parse_args(cmd[1:])
                p = presets.get(model, method)
                assert args.targets == p.targets and args.lr == p.lr and args.alpha == p.alpha
                assert args.turns * args.edits_per_turn == n_edits and args.dtype == "bfloat16"
                assert (args.train_data is not None) == (p.warmup_turns > 0)
