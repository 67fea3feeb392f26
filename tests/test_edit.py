"""``lnjax edit`` (lnjax.app.edit): batches applied in k invocations equal one invocation bit for bit, the guards
(duplicate batch, locality, other base model or settings), atomic commits under SIGKILL, export, history, and the
README walk-through as written."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lnjax.app import edit as edit_mod
from lnjax.app.edit import Edit, EditRefused, EditSession, LocalityGuardTripped, read_edits, read_history, read_probes
from lnjax.core.errors import DataError
from lnjax.core.tree import digest
from lnjax.core.turns import pack
from lnjax.models import ModelConfig, init_params
from lnjax.world import default_world, world_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "model.layers.1.mlp.down_proj"
SETTINGS = {"targets": (TARGET,), "edits_per_turn": 10, "lr": 1e-2, "sample_size": 16}
QUIET = dict(log=lambda m: None)


def _tiny_world_model(directory, seed=0):
    """A random 2-layer Llama over the world's vocabulary, saved as a world-model directory."""
    w = default_world()
    cfg = ModelConfig(arch="llama", vocab_size=len(w.vocab), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=48, bos_token_id=1, eos_token_id=2)
    world_model.save(str(directory), cfg, init_params(cfg, jax.random.PRNGKey(seed), std=0.2),
                     {"note": "random tiny world model (tests)"})
    return str(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_world_model(tmp_path_factory.mktemp("tiny") / "model")


def _edits(n, start=0):
    recs = default_world().records("edit", start + n, seed=0)[start:]
    return [Edit(r["src"], r["ans"], r["rephrase"], "world", start + i) for i, r in enumerate(recs)]


def _probes(n=30):
    w = default_world()
    return [(w.prompt(int(s), int(r), 0), w.answer(int(s), int(r))) for s, r in w.all_facts("locality")[:n]]


def _write_jsonl(path, edits):
    with open(path, "w") as f:
        for e in edits:
            f.write(json.dumps({"prompt": e.prompt, "target": e.target, "paraphrase": e.paraphrase}) + "\n")
    return str(path)


def _state_digest(directory, model=None):
    """Digest of the newest commit's kernels and editor state (opened as a session)."""
    with EditSession.open(str(directory), model=model, **QUIET) as s:
        return digest((s.kernels, s.editor_state)), s.commit


def _files(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, directory)] = open(p, "rb").read()
    return out


def _apply(state, model, batches, settings=SETTINGS, **kw):
    entries = []
    for b in batches:
        with EditSession.open(str(state), model=model, settings=settings, **QUIET) as s:
            entries.append(s.apply(b, progress=False, **kw))
    return entries


def test_k_invocations_equal_one_bitwise(tiny, tmp_path):
    edits = _edits(40)
    _apply(tmp_path / "one", tiny, [edits])
    _apply(tmp_path / "two", tiny, [edits[:20], edits[20:]])
    entries = _apply(tmp_path / "three", tiny, [edits[:10], edits[10:30], edits[30:]])
    ref = _state_digest(tmp_path / "one")[0]
    assert _state_digest(tmp_path / "two") == (ref, 2)
    assert _state_digest(tmp_path / "three") == (ref, 3)
    assert [e["turns"] for e in entries] == [1, 2, 1] and entries[-1]["total_edits"] == 40
    # the state differs from the base (the edits did something) and a partial turn starts a new turn next time
    with EditSession.open(str(tmp_path / "one"), **QUIET) as s:
        assert not np.array_equal(np.asarray(s.kernels[TARGET]),
                                  np.asarray(s.model.params["model"]["layers"][1]["mlp"]["down_proj"]["kernel"]))
    split = _apply(tmp_path / "ragged", tiny, [edits[:15], edits[15:]])
    assert [e["turns"] for e in split] == [2, 3] and [e["padded_slots"] for e in split] == [5, 5]
    assert _state_digest(tmp_path / "ragged")[0] != ref
    # ledger: one line per invocation, retention measured on earlier edits from the second invocation on
    hist = read_history(str(tmp_path / "three"))
    assert [h["invocation"] for h in hist] == [1, 2, 3]
    assert hist[0]["metrics"]["retention_n"] == 0 and hist[2]["metrics"]["retention_n"] == 16


def test_duplicate_batch_refused_unless_forced(tiny, tmp_path, capsys):
    from lnjax.app.cli import main
    f1 = _write_jsonl(tmp_path / "b1.jsonl", _edits(10))
    state = str(tmp_path / "s")
    common = ["edit", "--state", state, "--model", tiny, "--quiet"]
    created = ["--targets", TARGET, "--edits-per-turn", "10", "--lr", "0.01"]
    assert main(common + created + ["--edits", f1]) == 0
    assert "applied 10 edits" in capsys.readouterr().out
    assert main(common + ["--edits", f1]) == 1
    err = capsys.readouterr().err
    assert "lnjax: error:" in err and "applied in invocation 1" in err and "--force" in err
    assert main(common + ["--edits", f1, "--force"]) == 0
    hist = read_history(state)
    assert [h["forced"] for h in hist] == [False, True] and hist[1]["total_edits"] == 20
    # the saved model is used when --model is left out; the same check through the API
    with EditSession.open(state, **QUIET) as s, pytest.raises(EditRefused, match="applied in invocation 1"):
        s.apply(read_edits(f1), progress=False)


def test_locality_guard_rolls_back_and_leaves_state_byte_identical(tiny, tmp_path, capsys):
    from lnjax.app.cli import main
    state = tmp_path / "s"
    _apply(state, tiny, [_edits(10)])
    before = _files(state)
    with EditSession.open(str(state), **QUIET) as s, pytest.raises(LocalityGuardTripped, match="turn 1 of 2") as e:
        s.apply(_edits(20, start=10), probes=_probes(), min_locality=0.9, progress=False)
    assert e.value.report["locality"] < 0.9 and e.value.report["turn"] == 1
    assert _files(state) == before
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in _probes()))
    rc = main(["edit", "--state", str(state), "--edits", _write_jsonl(tmp_path / "b.jsonl", _edits(20, start=10)),
               "--probe", str(probe), "--min-locality", "0.9", "--quiet"])
    assert rc == 3 and "rolled back" in capsys.readouterr().err
    assert _files(state) == before
    # without the guard the same batch applies, and reports the locality it has
    with EditSession.open(str(state), **QUIET) as s:
        entry = s.apply(_edits(20, start=10), probes=_probes(), progress=False)
    assert entry["metrics"]["locality"] < 0.9 and entry["metrics"]["locality_n"] == 30


def test_other_base_model_or_settings_refused(tiny, tmp_path):
    state = str(tmp_path / "s")
    _apply(state, tiny, [_edits(10)])
    other = _tiny_world_model(tmp_path / "other", seed=1)
    with pytest.raises(EditRefused, match="another base model"):
        EditSession.open(state, model=other, **QUIET)
    with pytest.raises(EditRefused, match=r"settings differ .*\"lr\": \[0.01, 0.5\]"):
        EditSession.open(state, settings={"lr": 0.5}, **QUIET)
    with pytest.raises(EditRefused, match="editor"):
        EditSession.open(state, settings={"editor": "stableedit"}, **QUIET)
    with EditSession.open(state, settings={"lr": 0.01, "targets": (TARGET,)}, **QUIET):  # repeating is fine
        pass
    with EditSession.open(state, **QUIET), pytest.raises(EditRefused, match="another lnjax edit has this state"):
        EditSession.open(state, **QUIET)


def test_crash_at_each_commit_step_leaves_a_loadable_state(tiny, tmp_path, monkeypatch):
    """A failure injected at each step of a commit: before the rename the old state stays, after it the new one,
    and the ledger is completed from the commit on the next open."""
    b1, b2 = _edits(10), _edits(10, start=10)
    _apply(tmp_path / "ref2", tiny, [b1, b2])
    _apply(tmp_path / "ref1", tiny, [b1])
    ref1, ref2 = _state_digest(tmp_path / "ref1")[0], _state_digest(tmp_path / "ref2")[0]

    class Crash(Exception):
        pass

    def crash(*a, **k):
        raise Crash()

    def save_half(path, tree, metadata=None):  # a partial Orbax write, then the kill
        os.makedirs(path)
        open(os.path.join(path, "partial"), "wb").write(b"\0" * 10)
        raise Crash()

    for where, expect in (("save", 1), ("fsync", 1), ("ledger", 2)):
        state = tmp_path / where
        _apply(state, tiny, [b1])
        with monkeypatch.context() as m:
            if where == "save":
                m.setattr(edit_mod.checkpoint, "save", save_half)
            elif where == "fsync":
                m.setattr(edit_mod, "_fsync_tree", crash)
            else:
                m.setattr(EditSession, "_append_ledger", crash)
            with EditSession.open(str(state), **QUIET) as s, pytest.raises(Crash):
                s.apply(b2, progress=False)
        assert _state_digest(state) == ((ref1, 1) if expect == 1 else (ref2, 2)), where
        assert not os.listdir(state / ".tmp") if (state / ".tmp").exists() else True
        lines = [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]
        assert [x["invocation"] for x in lines] == list(range(1, expect + 1)), where


def test_sigkill_at_random_points_leaves_previous_or_new_state(tiny, tmp_path):
    """SIGKILL ``lnjax edit`` at random moments (as the resume test does for ``lnjax run``): the state then loads
    as the previous or the new commit, bit for bit, and applying the batch again completes it."""
    b1, b2 = _edits(20), _edits(20, start=20)
    ref = tmp_path / "ref"
    _apply(ref, tiny, [b1, b2])
    ref2 = _state_digest(ref)[0]
    f2 = _write_jsonl(tmp_path / "b2.jsonl", b2)
    env = {**os.environ, "PYTHONPATH": ROOT}
    base = tmp_path / "base"
    _apply(base, tiny, [b1])
    ref1 = _state_digest(base)[0]
    cmd = lambda state: [sys.executable, "-m", "lnjax", "edit", "--state", str(state), "--edits", f2, "--quiet"]
    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    t0 = time.time()
    subprocess.run(cmd(clean), check=True, env=env, capture_output=True)
    duration = time.time() - t0
    assert _state_digest(clean) == (ref2, 2)
    rng = np.random.default_rng(int(time.time()))
    for i in range(2):
        state = tmp_path / f"killed{i}"
        shutil.copytree(base, state)
        proc = subprocess.Popen(cmd(state), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.3, duration)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        got, commit = _state_digest(state)
        assert (got, commit) in ((ref1, 1), (ref2, 2))
        assert [h["invocation"] for h in read_history(str(state))] == list(range(1, commit + 1))
        if commit == 1:
            with EditSession.open(str(state), **QUIET) as s:
                s.apply(read_edits(f2), progress=False, source=f2)
            assert _state_digest(state) == (ref2, 2)


def test_hf_model_k_invocations_and_export_loaded_by_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lnjax.io import hf
    w = default_world()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(w.vocab), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   bos_token_id=1, eos_token_id=2)
    ref_model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.normal_(0.0, 0.15)
    src = str(tmp_path / "hf")
    ref_model.save_pretrained(src)
    w.save_tokenizer(src)
    edits = _edits(30)
    _apply(tmp_path / "one", src, [edits])
    _apply(tmp_path / "two", src, [edits[:20], edits[20:]])
    assert _state_digest(tmp_path / "one") == (_state_digest(tmp_path / "two")[0], 1)
    out = str(tmp_path / "export")
    with EditSession.open(str(tmp_path / "two"), **QUIET) as s:
        s.export(out)
        params, model = s.params, s.model
    assert json.load(open(os.path.join(out, "lnjax_edit.json")))["counters"]["edits"] == 30
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tok = hf.load_tokenizer(out)
    batch = pack([(tok.encode(e.prompt), tok.encode(" " + e.target, add_special_tokens=False)) for e in edits[:6]])
    ids, mask = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
    ours = np.asarray(model.apply(params, ids, mask))
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)
    base = np.asarray(model.apply(model.params, ids, mask))
    assert np.abs(ours - base)[valid].max() > 1e-4  # the export carries the edits
    # exporting again replaces the earlier export; a directory that is not an export is refused
    with EditSession.open(str(tmp_path / "two"), **QUIET) as s:
        s.export(out)
        with pytest.raises(EditRefused, match="not an lnjax edit export"):
            s.export(str(tmp_path / "hf"))


def test_readers_and_history(tiny, tmp_path, capsys):
    from lnjax.app.cli import main
    from lnjax.data.plain import detect_layout
    week1 = os.path.join(ROOT, "experiments", "walkthrough", "edits", "week1.json")
    assert detect_layout(week1) == "zsre" and detect_layout(os.path.join(ROOT, "experiments", "walkthrough", "edits",
                                                                          "week2.jsonl")) == "jsonl"
    assert read_edits(week1)[0].paraphrase and len(read_probes(week1)) == 200
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a ?", "target": "b"}\n{"prompt": "c ?"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: field 'target': missing"):
        read_edits(str(bad))
    bad.write_text('{"prompt": "a ?", "target": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"row 1: invalid JSON"):
        read_edits(str(bad))
    odd = tmp_path / "odd.json"
    odd.write_text('[{"question": "q", "answer": "a"}]')
    with pytest.raises(DataError, match="fit no known layout"):
        read_edits(str(odd))
    # the examples are what experiments/walkthrough/make_edits.py writes
    sys.path.insert(0, os.path.join(ROOT, "experiments", "walkthrough"))
    try:
        import make_edits
    finally:
        sys.path.pop(0)
    for name, text in make_edits.files().items():
        assert open(os.path.join(ROOT, "experiments", "walkthrough", "edits", name), encoding="utf-8").read() == text, name
    # --history: a table and a PNG
    state = str(tmp_path / "s")
    _apply(state, tiny, [_edits(10), _edits(10, start=10)])
    too_long = "row 7: field 'prompt': 2102 tokens, more than the maximum length 2048"  # the model's context
    with EditSession.open(state, **QUIET) as s, pytest.raises(DataError, match=too_long):
        s.apply([Edit("x " * 2100 + "?", "job_1", None, "long.jsonl", 7)], progress=False)
    assert main(["edit", "--state", state, "--history", "--plot", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+2\s.*\s20\s", out, re.M) and (tmp_path / "h.png").stat().st_size > 1000


def test_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    """The three commands of README "Keeping a model up to date", on the default testbed, as written: the
    metrics they report, and the export loads as the edited model."""
    from lnjax.app.cli import main
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- edit-walkthrough -->\s*```\n(.*?)```", text, re.S)
    assert block, "README lost its <!-- edit-walkthrough --> block"
    commands = [c for c in block.group(1).splitlines() if c.strip()]
    assert len(commands) == 3
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    monkeypatch.chdir(tmp_path)
    for c in commands:
        argv = shlex.split(c)
        assert argv[0].endswith("lnjax") and argv[1] == "edit", c
        assert main(argv[1:] + ["--quiet"]) == 0, c
    out = capsys.readouterr().out
    state = re.search(r"--state (\S+)", commands[0]).group(1)
    hist = read_history(state)
    assert [h["total_edits"] for h in hist] == [200, 300]
    m1, m2 = hist[0]["metrics"], hist[1]["metrics"]
    assert m1["efficacy"] > 0.6 and m2["efficacy"] > 0.6 and m2["retention"] > 0.6 and m2["retention_n"] == 200
    assert m1["locality"] > 0.95 and m2["locality"] > 0.95
    assert "retention" in out and os.path.exists(os.path.join(state, "history.png"))
    export = re.search(r"--export (\S+)", commands[1]).group(1)
    with EditSession.open(state, **QUIET) as s:
        assert digest(world_model.load(export).params) == digest(s.params)
