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
    EXPECT[study](results)


def _moved(m, base):
    """Whether an edited model's metrics differ from ``base``'s (teacher-forced ES/GS and locality)."""
    key = lambda r: (r["teacher_forced"]["efficacy"], r["teacher_forced"]["generalization"], r["locality_vs_unedited"])
    return key(m) != key(base)


def _ln_onoff(r):
    # every editor edits (its metrics leave the unedited model's) and no turn is rejected
    for name, m in r["editors"].items():
        assert m["rejected_turns"] == 0 and _moved(m, r["unedited"]), name


def _cumulative(r):
    # the early stream changes what the late edits achieve; one right-after accuracy per turn
    for name, m in r["editors"].items():
        assert _moved(m["late_after_early"], m["late_alone"]), name
        assert len(m["turn_accuracy_right_after"]) == r["turns"]


def _theory(r):
    # every turn shifts the weights, and consecutive shifts are near orthogonal (quick: measured |cos| 0.03, 0.001)
    for label, v in r.items():
        assert min(v["delta_norm"]) > 0 and v["mean_abs_cosine_second_half"] < 0.5, label


def _ablations(r):
    # the whitening switch changes the result (quick: diagonal ES 0.33 vs full 0.08)
    assert r["whitening"]["full"] != r["whitening"]["diagonal"]


def _meta_curves(r):
    # one finite loss per meta-training turn: a positive generalization CE and a non-negative locality KL (--quick
    # trains 2 turns, too few for the loss to fall: measured 131.85 -> 131.95)
    for name, c in r.items():
        assert len(c["gen_loss"]) == len(c["loc_loss"]) >= 1, name
        assert all(0 < g < float("inf") for g in c["gen_loss"]) and all(0 <= x < float("inf") for x in c["loc_loss"])


EXPECT = {"ln_onoff": _ln_onoff, "cumulative": _cumulative, "theory": _theory, "ablations": _ablations,
          "meta_curves": _meta_curves}


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
