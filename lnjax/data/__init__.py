"""Readers for the published edit datasets in their exact JSON schemas (docs/method.md §10), and tokenization.

Files are JSON arrays; the first ``n`` rows are used, in order, and the array is parsed incrementally so a 2M-row
file is never held in memory twice (nor read past row ``n``). Every problem raises ``DataError`` naming the file,
the row and the field; ``skip_bad_rows=True`` skips such rows instead and counts them (never silently).
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Callable, Iterator, Optional, Sequence

from lnjax.core.turns import probe_length

DATASETS = ("zsre", "fever", "wikibigedit", "ultraeditbench", "counterfact", "easyedit")
# The two ZsRE layouts in circulation, told apart by their fields: UltraEdit's eval/train files carry the edit
# target as ``ans``; MEND's (``zsre_mend_eval.json``, also used by ROME, MEMIT, AlphaEdit, EasyEdit) as ``alt``
# with the true answers in ``answers``.
ZSRE_LAYOUTS = {"ultraedit": "ans", "mend": "alt"}


from lnjax.core.errors import DataError  # noqa: E402,F401  (raised here; its home is lnjax.core.errors)


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """One edit: ``prompt`` → ``target``, a ``paraphrase`` (same target), an unrelated ``loc_prompt`` with its gold
    ``loc_answer``, and optional ``extra`` probes ``((name, prompt, answer), ...)`` (WikiBigEdit's personas and
    multi-hop). ``source`` and ``row`` say where it came from; ``subject`` (when the dataset gives one) is the
    edited subject as it occurs in ``prompt`` (MEMIT-style editors locate its last token)."""

    prompt: str
    target: str
    paraphrase: str
    loc_prompt: str
    loc_answer: str
    extra: tuple = ()
    source: str = ""
    row: int = -1
    subject: Optional[str] = None


@dataclasses.dataclass
class ReadReport:
    """What a reader did: rows read and rows skipped (with their errors) under ``skip_bad_rows``."""

    rows: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    layout: Optional[str] = None  # which layout a multi-layout reader detected (``zsre``: ultraedit or mend)


def iter_json_array(path: str, chunk_size: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Yield ``(row, value)`` for each element of the JSON array in ``path``, reading ``chunk_size`` characters
    at a time (memory: one chunk plus the element being parsed)."""
    decoder = json.JSONDecoder()
    with open(path, "r", encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            more = f.read(chunk_size)
            if not more:
                eof = True
                return False
            buf, pos = buf[pos:] + more, 0
            return True

        def peek() -> Optional[str]:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not fill():
                    return None

        c = peek()
        if c is None:
            raise DataError(f"{path}: empty file (expected a JSON array)")
        if c != "[":
            kind = "JSON lines or a single object" if c == "{" else repr(c)
            raise DataError(f"{path}: expected a JSON array, found {kind} at the start of the file")
        pos += 1
        if peek() == "]":
            return
        row = 0
        while True:
            if peek() is None:
                raise DataError(f"{path}: row {row}: file ends inside the JSON array")
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof or not fill():  # a number may continue in the next chunk
                        break
                except json.JSONDecodeError as e:
                    if not fill():
                        raise DataError(f"{path}: row {row}: invalid JSON ({e.msg})") from None
            pos = end
            yield row, value
            row += 1
            c = peek()
            if c == "]":
                return
            if c is None:
                raise DataError(f"{path}: row {row}: file ends inside the JSON array")
            if c != ",":
                raise DataError(f"{path}: row {row}: expected ',' between array elements, found {c!r}")
            pos += 1


class _Row:
    """Field access for one raw row with errors that name file, row and field."""

    def __init__(self, path: str, row: int, value):
        if not isinstance(value, dict):
            raise DataError(f"{path}: row {row}: expected a JSON object, found {type(value).__name__}")
        self.path, self.row, self.value = path, row, value

    def err(self, field: str, msg: str) -> DataError:
        return DataError(f"{self.path}: row {self.row}: field {field!r}: {msg}")

    def get(self, dotted: str, optional: bool = False):
        node = self.value
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if optional:
                    return None
                raise self.err(dotted, "missing")
            node = node[part]
        return node

    def text(self, dotted: str, optional: bool = False) -> Optional[str]:
        v = self.get(dotted, optional)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise self.err(dotted, f"expected a string, found {type(v).__name__}")
        if not v.strip():
            raise self.err(dotted, "empty")
        return v

    def text_list(self, dotted: str) -> list[str]:
        v = self.get(dotted)
        if not isinstance(v, list) or not v:
            raise self.err(dotted, f"expected a non-empty list of strings, found {type(v).__name__}")
        for i, x in enumerate(v):
            if not isinstance(x, str) or not x.strip():
                raise self.err(f"{dotted}[{i}]", "expected a non-empty string")
        return v


def zsre_layout(r: "_Row") -> str:
    """``"ultraedit"`` (target ``ans``) or ``"mend"`` (target ``alt``, with ``answers``) for a ZsRE row."""
    for layout, field in ZSRE_LAYOUTS.items():
        if field in r.value:
            return layout
    raise r.err("ans", "missing (neither UltraEdit's 'ans' nor MEND's 'alt' + 'answers' is present)")


def _zsre(r: _Row, rng, layout: Optional[str] = None) -> EditRecord:
    layout = layout or zsre_layout(r)
    if layout == "mend":
        r.text_list("answers")  # part of the layout; checked so a truncated row is not read as a good one
    return EditRecord(r.text("src"), r.text(ZSRE_LAYOUTS[layout]), r.text("rephrase"), r.text("loc") + "?",
                      r.text("loc_ans"), subject=r.text("subject", optional=True))


def _first_answer(r: _Row, field: str, value) -> str:
    """EasyEdit ground truths are a string, a list of strings, or a list of such lists; the first string."""
    while isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise r.err(field, "expected a non-empty string or list of strings")
    return value


def _probe_items(r: _Row, field: str) -> list[tuple[str, str, str]]:
    """(name, prompt, answer) of EasyEdit's nested ``locality``/``portability`` dict: ``{name: [{prompt,
    ground_truth}, ...]}`` or ``{name: {prompt, ground_truth}}``; the first item of each name."""
    node = r.get(field, optional=True)
    if node is None:
        return []
    if not isinstance(node, dict):
        raise r.err(field, f"expected an object of named probes, found {type(node).__name__}")
    out = []
    for name, items in node.items():
        item = items[0] if isinstance(items, list) and items else items
        where = f"{field}.{name}"
        if not isinstance(item, dict):
            raise r.err(where, "expected {'prompt', 'ground_truth'} or a non-empty list of them")
        prompt = item.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and prompt else prompt
        if not isinstance(prompt, str) or not prompt.strip():
            raise r.err(f"{where}.prompt", "expected a non-empty string")
        if "ground_truth" not in item:
            raise r.err(f"{where}.ground_truth", "missing")
        out.append((name, prompt, _first_answer(r, f"{where}.ground_truth", item["ground_truth"])))
    return out


def _easyedit(r: _Row, rng) -> EditRecord:
    """EasyEdit's JSON: flat ``locality_prompt``/``locality_ground_truth``, else the first entry of the nested
    ``locality`` dict (KnowEdit); each ``portability`` entry becomes an extra probe ``portability.<name>``."""
    rephrase = "rephrase_prompt" if "rephrase_prompt" in r.value or "rephrase" not in r.value else "rephrase"
    if "locality_prompt" in r.value or not isinstance(r.value.get("locality"), dict):
        loc = r.text("locality_prompt")
        loc_ans = _first_answer(r, "locality_ground_truth", r.get("locality_ground_truth"))
    else:
        items = _probe_items(r, "locality")
        if not items:
            raise r.err("locality", "empty (no locality probe)")
        _, loc, loc_ans = items[0]
    extra = tuple((f"portability.{name}", p, a) for name, p, a in _probe_items(r, "portability"))
    return EditRecord(r.text("prompt"), _first_answer(r, "target_new", r.get("target_new")), r.text(rephrase),
                      loc, loc_ans, extra, subject=r.text("subject", optional=True))


def _fever(r: _Row, rng) -> EditRecord:
    return EditRecord(r.text("prompt"), r.text("alt"), rng.choice(r.text_list("equiv_prompt")),
                      r.text("unrel_prompt"), r.text("unrel_ans"))


def _wikibigedit(r: _Row, rng) -> EditRecord:
    extra = []
    personas = r.text("personas", optional=True)
    if personas is not None:
        extra.append(("personas", personas, r.text("ans")))
    mhop = r.text("mhop", optional=True)
    if mhop is not None:
        extra.append(("multi_hop", mhop, r.text("mhop_ans")))
    return EditRecord(r.text("update"), r.text("ans"), r.text("rephrase"), r.text("loc"), r.text("loc_ans"),
                      tuple(extra))


def _ultraeditbench(r: _Row, rng) -> EditRecord:
    return EditRecord(r.text("prompt"), r.text("ans"), r.text("rephrase_prompt"), r.text("loc"), r.text("loc_ans"))


def _counterfact(r: _Row, rng) -> EditRecord:
    template = r.text("requested_rewrite.prompt")
    if "{}" not in template:
        raise r.err("requested_rewrite.prompt", "has no '{}' for the subject")
    prompt = template.replace("{}", r.text("requested_rewrite.subject"))
    return EditRecord(prompt, r.text("requested_rewrite.target_new.str"), r.text_list("paraphrase_prompts")[0],
                      r.text_list("neighborhood_prompts")[0], r.text("requested_rewrite.target_true.str"),
                      subject=r.text("requested_rewrite.subject"))


_PARSERS: dict[str, Callable] = {"zsre": _zsre, "fever": _fever, "wikibigedit": _wikibigedit,
                                 "ultraeditbench": _ultraeditbench, "counterfact": _counterfact,
                                 "easyedit": _easyedit}


def read(dataset: str, path: str, n: Optional[int] = None, *, seed: int = 0, skip_bad_rows: bool = False,
         report: Optional[ReadReport] = None) -> list[EditRecord]:
    """The first ``n`` records (all when None) of ``path`` in ``dataset``'s schema.

    With ``skip_bad_rows`` a bad row is skipped and recorded in ``report.skipped``; fewer than ``n`` good rows
    then raise. FEVER's paraphrase is a choice from ``equiv_prompt`` seeded by ``seed``. ZsRE files in either
    layout are read (``ZSRE_LAYOUTS``): the first row decides, ``report.layout`` says which, and a row of the
    other layout raises DataError.
    """
    if dataset not in _PARSERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")
    parse = _PARSERS[dataset]
    rng = random.Random(seed)
    report = report if report is not None else ReadReport()
    out = []
    for row, value in iter_json_array(path):
        if n is not None and len(out) >= n:
            break
        report.rows += 1
        try:
            r = _Row(path, row, value)
            if dataset == "zsre":
                layout = zsre_layout(r)
                if report.layout is None:
                    report.layout = layout
                elif layout != report.layout:
                    raise r.err(ZSRE_LAYOUTS[report.layout], f"missing: the file is in the {report.layout} layout "
                                f"(from its first row) but this row is in the {layout} layout")
                rec = _zsre(r, rng, layout)
            else:
                rec = parse(r, rng)
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.skipped.append(str(e))
            continue
        out.append(dataclasses.replace(rec, source=path, row=row))
    if n is not None and len(out) < n:
        raise DataError(f"{path}: {n} records were asked for, the file has {len(out)} usable rows"
                        + (f" ({len(report.skipped)} skipped as bad)" if report.skipped else ""))
    return out


def records_from_dicts(dataset: str, rows: Sequence[dict], source: str = "<memory>", seed: int = 0
                       ) -> list[EditRecord]:
    """Parse in-memory rows (e.g. ``World.records``) with the same schema checks as ``read``."""
    parse = _PARSERS[dataset]
    rng = random.Random(seed)
    return [dataclasses.replace(parse(_Row(source, i, v), rng), source=source, row=i) for i, v in enumerate(rows)]


@dataclasses.dataclass
class TokenizedRecord:
    """Token ids of one record's probes: ``edit``, ``paraphrase``, ``locality`` and ``extra`` (name -> pair),
    each a (prompt_ids, answer_ids) pair; ``subject_last``: index of the subject's last token in the edit prompt
    (-1 when the record has no subject)."""

    edit: tuple
    paraphrase: tuple
    locality: tuple
    extra: dict
    subject_last: int = -1


def subject_last(rec: EditRecord, tok) -> int:
    """Index of the last token of ``rec.subject`` (its last occurrence) in the tokenized edit prompt: the length
    of the tokenized prompt text up to the subject's end, minus one (as MEMIT locates it); -1 when the record
    has no subject or the subject does not occur in the prompt (editors that need it report such records)."""
    end = -1 if rec.subject is None else rec.prompt.rfind(rec.subject)
    if end < 0:
        return -1
    return len(tok.encode(rec.prompt[:end + len(rec.subject)])) - 1


def tokenize(records: Sequence[EditRecord], tok, max_length: Optional[int] = None, *,
             skip_bad_rows: bool = False, report: Optional[ReadReport] = None) -> list[TokenizedRecord]:
    """Reference tokenization (docs/method.md §1): prompt with special tokens, ``" " + answer`` without.

    An answer that tokenizes to nothing, or a probe longer than ``max_length`` tokens (prompt + answer - 1),
    raises DataError naming file, row and field (or is skipped and counted with ``skip_bad_rows``).
    """
    out = []
    for rec in records:
        try:
            pairs = {}
            probes = [("edit", rec.prompt, rec.target, "target"), ("paraphrase", rec.paraphrase, rec.target, "target"),
                      ("locality", rec.loc_prompt, rec.loc_answer, "loc_answer")]
            probes += [(name, p, a, name) for name, p, a in rec.extra]
            for name, prompt, answer, answer_field in probes:
                p_ids = tok.encode(prompt)
                a_ids = tok.encode(" " + answer, add_special_tokens=False)
                where = f"{rec.source}: row {rec.row}"
                if not a_ids:
                    raise DataError(f"{where}: field {answer_field!r}: answer {answer!r} tokenizes to nothing")
                if not p_ids:
                    raise DataError(f"{where}: field {name!r}: prompt tokenizes to nothing")
                if max_length is not None and probe_length(p_ids, a_ids) > max_length:
                    raise DataError(f"{where}: field {name!r}: {probe_length(p_ids, a_ids)} tokens, more than "
                                    f"the configured length {max_length}")
                pairs[name] = (p_ids, a_ids)
        except DataError as e:
            if not skip_bad_rows:
                raise
            if report is not None:
                report.skipped.append(str(e))
            continue
        extra = {k: v for k, v in pairs.items() if k not in ("edit", "paraphrase", "locality")}
        out.append(TokenizedRecord(pairs["edit"], pairs["paraphrase"], pairs["locality"], extra,
                                   subject_last(rec, tok)))
    return out
