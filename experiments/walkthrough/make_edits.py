"""Write the example edit files of the README's "Keeping a model up to date" walk-through (``lnjax edit``).

    python experiments/walkthrough/make_edits.py          # rewrites experiments/walkthrough/edits/ (deterministic; tests/test_edit.py checks it)

Counterfactual corrections of the embedded world's facts (``lnjax.world``'s ``edit`` pool) for the default
testbed: ``week1.json``, 200 edits in the ZsRE layout that ``lnjax.data.read`` reads (as a published dataset
file looks), and ``week2.jsonl``, the next 100 as plain JSON lines of ``prompt``, ``target`` and
``paraphrase`` (as a team writes its own); ``probe.jsonl``, 100 facts drawn from the world's ``locality``
pool (never edited) that must not change, as ``prompt`` and ``answer``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lnjax.world import default_world

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edits")
WEEK1, WEEK2, PROBES = 200, 100, 100


def files() -> dict:
    """File name -> text of every example file."""
    w = default_world()
    records = w.records("edit", WEEK1 + WEEK2, seed=0)
    week1 = json.dumps(records[:WEEK1], indent=1, ensure_ascii=False) + "\n"
    week2 = "".join(json.dumps({"prompt": r["src"], "target": r["ans"], "paraphrase": r["rephrase"]},
                               ensure_ascii=False) + "\n" for r in records[WEEK1:])
    pool = w.all_facts("locality")
    facts = pool[np.random.default_rng(0).permutation(len(pool))[:PROBES]]
    probes = "".join(json.dumps({"prompt": w.prompt(int(s), int(r), 0), "answer": w.answer(int(s), int(r))},
                                ensure_ascii=False) + "\n" for s, r in facts)
    return {"week1.json": week1, "week2.jsonl": week2, "probe.jsonl": probes}


def main() -> None:
    os.makedirs(HERE, exist_ok=True)
    for name, text in files().items():
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            f.write(text)
        print(os.path.join(HERE, name))


if __name__ == "__main__":
    main()
