"""``lnjax edit`` on a real checkpoint (issue 26): SmolLM2-135M-Instruct, two invocations of 20 real-fact edits
each (2 turns of 10), the second exporting the edited model; then transformers loads the export and its logits are
compared with lnjax's edited model, and the exported tokenizer with the model's.

    python experiments/edit_smollm2.py          # writes experiments/results/edit_smollm2/result.json

A check of the tool on a real model (export parity, the ledger's numbers), not a study: 20 edits per batch say
little about the editors (experiments/REPORT.md has the SmolLM2 study).
"""

import json
import os
import shutil
import tempfile
import time

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "edit_smollm2")


def main() -> None:
    import torch
    import transformers

    from lnjax.app.cli import main as cli
    from lnjax.app.edit import EditSession, read_history
    from lnjax.data import facts
    from lnjax.io import hf

    t0 = time.time()
    work = tempfile.mkdtemp(prefix="edit_smollm2.")
    recs = facts.edit_records("edit", 40, seed=0)
    for name, part in (("b1.jsonl", recs[:20]), ("b2.jsonl", recs[20:])):
        with open(os.path.join(work, name), "w") as f:
            for r in part:
                f.write(json.dumps({"prompt": r.prompt, "target": r.target, "paraphrase": r.paraphrase}) + "\n")
    with open(os.path.join(work, "probe.jsonl"), "w") as f:  # the edit records' own locality facts (never edited)
        for r in recs:
            f.write(json.dumps({"prompt": r.loc_prompt, "answer": r.loc_answer}) + "\n")
    state, export = os.path.join(work, "state"), os.path.join(work, "export")
    commands = [["--model", "smollm2", "--edits-per-turn", "10", "--edits", os.path.join(work, "b1.jsonl")],
                ["--edits", os.path.join(work, "b2.jsonl"), "--export", export]]
    for extra in commands:
        assert cli(["edit", "--state", state, "--probe", os.path.join(work, "probe.jsonl"), "--quiet"] + extra) == 0
    with EditSession.open(state) as s:
        params, model, tok = s.params, s.model, s.tokenizer
        settings = s.settings
    exported_tok = hf.load_tokenizer(export)
    prompts = [r.prompt for r in recs[:8]]
    same_tokens = all(exported_tok.encode(p) == tok.encode(p) for p in prompts)
    ids = [tok.encode(p) for p in prompts]
    arr = np.zeros((len(ids), max(map(len, ids))), np.int32)
    mask = np.zeros_like(arr)
    for i, x in enumerate(ids):
        arr[i, :len(x)], mask[i, :len(x)] = x, 1
    ours = np.asarray(model.apply(params, arr, mask))
    ref = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(arr, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    valid = mask.astype(bool)
    result = {"command": "python experiments/edit_smollm2.py", "settings": settings,
              "ledger": read_history(state), "same_tokenization": same_tokens,
              "max_abs_logit_diff_transformers_vs_lnjax": float(np.abs(ours[valid] - theirs[valid]).max()),
              "max_abs_logit": float(np.abs(ours[valid]).max()),
              "argmax_agreement": float((ours[valid].argmax(-1) == theirs[valid].argmax(-1)).mean()),
              "seconds": round(time.time() - t0, 1)}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "ledger"}, indent=1))


if __name__ == "__main__":
    main()
