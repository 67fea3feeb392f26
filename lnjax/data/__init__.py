"""Readers for the published edit datasets in their exact JSON schemas (docs/method.md §10), and tokenization.

Files are JSON arrays (UTF-8); the first ``n`` usable rows are used, in order, and the array is parsed
incrementally so a 2M-row file is never held in memory twice (nor read past what is needed). Two kinds of problem,
both naming the file, the row and the field:

- a row that cannot be an edit (a required text empty or missing, a duplicate of an earlier edit): ``UnusableRow``.
  Files as distributed have such rows (MEND's ``zsre_mend_eval.json`` has empty ``alt`` targets), so ``read``
  skips them and reports each one (``ReadReport.skipped``, and ``log``); ``strict=True`` raises instead.
- anything else (invalid JSON or UTF-8, a file or row of the wrong layout, a number where a string belongs, a probe
  longer than the maximum length): ``DataError``, always raised.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import random
import warnings
from typing import Callable, Iterator, Optional, Sequence

from lnjax.core.turns import probe_length

DATASETS = ("zsre", "fever", "wikibigedit", "ultraeditbench", "counterfact", "easyedit")
# The two ZsRE layouts in circulation, told apart by their fields: UltraEdit's eval/train files carry the edit
# target as ``ans``; MEND's (``zsre_mend_eval.json``, also used by ROME, MEMIT, AlphaEdit, EasyEdit) as ``alt``
# with the true answers in ``answers``.
ZSRE_LAYOUTS = {"ultraedit": "ans", "mend": "alt"}


from lnjax.core.errors import DataError  # noqa: E402,F401  (raised here; its home is lnjax.core.errors)


class UnusableRow(DataError):
    """A row that cannot be an edit (``reason``: a required text empty or missing, a duplicate): skipped and
    reported by ``read`` and ``tokenize`` unless ``strict``. ``path``, ``row`` and ``field`` say where."""

    def __init__(self, path: str, row: int, field: str, reason: str):
        super().__init__(f"{path}: row {row}: field {field!r}: {reason}")
        self.path, self.row, self.field, self.reason = path, row, field, reason

    def as_dict(self) -> dict:
        """The JSON record of a skipped row (``results.json``'s ``data.skipped``)."""
        return {"file": self.path, "row": self.row, "field": self.field, "reason": self.reason}


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
    """What a reader did: rows read, rows skipped as unusable (``UnusableRow.as_dict`` records: file, row, field,
    reason) and the layout a multi-layout reader detected (``zsre``: ultraedit or mend)."""

    rows: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    layout: Optional[str] = None

    def skip(self, e: UnusableRow, strict: bool, log: Optional[Callable[[str], None]]) -> None:
        """Record ``e`` (or raise it when ``strict``); ``log`` gets one line naming the row."""
        if strict:
            raise e
        self.skipped.append(e.as_dict())
        if log is not None:
            log(f"{e}; row skipped (--strict makes this an error)")


class _JsonArrayReader:
    """``iter_json_array``'s reading state: decoded text ``buf`` (unread from ``pos``), whether the file ended,
    and the bytes and newlines read so far (for the byte offset and line of a non-UTF-8 byte)."""

    def __init__(self, f, path: str, chunk_size: int, utf8):
        self.f, self.path, self.chunk_size, self.utf8 = f, path, chunk_size, utf8
        self.buf, self.pos, self.eof, self.offset, self.lines = "", 0, False, 0, 0

    def fill(self) -> bool:
        raw = self.f.read(self.chunk_size)
        try:
            pending = self.utf8.getstate()[0]
            more = self.utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            bad = e.start - len(pending)  # the bad byte's index in ``raw`` (negative: in the pending bytes)
            line = self.lines + raw[:max(bad, 0)].count(b"\n") + 1
            raise DataError(f"{self.path}: line {line}, byte {self.offset + bad}: not UTF-8 ({e.reason}; the file "
                            "must be UTF-8 JSON)") from None
        self.offset += len(raw)
        self.lines += raw.count(b"\n")
        if not raw:
            self.eof = True
            return False
        self.buf, self.pos = self.buf[self.pos:] + more, 0
        return True

    def peek(self) -> Optional[str]:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n\ufeff":  # (a UTF-8 byte-order mark too)
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return None

    def value(self, decoder: json.JSONDecoder, row: int):
        """Decode the element at ``pos`` (reading more while it may continue) and move past it."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof or not self.fill():  # a number may continue in the next chunk
                    break
            except json.JSONDecodeError as e:
                if not self.fill():
                    raise DataError(f"{self.path}: row {row}: invalid JSON ({e.msg})") from None
        self.pos = end
        return value


def iter_json_array(path: str, chunk_size: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Yield ``(row, value)`` for each element of the JSON array in ``path``, reading ``chunk_size`` bytes at a
    time (memory: one chunk plus the element being parsed). DataError for bytes that are not UTF-8 (naming line and
    byte offset), invalid JSON, or anything but one array (naming the row)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        r, row = _JsonArrayReader(f, path, chunk_size, utf8), 0
        c = r.peek()
        if c is None:
            raise DataError(f"{path}: empty file (expected a JSON array)")
        if c != "[":
            kind = "JSON lines or a single object" if c == "{" else repr(c)
            raise DataError(f"{path}: expected a JSON array, found {kind} at the start of the file")
        r.pos += 1
        if r.peek() == "]":
            return
        while True:
            if r.peek() is None:
                raise DataError(f"{path}: row {row}: file ends inside the JSON array")
            value = r.value(decoder, row)
            yield row, value
            row += 1
            c = r.peek()
            if c == "]":
                r.pos += 1
                after = r.peek()
                if after is not None:
                    raise DataError(f"{path}: unexpected {after!r} after the JSON array's closing ']' (two arrays, or "
                                    "a damaged file?)")
                return
            if c is None:
                raise DataError(f"{path}: row {row}: file ends inside the JSON array")
            if c != ",":
                raise DataError(f"{path}: row {row}: expected ',' between array elements, found {c!r}")
            r.pos += 1


class _Row:
    """Field access for one raw row with errors that name file, row and field."""

    def __init__(self, path: str, row: int, value):
        if not isinstance(value, dict):
            raise DataError(f"{path}: row {row}: expected a JSON object, found {type(value).__name__}")
        self.path, self.row, self.value = path, row, value

    def err(self, field: str, msg: str) -> DataError:
        """A structural error (wrong type or layout): always raised."""
        return DataError(f"{self.path}: row {self.row}: field {field!r}: {msg}")

    def unusable(self, field: str, reason: str) -> UnusableRow:
        """The row cannot be an edit (empty or missing text): skipped unless strict."""
        return UnusableRow(self.path, self.row, field, reason)

    def get(self, dotted: str, optional: bool = False):
        node, parts = self.value, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict):
                raise self.err(".".join(parts[:i]), f"expected an object, found {type(node).__name__}")
            if node.get(part) is None:  # absent or null
                if optional:
                    return None
                raise self.unusable(dotted, "missing" if part not in node else "null")
            node = node[part]
        return node

    def text(self, dotted: str, optional: bool = False) -> Optional[str]:
        v = self.get(dotted, optional)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise self.err(dotted, f"expected a string, found {type(v).__name__}")
        if not v.strip():
            raise self.unusable(dotted, "empty")
        return v

    def text_list(self, dotted: str) -> list[str]:
        v = self.get(dotted)
        if not isinstance(v, list):
            raise self.err(dotted, f"expected a non-empty list of strings, found {type(v).__name__}")
        if not v:
            raise self.unusable(dotted, "empty list")
        for i, x in enumerate(v):
            if not isinstance(x, str):
                raise self.err(f"{dotted}[{i}]", f"expected a string, found {type(x).__name__}")
            if not x.strip():
                raise self.unusable(f"{dotted}[{i}]", "empty")
        return v


def zsre_layout(r: "_Row", known: Optional[str] = None) -> str:
    """``"ultraedit"`` (target ``ans``) or ``"mend"`` (target ``alt``, with ``answers``) for a ZsRE row; with the
    file's ``known`` layout, a row of the other layout (it has that layout's own field, ``ans`` or ``answers``, and
    not this one's) is a DataError and a row without this layout's target an UnusableRow."""
    if known is None:
        for layout, field in ZSRE_LAYOUTS.items():
            if field in r.value:
                return layout
        raise r.unusable("ans", "missing (neither UltraEdit's 'ans' nor MEND's 'alt' + 'answers' is present)")
    own = {"ultraedit": "ans", "mend": "answers"}
    other = next(layout for layout in ZSRE_LAYOUTS if layout != known)
    if own[other] in r.value and own[known] not in r.value:
        raise r.err(ZSRE_LAYOUTS[known], f"missing: the file is in the {known} layout (from its first row) but "
                    f"this row is in the {other} layout")
    if ZSRE_LAYOUTS[known] not in r.value:
        raise r.unusable(ZSRE_LAYOUTS[known], "missing")
    return known


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
    if value is None or value == []:
        raise r.unusable(field, "missing")
    if not isinstance(value, str):
        raise r.err(field, f"expected a string or list of strings, found {type(value).__name__}")
    if not value.strip():
        raise r.unusable(field, "empty")
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
        if prompt is None or prompt == []:
            raise r.unusable(f"{where}.prompt", "missing")
        if not isinstance(prompt, str):
            raise r.err(f"{where}.prompt", f"expected a string, found {type(prompt).__name__}")
        if not prompt.strip():
            raise r.unusable(f"{where}.prompt", "empty")
        if "ground_truth" not in item:
            raise r.unusable(f"{where}.ground_truth", "missing")
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
            raise r.unusable("locality", "empty (no locality probe)")
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
        raise r.unusable("requested_rewrite.prompt", "has no '{}' for the subject")
    prompt = template.replace("{}", r.text("requested_rewrite.subject"))
    return EditRecord(prompt, r.text("requested_rewrite.target_new.str"), r.text_list("paraphrase_prompts")[0],
                      r.text_list("neighborhood_prompts")[0], r.text("requested_rewrite.target_true.str"),
                      subject=r.text("requested_rewrite.subject"))


_PARSERS: dict[str, Callable] = {"zsre": _zsre, "fever": _fever, "wikibigedit": _wikibigedit,
                                 "ultraeditbench": _ultraeditbench, "counterfact": _counterfact,
                                 "easyedit": _easyedit}


def read(dataset: str, path: str, n: Optional[int] = None, *, seed: int = 0, strict: bool = False,
         report: Optional[ReadReport] = None, log: Optional[Callable[[str], None]] = None) -> list[EditRecord]:
    """The first ``n`` usable records (all when None) of ``path`` in ``dataset``'s schema.

    A row that cannot be an edit (``UnusableRow``: a required text empty or missing, or the same prompt and target
    as an earlier row) is skipped and recorded in ``report.skipped`` (one ``log`` line each; a warning when
    neither ``report`` nor ``log`` is given); ``strict=True`` raises it instead. Every other problem raises
    ``DataError``, as do fewer than ``n`` usable rows. FEVER's paraphrase is a choice from ``equiv_prompt`` seeded
    by ``seed``. ZsRE files in either layout are read (``ZSRE_LAYOUTS``): the first usable row decides,
    ``report.layout`` says which, and a row of the other layout raises DataError.
    """
    if dataset not in _PARSERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")
    parse = _PARSERS[dataset]
    rng = random.Random(seed)
    quiet = report is None and log is None
    report = report if report is not None else ReadReport()

    def parse_row(r: _Row) -> EditRecord:
        if dataset != "zsre":
            return parse(r, rng)
        layout = zsre_layout(r, report.layout)
        rec = _zsre(r, rng, layout)
        report.layout = layout
        return rec

    return collect_usable(path, iter_json_array(path), parse_row, n, strict=strict, report=report, log=log,
                          warn=quiet)


def collect_usable(path: str, rows, parse_row: Callable, n: Optional[int], *, strict: bool, report: ReadReport,
                   log: Optional[Callable[[str], None]], warn: bool) -> list[EditRecord]:
    """The first ``n`` usable records (all when None) of ``rows`` (``(row index, JSON value)`` pairs of ``path``),
    each parsed by ``parse_row(_Row) -> EditRecord``: the one loop of every reader. An ``UnusableRow`` (from the
    parser, or the same prompt and target as an earlier row) is recorded in ``report`` (raised with ``strict``),
    with a warning when ``warn`` (the caller was given neither a report nor a log); fewer than ``n`` usable rows
    raise ``DataError`` naming the first skipped row."""
    skipped_before = len(report.skipped)
    out, seen = [], {}
    for row, value in rows:
        if n is not None and len(out) >= n:
            break
        report.rows += 1
        r = _Row(path, row, value)
        try:
            rec = parse_row(r)
            first = seen.setdefault((rec.prompt, rec.target), row)
            if first != row:
                raise r.unusable("prompt", f"the same edit (prompt and target) as row {first}")
        except UnusableRow as e:
            report.skip(e, strict, log)
            continue
        out.append(dataclasses.replace(rec, source=path, row=row))
    skipped = len(report.skipped) - skipped_before
    if warn and skipped:
        warnings.warn(f"{path}: {skipped} unusable rows skipped (the first: {report.skipped[skipped_before]}); "
                      "pass a ReadReport to see them all, or strict=True to refuse them", stacklevel=3)
    if n is not None and len(out) < n:
        first = report.skipped[skipped_before] if skipped else None
        raise DataError(f"{path}: {n} records were asked for, the file has {len(out)} usable rows"
                        + (f" ({skipped} skipped as unusable, the first: row {first['row']}: field "
                           f"{first['field']!r}: {first['reason']})" if skipped else ""))
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


def encode_probe(tok, prompt: Optional[str], answer: str, source: str, row: int, field: str,
                 answer_field: Optional[str] = None, max_length: Optional[int] = None) -> tuple[list, list]:
    """``(prompt_ids, answer_ids)`` of one probe by the reference tokenization (docs/method.md §1: the prompt with
    special tokens, ``" " + answer`` without). A prompt that is missing (None) or tokenizes to nothing, or an answer
    that tokenizes to nothing, is an ``UnusableRow``; more than ``max_length`` tokens (prompt + answer - 1), or text
    the tokenizer cannot encode, a ``DataError``; both name ``source``, ``row`` and the field (``field`` for the
    prompt, ``answer_field`` (default ``field``) for the answer)."""
    if prompt is None:  # a plain JSON-lines record (lnjax.data.plain) may leave its optional probes out
        raise UnusableRow(source, row, field, "missing")
    try:
        p_ids = tok.encode(prompt)
        a_ids = tok.encode(" " + answer, add_special_tokens=False)
    except Exception as e:  # a tokenizer raises its own types for text it cannot encode
        raise DataError(f"{source}: row {row}: field {field!r}: the tokenizer cannot encode it "
                        f"({type(e).__name__}: {e})") from None
    if not a_ids:
        raise UnusableRow(source, row, answer_field or field, f"answer {answer!r} tokenizes to nothing")
    if not p_ids:
        raise UnusableRow(source, row, field, "prompt tokenizes to nothing")
    if max_length is not None and probe_length(p_ids, a_ids) > max_length:
        raise DataError(f"{source}: row {row}: field {field!r}: {probe_length(p_ids, a_ids)} tokens, more than the "
                        f"maximum length {max_length} (--max-length)")
    return p_ids, a_ids


def tokenize_record(rec: EditRecord, tok, max_length: Optional[int] = None) -> TokenizedRecord:
    """One record's probes tokenized (reference tokenization, docs/method.md §1: prompt with special tokens,
    ``" " + answer`` without). An answer or prompt that tokenizes to nothing is an ``UnusableRow``; a probe longer
    than ``max_length`` tokens (prompt + answer - 1), or text the tokenizer cannot encode, a ``DataError``; both
    name file, row and field."""
    probes = [("edit", rec.prompt, rec.target, "target"), ("paraphrase", rec.paraphrase, rec.target, "target"),
              ("locality", rec.loc_prompt, rec.loc_answer, "loc_answer")]
    probes += [(name, p, a, name) for name, p, a in rec.extra]
    pairs = {name: encode_probe(tok, prompt, answer, rec.source, rec.row, name, answer_field, max_length)
             for name, prompt, answer, answer_field in probes}
    extra = {k: v for k, v in pairs.items() if k not in ("edit", "paraphrase", "locality")}
    return TokenizedRecord(pairs["edit"], pairs["paraphrase"], pairs["locality"], extra, subject_last(rec, tok))


def tokenize(records: Sequence[EditRecord], tok, max_length: Optional[int] = None, *, strict: bool = False,
             report: Optional[ReadReport] = None, log: Optional[Callable[[str], None]] = None
             ) -> list[TokenizedRecord]:
    """``tokenize_record`` of each record; an ``UnusableRow`` is skipped and recorded in ``report`` (as ``read``
    does; raised when ``strict``), every other error raised."""
    quiet = report is None and log is None
    report = report if report is not None else ReadReport()
    out, before = [], len(report.skipped)
    for rec in records:
        try:
            out.append(tokenize_record(rec, tok, max_length))
        except UnusableRow as e:
            report.skip(e, strict, log)
    if quiet and len(report.skipped) > before:
        warnings.warn(f"{len(report.skipped) - before} unusable records skipped (the first: "
                      f"{report.skipped[before]}); pass a ReadReport to see them all, or strict=True to refuse them",
                      stacklevel=2)
    return out
