"""What a run of ``lnjax run`` writes and prints: diagnostics lines, metadata, the run directory, the table.

A run directory holds ``config.json``, ``results.json`` (``{"editors": {name: metrics}, "metadata": {...},
"unedited": metrics}``), ``diagnostics.jsonl`` (one line per editor and turn) and PNG plots.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Optional

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


def metadata(config: dict, *, params, targets, edit_labels: np.ndarray, warmup_turns: dict,
             timings: dict, total_seconds: float, world_facts=None) -> dict:
    """The ``metadata`` of results.json: sizes (edits, rows edited per key dimension), warm-up turns,
    timings, host and the protocol notes (the data rows skipped are results.json's ``data``, ``data_section``). ``edit_labels`` are the packed edit turns' labels; ``world_facts``
    the world's fact count on the world dataset (None otherwise)."""
    n = config["turns"] * config["edits_per_turn"]
    rows_edited = int((np.asarray(edit_labels) != IGNORE).sum())
    d_in_total = sum(int(get_module(params, t)["kernel"].shape[0]) for t in targets)
    return {
        "edits": n, "turns": config["turns"], "edits_per_turn": config["edits_per_turn"], "targets": list(targets),
        "warmup_turns": warmup_turns, "rows_edited": rows_edited, "sum_d_in": d_in_total,
        "rows_per_key_dim": rows_edited / d_in_total,
        "edited_fraction_of_world_facts": (n / world_facts) if world_facts else None,
        "timings": timings, "total_seconds": total_seconds,
        "host": {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
                 "devices": [str(x) for x in jax.devices()]},
        "protocols": dict(PROTOCOL_NOTES),
    }


def data_section(source: Optional[str], read_report) -> dict:
    """results.json's ``data``: the file read, its layout, rows read and every row skipped as unusable
    (``{file, row, field, reason}``, ``lnjax.data.UnusableRow``) with their count ``n_skipped``."""
    return {"file": source, "layout": read_report.layout, "rows_read": read_report.rows,
            "n_skipped": len(read_report.skipped), "skipped": list(read_report.skipped)}


def write_json(path: str, obj, indent: int = 1) -> None:
    """``obj`` as indented JSON at ``path`` (parent folders created), written to a temporary file and renamed so
    that a killed script never leaves half a results file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def logged_rows(path: Optional[str]) -> list[dict]:
    """The scored JSON rows (``{"editor": ..., "score": ...}`` lines) a tuning script printed to its log ``path``,
    in order, so that an interrupted tuning run can reuse them (its edits and probes are deterministic); [] without
    a path. Lines that are not JSON objects, and the ``"chosen"`` summary lines, are left out."""
    if not path:
        return []
    with open(path) as f:
        return [json.loads(line) for line in f
                if line.startswith("{") and '"score"' in line and '"chosen"' not in line]


def write_config_and_results(out_dir: str, config: dict, results: dict) -> None:
    """``config.json`` and ``results.json`` (indented JSON) in ``out_dir``, created if needed."""
    for name, obj in (("config.json", config), ("results.json", results)):
        write_json(os.path.join(out_dir, name), obj, indent=2)


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


# The metrics a multi-seed run reports with a spread (``lnjax.app.run``: mean ± sample std over the edit seeds).
HEADLINE = ("teacher_forced", "locality_vs_unedited", "generation_exact_match", "locality_families")


def mean_tree(items: list):
    """The element-wise mean of equally shaped JSON-like trees (dicts, lists, numbers); other leaves (strings,
    booleans, None) are taken from the first tree; keys or lengths not shared by all are dropped."""
    first = items[0]
    if isinstance(first, dict):
        return {k: mean_tree([t[k] for t in items]) for k in first if all(isinstance(t, dict) and k in t
                                                                           for t in items)}
    if isinstance(first, list):
        if all(isinstance(t, list) and len(t) == len(first) for t in items):
            return [mean_tree([t[i] for t in items]) for i in range(len(first))]
        return first
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in items):
        return float(np.mean(items))
    return first


def std_tree(items: list):
    """The element-wise sample standard deviation (ddof 1; 0 for one tree) of the numbers of equally shaped
    dict trees; non-numbers are dropped."""
    first = items[0]
    if isinstance(first, dict):
        out = {k: std_tree([t[k] for t in items]) for k in first if all(isinstance(t, dict) and k in t
                                                                        for t in items)}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return float(np.std(items, ddof=1)) if len(items) > 1 else 0.0
    return None


def format_table(results: dict) -> str:
    """A plain-text table of the headline metrics per editor (mean ± spread over the seeds of a multi-seed run;
    on the fair protocol also each editor's lr and locality per family: subject / nearest key / shared answer)."""
    if any("locality_families" in m for m in results["editors"].values()):
        return _format_fair_table(results)
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


def _format_fair_table(results: dict) -> str:
    seeds = results.get("metadata", {}).get("seeds") or [None]

    def cell(m: dict, path: tuple) -> str:
        value, spread = m, m.get("spread", {})
        for k in path:
            value, spread = value[k], (spread or {}).get(k)
        return f"{value:.3f}" + (f"±{spread:.3f}" if isinstance(spread, float) and len(seeds) > 1 else "")

    cols = [("ES", ("teacher_forced", "efficacy")), ("GS", ("teacher_forced", "generalization")),
            ("loc~base", ("locality_vs_unedited",)), ("subject", ("locality_families", "subject")),
            ("nearest", ("locality_families", "nearest_key")), ("shared ans", ("locality_families", "shared_answer"))]
    w = 14 if len(seeds) > 1 else 9
    head = f"{'editor':<24}{'lr':>8}" + "".join(f"{c:>{w}}" for c, _ in cols)
    lines = [f"fair protocol (lnjax.world.fair): teacher-forced ES / GS; locality vs the unedited model on random "
             f"kept facts (loc~base) and per family; mean ± std over {len(seeds)} edit seed(s)", head, "-" * len(head)]
    un = results.get("unedited")
    if un:
        lines.append(f"{'(unedited)':<24}{'':>8}{un['teacher_forced']['efficacy']:>{w}.3f}"
                     f"{un['teacher_forced']['generalization']:>{w}.3f}")
    for name, m in results["editors"].items():
        lr = m.get("settings", {}).get("lr")
        lines.append(f"{name:<24}{'' if lr is None else f'{lr:.3g}':>8}"
                     + "".join(f"{cell(m, p):>{w}}" for _, p in cols))
    return "\n".join(lines)
