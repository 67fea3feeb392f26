"""The README's composable example runs as written (records -> tokens -> turns -> edit_sequence -> metrics)."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_example_runs(capsys):
    text = open(README, encoding="utf-8").read()
    match = re.search(r"<!-- example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its <!-- example --> block"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md:example", "exec"), namespace)
    metrics = namespace["metrics"]
    assert set(metrics["teacher_forced"]) >= {"efficacy", "generalization", "specificity"}
    assert 0.0 <= metrics["locality_vs_unedited"] <= 1.0
    assert namespace["result"].diagnostics["delta_norm"].shape == (2, 1)
    # on the default testbed most of the 200 edits are written (unedited: ~0.1) and the locality facts kept
    assert metrics["teacher_forced"]["efficacy"] > 0.6 and metrics["locality_vs_unedited"] > 0.95
    assert "efficacy" in capsys.readouterr().out
