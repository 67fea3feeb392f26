"""The embedded world model and the main job, on small settings (the full default run is a benchmark)."""

import json
import os

import numpy as np
import pytest

from lnjax.world import world_model
from lnjax.app.cli import main
from lnjax.world import default_world


def test_shipped_model_knows_its_world():
    model = world_model.default_model()
    world = default_world()
    rep = world_model.report()
    assert min(rep["accuracy_by_wording"]) >= 0.95
    # an independent sample, every wording, scored here
    rng = np.random.default_rng(0)
    idx = rng.choice(world.n_facts, 600, replace=False)
    from lnjax.core.turns import pack
    accs = []
    for examples in world_model.fact_examples(world):
        accs.append(world_model.fact_accuracy(model.config, model.params, pack([examples[i] for i in idx])))
    assert min(accs) >= 0.95, accs


def test_lnjax_run_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--turns", "2", "--edits-per-turn", "20", "--eval-every", "1", "--out", str(out), "--quiet",
                 "--editor", "stableedit,no_normalization", "--seeds", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "stableedit" in printed and "no_normalization" in printed and "loc~base" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"editors", "metadata"}
    for name in ("stableedit", "no_normalization"):
        m = results["editors"][name]
        assert set(m["teacher_forced"]) >= {"efficacy", "generalization", "specificity"}
        assert 0.0 <= m["locality_vs_unedited"] <= 1.0
        assert set(m["generation_exact_match"]) == {"efficacy", "generalization"}
        assert [c["turns"] for c in m["during_run"]] == [1, 2]
    # on the default testbed StableEdit writes most of the 40 edits and keeps the kept facts; the no-normalization
    # ablation writes next to nothing (measured ES 0.83 and 0.06, unedited 0.06; locality 1.0)
    es = {name: results["editors"][name]["teacher_forced"]["efficacy"] for name in ("stableedit", "no_normalization")}
    assert es["stableedit"] > results["unedited"]["teacher_forced"]["efficacy"] + 0.4
    assert es["stableedit"] > es["no_normalization"] + 0.4
    assert results["editors"]["stableedit"]["locality_vs_unedited"] > 0.9
    assert results["metadata"]["warmup_turns"] == {"stableedit": 1, "no_normalization": 0}
    lines = [json.loads(x) for x in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 + 2 and lines[0]["warmup"] and lines[0]["target_turn"] == -1
    for png in ("metrics.png", "updates.png"):
        assert (out / png).stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["turns"] == 2


def test_two_runs_of_one_config_differ_only_in_metadata(tmp_path):
    outs = []
    for i in range(2):
        main(["run", "--turns", "1", "--edits-per-turn", "10", "--editor", "ultraedit", "--no-generation",
              "--eval-every", "0", "--out", str(tmp_path / f"r{i}"), "--quiet", "--seeds", "1"])
        r = json.loads((tmp_path / f"r{i}" / "results.json").read_text())
        r.pop("metadata")
        outs.append(r)
    assert outs[0] == outs[1]


def test_cli_refuses_unknown_editor(capsys):
    assert main(["run", "--editor", "rome", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lnjax: error: --editor: unknown editor") and err.count("\n") == 1, err


def test_default_testbed_writes_the_edits_and_keeps_locality(tmp_path):
    """The main job's claim on a shorter run: on the default testbed UltraEdit writes 500 sequential edits and keeps
    the locality facts; the same solve without normalization, at the same lr, writes nothing."""
    out = tmp_path / "run"
    assert main(["run", "--turns", "5", "--edits-per-turn", "100", "--editor", "ultraedit,no_normalization",
                 "--no-generation", "--eval-every", "0", "--out", str(out), "--quiet", "--seeds", "1"]) == 0
    r = json.loads((out / "results.json").read_text())
    base = r["unedited"]["teacher_forced"]["efficacy"]
    ue, nn = r["editors"]["ultraedit"], r["editors"]["no_normalization"]
    assert base < 0.2
    assert ue["teacher_forced"]["efficacy"] > 0.8 and ue["teacher_forced"]["generalization"] > 0.75
    assert ue["locality_vs_unedited"] > 0.98
    assert nn["teacher_forced"]["efficacy"] < base + 0.05
