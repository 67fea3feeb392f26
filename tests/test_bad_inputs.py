"""The bad-input suite: malformed inputs across every reader and entry point, one row per case (BUILD.md lists
them). Each case must raise one clear error naming what and where; on the command line that is one line
``lnjax: error: ...`` with a non-zero exit and no traceback, and nothing is written (no run directory; a
checkpoint directory is left as it was). Library cases call the reader or loader itself; CLI cases call
``lnjax.app.cli.main`` in-process; three go through a real subprocess to check what a user's terminal shows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest

import lnjax as lx
from lnjax import data
from lnjax.app import cli
from lnjax.core.errors import CheckpointError, DataError
from lnjax.io import checkpoint
from lnjax.models import Model, ModelConfig, init_params

from fixtures import NoPunct

ROOT = Path(__file__).resolve().parents[1]
WORLD_MODEL = str(ROOT / "lnjax" / "assets" / "world_model")

MEND_ROW = {"subject": "Ann", "src": "Who is Ann's father?", "answers": ["Bob"], "alt": "Carl",
            "rephrase": "Ann's father is who?", "loc": "nq question: where is paris", "loc_ans": "France"}
ULTRA_ROW = {"subject": "Eve", "src": "What is Eve's job?", "pred": "nurse", "rephrase": "Eve works as a",
             "alt": "pilot", "ans": "pilot", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
CF_ROW = {"case_id": 0, "requested_rewrite": {"prompt": "{} plays the", "subject": "Miles Davis",
                                              "target_new": {"str": "piano"}, "target_true": {"str": "trumpet"}},
          "paraphrase_prompts": ["Miles Davis performs on the"], "neighborhood_prompts": ["Louis Armstrong plays"]}
EASY_ROW = {"subject": "Ann", "prompt": "Ann's father is", "target_new": "Carl", "ground_truth": ["Bob"],
            "rephrase_prompt": "The father of Ann is",
            "locality": {"Relation": [{"prompt": "Ann's mother is", "ground_truth": ["Dora"]}]},
            "portability": {"Reasoning": [{"prompt": "Ann's grandfather is the father of", "ground_truth": ["Carl"]}]}}


def mend(n: int, **changes) -> list:
    """``n`` distinct MEND-layout rows; ``changes`` {row: {field: value or None to delete}}."""
    rows = [dict(MEND_ROW, src=f"Who is Ann{i}'s father?") for i in range(n)]
    for i, fields in changes.items():
        for k, v in fields.items():
            if v is None:
                rows[int(i)].pop(k)
            else:
                rows[int(i)][k] = v
    return rows


def write(tmp: Path, name: str, content) -> str:
    p = tmp / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content)
    else:
        p.write_text(json.dumps(content))
    return str(p)


def digest(directory: Path) -> str:
    """Names and bytes of every file under ``directory``: unchanged means the previous state is intact."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            p = Path(root) / name
            h.update(str(p.relative_to(directory)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def world_tok():
    return lx.world.default_world().tokenizer()


def tiny_hf(tmp: Path, name: str = "hf", **config_changes) -> str:
    """A tiny Llama checkpoint written by ``lnjax.io.hf.save``, its config.json changed by ``config_changes``."""
    cfg = ModelConfig(arch="llama", vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=24)
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    out = tmp / name
    lx.hf.save(model, model.params, str(out))
    if config_changes:
        c = json.loads((out / "config.json").read_text())
        c.update(config_changes)
        (out / "config.json").write_text(json.dumps(c))
    return str(out)


def tiny_gguf(tmp: Path, qtype_name: str) -> str:
    """A GGUF llama file whose first tensor (token_embd) is stored as ``qtype_name``."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES

    path = tmp / f"{qtype_name}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 32), (w.add_feed_forward_length, 64),
                   (w.add_head_count, 2), (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, 32),
                   (w.add_context_length, 64)):
        add(v)
    q = Q[qtype_name]
    block, size = GGML_QUANT_SIZES[q]
    raw = np.zeros((32, 32 // block * size), np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def saved_state(tmp: Path, shapes: dict, **editor_options) -> str:
    ed = lx.editors.stableedit(**editor_options)
    return checkpoint.save(str(tmp / "state"), ed.init(shapes))


def corrupt(path: str, keep_json: bool = False, delete: bool = False) -> str:
    """Overwrite (or delete) the metadata/array files of the Orbax checkpoint at ``path``."""
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            is_meta = name.endswith(".json") or "manifest" in name or name.startswith("_")
            if delete and not is_meta:
                os.remove(p)
            elif not delete and is_meta and not keep_json:
                with open(p, "w") as f:
                    f.write("{garbage")
    return path


@dataclasses.dataclass
class Case:
    """One malformed input: ``call(tmp)`` must raise ``error`` with a message matching ``match``."""

    id: str
    entry: str
    call: Callable[[Path], object]
    error: type
    match: str


# --- readers and tokenization (lnjax.data) ---------------------------------------------------------------------
READER_CASES = [
    Case("truncated_json", "data.read", lambda t: data.read("zsre", write(t, "t.json", json.dumps(mend(3))[:-30])),
         DataError, r"t\.json: row 2: (file ends inside the JSON array|invalid JSON)"),
    Case("invalid_json", "data.read", lambda t: data.read("zsre", write(t, "i.json", '[{"src": "a"}, {"src": }]')),
         DataError, r"i\.json: row 1: invalid JSON"),
    Case("json_lines_layout", "data.read",
         lambda t: data.read("zsre", write(t, "l.json", "\n".join(json.dumps(r) for r in mend(2)))),
         DataError, r"l\.json: expected a JSON array, found JSON lines"),
    Case("empty_file", "data.read", lambda t: data.read("zsre", write(t, "e.json", "")), DataError,
         r"e\.json: empty file"),
    Case("row_not_an_object", "data.read", lambda t: data.read("zsre", write(t, "o.json", mend(1) + ["text"])),
         DataError, r"o\.json: row 1: expected a JSON object, found str"),
    Case("non_string_field", "data.read", lambda t: data.read("zsre", write(t, "n.json", mend(2, **{"1": {"src": 17}}))),
         DataError, r"n\.json: row 1: field 'src': expected a string, found int"),
    Case("non_string_list_item", "data.read",
         lambda t: data.read("counterfact", write(t, "c.json", [dict(CF_ROW, paraphrase_prompts=[3])])),
         DataError, r"c\.json: row 0: field 'paraphrase_prompts\[0\]': expected a string, found int"),
    Case("nested_field_not_an_object", "data.read",
         lambda t: data.read("counterfact", write(t, "c.json", [dict(CF_ROW, requested_rewrite="x")])),
         DataError, r"c\.json: row 0: field 'requested_rewrite': expected an object, found str"),
    Case("mixed_zsre_layouts", "data.read", lambda t: data.read("zsre", write(t, "m.json", mend(1) + [ULTRA_ROW])),
         DataError, r"m\.json: row 1: field 'alt': missing: the file is in the mend layout .* ultraedit layout"),
    Case("wrong_dataset_layout", "data.read",
         lambda t: data.read("zsre", write(t, "cf.json", [CF_ROW, dict(CF_ROW, case_id=1)]), 2),
         DataError, r"cf\.json: 2 records were asked for, the file has 0 usable rows .*row 0: field 'ans': missing"),
    Case("too_few_rows", "data.read", lambda t: data.read("zsre", write(t, "f.json", mend(2)), 5), DataError,
         r"f\.json: 5 records were asked for, the file has 2 usable rows"),
    Case("empty_target_strict", "data.read --strict",
         lambda t: data.read("zsre", write(t, "z.json", mend(3, **{"1": {"alt": ""}})), strict=True),
         data.UnusableRow, r"z\.json: row 1: field 'alt': empty"),
    Case("empty_paraphrase_strict", "data.read --strict",
         lambda t: data.read("zsre", write(t, "z.json", mend(3, **{"2": {"rephrase": " "}})), strict=True),
         data.UnusableRow, r"z\.json: row 2: field 'rephrase': empty"),
    Case("missing_locality_answer_strict", "data.read --strict",
         lambda t: data.read("zsre", write(t, "z.json", mend(2, **{"0": {"loc_ans": None}})), strict=True),
         data.UnusableRow, r"z\.json: row 0: field 'loc_ans': missing"),
    Case("duplicated_edit_strict", "data.read --strict",
         lambda t: data.read("zsre", write(t, "d.json", mend(2) + mend(1)), strict=True),
         data.UnusableRow, r"d\.json: row 2: field 'prompt': the same edit \(prompt and target\) as row 0"),
    Case("nested_probe_answer_missing_strict", "data.read --strict (EasyEdit)",
         lambda t: data.read("easyedit", write(t, "k.json", [dict(EASY_ROW, portability={"R": [{"prompt": "p"}]})]),
                             strict=True),
         data.UnusableRow, r"k\.json: row 0: field 'portability.R.ground_truth': missing"),
    Case("template_without_subject_slot_strict", "data.read --strict (CounterFact)",
         lambda t: data.read("counterfact", write(t, "c.json", [dict(CF_ROW, requested_rewrite=dict(
             CF_ROW["requested_rewrite"], prompt="plays the"))]), strict=True),
         data.UnusableRow, r"c\.json: row 0: field 'requested_rewrite.prompt': has no '\{\}'"),
    Case("non_utf8_bytes", "data.read",
         lambda t: data.read("zsre", write(t, "b.json", json.dumps(mend(2)).encode().replace(b"Ann1", b"Ann\xff"))),
         DataError, r"b\.json: line 1, byte \d+: not UTF-8 \(invalid start byte"),
    Case("utf8_cut_mid_character", "data.read",
         lambda t: data.read("zsre", write(t, "u.json", json.dumps(mend(1)).encode()[:-5] + b"\xc3")),
         DataError, r"u\.json: line 1, byte \d+: not UTF-8 \(unexpected end of data"),
    Case("content_after_the_array", "data.read",
         lambda t: data.read("zsre", write(t, "a.json", json.dumps(mend(1)) + json.dumps(mend(1)))),
         DataError, r"a\.json: unexpected '\[' after the JSON array's closing"),
    Case("missing_file", "data.read", lambda t: data.read("zsre", str(t / "absent.json")), DataError,
         r"absent\.json: cannot be read \(No such file or directory\)"),
    Case("prompt_longer_than_max_length", "data.tokenize",
         lambda t: data.tokenize(data.read("zsre", write(t, "z.json", mend(1))), world_tok(), 5),
         DataError, r"z\.json: row 0: field 'edit': \d+ tokens, more than the maximum length 5"),
    Case("tokenizer_cannot_encode_prompt", "data.tokenize",
         lambda t: data.tokenize(data.read("zsre", write(t, "s.json", '[' + json.dumps(MEND_ROW)[:-1]
                                                         + ', "src": "Who is \\ud800?"}]')), world_tok()),
         DataError, r"s\.json: row 0: field 'edit': the tokenizer cannot encode it"),
    Case("answer_tokenizes_to_nothing_strict", "data.tokenize --strict",
         lambda t: data.tokenize(data.read("zsre", write(t, "p.json", mend(1, **{"0": {"alt": "!!"}}))),
                                 NoPunct(world_tok()), strict=True),
         data.UnusableRow, r"p\.json: row 0: field 'target': answer '!!' tokenizes to nothing"),
]

# --- checkpoints and model files (lnjax.io) ----------------------------------------------------------------------
IO_CASES = [
    Case("checkpoint_corrupted", "checkpoint.load",
         lambda t: checkpoint.load(corrupt(saved_state(t, {"a": (4, 3)})), lx.editors.stableedit().init({"a": (4, 3)})),
         CheckpointError, r"state: damaged or incomplete checkpoint"),
    Case("checkpoint_partial", "checkpoint.load",
         lambda t: checkpoint.load(corrupt(saved_state(t, {"a": (4, 3)}), delete=True),
                                   lx.editors.stableedit().init({"a": (4, 3)})),
         CheckpointError, r"state: (damaged or incomplete checkpoint|item .* is missing)"),
    Case("checkpoint_missing", "checkpoint.load",
         lambda t: checkpoint.load(str(t / "none"), lx.editors.stableedit().init({"a": (4, 3)})),
         CheckpointError, r"none: no checkpoint here"),
    Case("checkpoint_other_version_layout", "checkpoint.load",
         lambda t: checkpoint.load(saved_state(t, {"a": (4, 3)}),
                                   lx.editors.stableedit(pooling="target").init({"a": (4, 3)})),
         CheckpointError, r"state: item .*stats\['a'\].* is missing"),
    Case("checkpoint_target_shape_mismatch", "checkpoint.load",
         lambda t: checkpoint.load(saved_state(t, {"a": (4, 3)}, pooling="target"),
                                   lx.editors.stableedit(pooling="target").init({"a": (5, 3)})),
         CheckpointError, r"state: item .*stats\['a'\].* has shape \(\d+,\) float32, expected \(\d+,\)"),
    Case("run_checkpoint_of_another_run", "RunCheckpointer.latest",
         lambda t: _other_run_checkpoint(t), checkpoint.ConfigMismatch,
         r"turn_00000001: the run was saved with a different config; differences \(saved, now\): .*editor"),
    Case("done_file_corrupted", "checkpoint.finished",
         lambda t: checkpoint.finished(os.path.dirname(write(t, "done.json", "{not json"))),
         CheckpointError, r"done\.json: unreadable"),
    Case("gguf_unsupported_tensor_type", "hf.load (GGUF)", lambda t: lx.hf.load(tiny_gguf(t, "Q8_1")),
         CheckpointError, r"Q8_1\.gguf: tensor 'token_embd\.weight' \(Q8_1\) cannot be read"),
    Case("gguf_not_a_gguf", "hf.load (GGUF)", lambda t: lx.hf.load(write(t, "x.gguf", b"GGUF but not really")),
         CheckpointError, r"x\.gguf: not a readable GGUF file"),
    Case("hf_config_unsupported_option", "hf.load",
         lambda t: lx.hf.load(tiny_hf(t, pretraining_tp=2)), CheckpointError,
         r"config\.json.*unsupported config option pretraining_tp=2"),
    Case("hf_config_not_json", "hf.load",
         lambda t: lx.hf.load(os.path.dirname(write(t, "config.json", "{'model_type': 'llama'"))),
         CheckpointError, r"config\.json: not a JSON config"),
    Case("hf_weights_shape_mismatch", "hf.load",
         lambda t: lx.hf.load(tiny_hf(t, intermediate_size=32)), CheckpointError,
         r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"),
    Case("nan_inf_in_weights", "hf.load", lambda t: lx.hf.load(_nan_checkpoint(t)), CheckpointError,
         r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has 2 non-finite values"),
]


def _other_run_checkpoint(t: Path):
    """A run checkpoint written for one editor, resumed for another."""
    from lnjax.engine.sequence import init_carry
    cfg = ModelConfig(arch="llama", vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=24)
    params = init_params(cfg, jax.random.PRNGKey(0))
    targets = ["model.layers.0.mlp.down_proj"]
    ed = lx.editors.ultraedit()
    _, carry = init_carry(params, ed, targets)
    ck = checkpoint.RunCheckpointer(str(t / "run"))
    ck.save(1, carry, {"editor": "ultraedit", "turns": 1})
    before = digest(t / "run")
    try:
        return ck.latest(carry, {"editor": "stableedit", "turns": 1}, log=lambda m: None)
    finally:
        assert digest(t / "run") == before  # the other run's checkpoint is left as it was


def _nan_checkpoint(t: Path) -> str:
    from safetensors.numpy import load_file, save_file
    path = tiny_hf(t)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    w = tensors["model.layers.0.mlp.down_proj.weight"].copy()
    w[0, 0], w[1, 2] = np.nan, np.inf
    tensors["model.layers.0.mlp.down_proj.weight"] = w
    save_file(tensors, f, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("case", READER_CASES + IO_CASES, ids=lambda c: c.id)
def test_library_case(case, tmp_path):
    with pytest.raises(case.error, match=case.match) as e:
        case.call(tmp_path)
    assert "\n" not in str(e.value).strip(), "one line"


# --- the command line (lnjax.app.cli.main, in-process) ------------------------------------------------------------
def run_args(tmp: Path, *extra) -> list:
    return ["run", "--model", WORLD_MODEL, "--editor", "ultraedit", "--lr", "0.01", "--alpha", "1", "--turns", "1",
            "--edits-per-turn", "2",
            "--eval-every", "0", "--no-generation", "--quiet", "--out", str(tmp / "out"), *extra]


def zsre_args(tmp: Path, rows, *extra) -> list:
    path = write(tmp, "edits.json", rows) if not isinstance(rows, str) else rows
    return run_args(tmp, "--dataset", "zsre", "--data", path, *extra)


@dataclasses.dataclass
class CliCase:
    id: str
    input: str
    argv: Callable[[Path], list]
    match: str


def _resume_other_run(t: Path) -> list:
    saved = cli.config_from_args(cli.build_parser().parse_args(run_args(t)))  # a run of 1 turn
    checkpoint.save_run_config(str(t / "ck"), saved.to_json())
    return run_args(t, "--resume", str(t / "ck"), "--turns", "3")


CLI_CASES = [
    CliCase("cli_empty_target_strict", "MEND row with alt ''", lambda t: zsre_args(t, mend(3, **{"1": {"alt": ""}}),
                                                                                     "--strict"),
            r"edits\.json: row 1: field 'alt': empty"),
    CliCase("cli_enormous_record", "one 1 MB prompt", lambda t: zsre_args(t, mend(2, **{"0": {"src": "word " * 200_000}})),
            r"edits\.json: row 0: field 'edit': \d+ tokens, more than the maximum length 64 \(--max-length\)"),
    CliCase("cli_prompt_longer_than_max_length", "--max-length 4", lambda t: zsre_args(t, mend(2), "--max-length", "4"),
            r"edits\.json: row 0: field 'edit': \d+ tokens, more than the maximum length 4"),
    CliCase("cli_missing_data_file", "--data that does not exist",
            lambda t: zsre_args(t, str(t / "nowhere.json")), r"nowhere\.json: cannot be read"),
    CliCase("cli_data_flag_missing", "--dataset zsre without --data", lambda t: run_args(t, "--dataset", "zsre"),
            r"--data PATH is required for --dataset zsre"),
    CliCase("cli_target_does_not_exist", "--targets of a layer the model lacks",
            lambda t: run_args(t, "--targets", "model.layers.9.mlp.down_proj"),
            r"--targets: 'model\.layers\.9\.mlp\.down_proj' is not a module of the model"),
    CliCase("cli_target_without_kernel", "--targets of a norm (no 2-D kernel)",
            lambda t: run_args(t, "--targets", "model.norm"), r"--targets: 'model\.norm' has no 2-D kernel"),
    CliCase("cli_unknown_editor", "--editor nope", lambda t: run_args(t, "--editor", "nope"),
            r"--editor: unknown editor\(s\) \['nope'\]"),
    CliCase("cli_bad_mesh_spec", "--mesh data=two", lambda t: run_args(t, "--mesh", "data=two"),
            r"mesh spec 'data=two'"),
    CliCase("cli_mesh_larger_than_devices", "--mesh data=64", lambda t: run_args(t, "--mesh", "data=64"),
            r"mesh 'data=64' needs 64 devices"),
    CliCase("cli_resume_nothing_there", "--resume of an empty directory",
            lambda t: run_args(t, "--resume", str(t)), r"--resume: .*config\.json: no checkpointed run there"),
    CliCase("cli_resume_another_run", "--resume with flags of another run", _resume_other_run,
            r"--resume: .*ck: flags differ from the saved run \(saved, given\): \{'turns': \(1, 3\)\}$"),
    CliCase("cli_hf_unsupported_option", "HF checkpoint with pretraining_tp=2",
            lambda t: run_args(t, "--model", tiny_hf(t, pretraining_tp=2), "--targets", "model.layers.0.mlp.down_proj"),
            r"config\.json.*unsupported config option pretraining_tp=2"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_case(case, tmp_path, capsys):
    argv = case.argv(tmp_path)
    ck = tmp_path / "ck"
    before = digest(ck) if ck.exists() else None
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("lnjax: error: "), err
    assert __import__("re").search(case.match, err[0]), err[0]
    assert not (tmp_path / "out").exists(), "a failed run wrote its run directory"
    if before is not None:
        assert digest(ck) == before, "the previous checkpoint was changed"


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown editor"):
        cli.main(run_args(tmp_path, "--editor", "nope", "--debug"))


# --- the same through a real process: what the terminal shows ----------------------------------------------------
SUBPROCESS_CASES = [
    ("non_utf8_data_file", lambda t: zsre_args(t, write(t, "latin1.json", json.dumps(mend(2)).encode()
                                                           .replace(b"Ann0", b"Ann\xe9"))),
     r"^lnjax: error: .*latin1\.json: line 1, byte \d+: not UTF-8"),
    ("nan_weights", lambda t: run_args(t, "--model", _nan_checkpoint(t), "--targets", "model.layers.0.mlp.down_proj"),
     r"^lnjax: error: .*down_proj\.weight' has 2 non-finite values"),
    ("target_does_not_exist", lambda t: run_args(t, "--targets", "model.layers.0.mlp.nope"),
     r"^lnjax: error: --targets: 'model\.layers\.0\.mlp\.nope' is not a module"),
]


@pytest.mark.parametrize("name,argv,match", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_cli_subprocess_prints_one_line(name, argv, match, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "lnjax", *argv(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=120)
    lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-2000:]
    assert __import__("re").search(match, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


# --- data as distributed: unusable rows skipped, named and counted (issue 24 item 1) --------------------------------
def test_mend_layout_file_with_empty_targets_runs_without_flags(tmp_path, capsys):
    rows = mend(6, **{"1": {"alt": ""}, "4": {"alt": "  "}})
    path = write(tmp_path, "zsre_mend_eval.json", rows)
    assert cli.main(zsre_args(tmp_path, path, "--edits-per-turn", "4")) == 0
    out = capsys.readouterr().out
    assert "zsre_mend_eval.json: row 1: field 'alt': empty; row skipped" in out
    assert "2 unusable rows skipped" in out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["data"]["n_skipped"] == 2 and res["data"]["layout"] == "mend"
    assert res["data"]["skipped"] == [{"file": path, "row": 1, "field": "alt", "reason": "empty"},
                                      {"file": path, "row": 4, "field": "alt", "reason": "empty"}]
    assert res["metadata"]["edits"] == 4 and res["data"]["rows_read"] == 6  # rows 0, 2, 3 and 5 are the edits


def test_skip_bad_rows_is_a_deprecated_no_op(tmp_path, capsys):
    rows = mend(3, **{"0": {"alt": ""}})
    assert cli.main(zsre_args(tmp_path, rows, "--skip-bad-rows")) == 0
    assert "--skip-bad-rows is deprecated" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["data"]["n_skipped"] == 1


def test_case_count():
    """BUILD.md's table lists these cases; the issue asks for at least 25."""
    assert len(READER_CASES) + len(IO_CASES) + len(CLI_CASES) + len(SUBPROCESS_CASES) >= 25
