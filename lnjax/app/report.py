"""What a run of ``lnjax run`` writes and prints: diagnostics lines, metadata, the run directory, the table.

A run directory holds ``config.json``, ``results.json`` (``{"editors": {name: metrics}, "metadata": {...},
"unedited": metrics}``), ``diagnostics.jsonl`` (one line per editor and turn) and PNG plots.
"""

from __future__ import annotations

import json
import os
import platform

import jax
import numpy as np

from lnjax.core.turns import IGNORE
from lnjax.models import get_module

PROTOCOL_NOTES = {"teacher_forced": "argmax token accuracy on answer positions, mean over examples",
                  "locality_vs_unedited": "argmax agreement with the unedited model on locality prompts",
                  "generation_exact_match": "greedy generation of len(answer) tokens equals the answer"}


def diagnostics_lines(editor: str, diagnostics: dict, targets) -> list[dict]:
    """One JSON-able line per scheduled turn of ``edit_sequence`` diagnostics (``track_accuracy`` on): turn,
    target turn, warm-up flag, loss, rows, accuracy, per-target shift norm and cosine, counts, rejections."""
    d = diagnostics
    return [{
        "editor": editor, "turn": i, "target_turn": int(d["target_turn"][i]), "warmup": bool(d["warmup"][i]),
        "loss": float(d["loss"][i]), "rows": int(d["rows"][i]), "accuracy": float(d["accuracy"][i]),
        "delta_norm": {t: float(x) for t, x in zip(targets, d["delta_norm"][i])},
        "cosine": {t: float(x) for t, x in zip(targets, d["cosine"][i])},
        "count": [int(x) for x in d["count"][i]], "rejected": int(d["rejected"][i]),
    } for i in range(len(d["loss"]))]


def metadata(config: dict, *, params, targets, edit_labels: np.ndarray, warmup_turns: dict, skipped: list,
             timings: dict, total_seconds: float, world_facts=None) -> dict:
    """The ``metadata`` of results.json: sizes (edits, rows edited per key dimension), warm-up turns, skipped
    rows, timings, host and the protocol notes. ``edit_labels`` are the packed edit turns' labels; ``world_facts``
    the world's fact count on the world dataset (None otherwise)."""
    n = config["turns"] * config["edits_per_turn"]
    rows_edited = int((np.asarray(edit_labels) != IGNORE).sum())
    d_in_total = sum(int(get_module(params, t)["kernel"].shape[0]) for t in targets)
    return {
        "edits": n, "turns": config["turns"], "edits_per_turn": config["edits_per_turn"], "targets": list(targets),
        "warmup_turns": warmup_turns, "rows_edited": rows_edited, "sum_d_in": d_in_total,
        "rows_per_key_dim": rows_edited / d_in_total,
        "edited_fraction_of_world_facts": (n / world_facts) if world_facts else None,
        "skipped_rows": skipped, "timings": timings, "total_seconds": total_seconds,
        "host": {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
                 "devices": [str(x) for x in jax.devices()]},
        "protocols": dict(PROTOCOL_NOTES),
    }


def write_config_and_results(out_dir: str, config: dict, results: dict) -> None:
    """``config.json`` and ``results.json`` (indented JSON) in ``out_dir``, created if needed."""
    os.makedirs(out_dir, exist_ok=True)
    for name, obj in (("config.json", config), ("results.json", results)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)


def write_run_dir(out_dir: str, config: dict, results: dict, diag_lines: list[dict]) -> None:
    """Write ``config.json`` (the JSON ``config``), ``results.json``, ``diagnostics.jsonl`` and the plots into
    ``out_dir``."""
    if jax.process_index() != 0:  # multi-host: every process computes the same results; one writes them
        return
    write_config_and_results(out_dir, config, results)
    with open(os.path.join(out_dir, "diagnostics.jsonl"), "w") as f:
        for line in diag_lines:
            f.write(json.dumps(line) + "\n")
    from lnjax.app.plots import plot_run
    plot_run(out_dir, results, diag_lines)


def format_table(results: dict) -> str:
    """A plain-text table of the headline metrics per editor."""
    head = f"{'editor':<24}{'ES':>8}{'GS':>8}{'LS':>8}{'loc~base':>10}{'gen ES':>8}{'gen GS':>8}"
    lines = ["teacher-forced ES/GS/LS; loc~base = locality vs unedited model; gen = greedy exact match", head,
             "-" * len(head)]
    rows = [("(unedited)", results.get("unedited"))] + list(results["editors"].items())
    for name, m in rows:
        if not m:
            continue
        tf = m["teacher_forced"]
        gen = m.get("generation_exact_match", {})
        lines.append(f"{name:<24}{tf['efficacy']:>8.3f}{tf['generalization']:>8.3f}{tf['specificity']:>8.3f}"
                     f"{m['locality_vs_unedited']:>10.3f}{gen.get('efficacy', float('nan')):>8.3f}"
                     f"{gen.get('generalization', float('nan')):>8.3f}")
    return "\n".join(lines)
