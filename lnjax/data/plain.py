"""Plain JSON lines — the layout a team writes its own corrections in (``lnjax edit``) — and the detection of an
edits file's layout among them and the published datasets' (``lnjax.data.DATASETS``).

    {"prompt": "Who is the CEO of Acme?", "target": "Jane Doe", "paraphrase": "Acme's chief executive is"}

one object per line: ``prompt`` and ``target`` required; ``paraphrase`` (for GS), ``loc_prompt`` with
``loc_answer`` and ``subject`` optional. Facts that must not change (``--probe``) are lines of ``prompt`` and
``answer``. Errors name the file, the row (the 0-based line number) and the field, as the other readers' do.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator, Optional

from lnjax.data import DATASETS, DataError, EditRecord, ReadReport, _Row, collect_usable, iter_json_array

JSONL = "jsonl"
# The field of an array's first row that tells the published layouts apart (``detect_layout``), most specific
# first (``read`` checks the rest of the row).
LAYOUT_FIELDS = (("counterfact", "requested_rewrite"), ("zsre", "src"), ("fever", "equiv_prompt"),
                 ("wikibigedit", "update"), ("easyedit", "target_new"), ("ultraeditbench", "rephrase_prompt"))
assert {d for d, _ in LAYOUT_FIELDS} == set(DATASETS)


def iter_jsonl(path: str) -> Iterator[tuple[int, object]]:
    """``(row, value)`` for each non-blank line of a JSON-lines file (``row``: the 0-based line number)."""
    with open(path, "rb") as f:
        for row, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: row {row}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {row}: invalid JSON ({e.msg})") from None
            yield row, value


def detect_layout(path: str) -> str:
    """The layout of an edits file: ``JSONL`` when it starts with an object, else the dataset (``DATASETS``)
    whose field (``LAYOUT_FIELDS``) the array's first row has; DataError naming the file when none fits."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head:
        raise DataError(f"{path}: empty file")
    if head[:1] == b"{":
        return JSONL
    if head[:1] != b"[":
        raise DataError(f"{path}: neither JSON lines nor a JSON array (it starts with {head[:1]!r})")
    for row, value in iter_json_array(path):
        if not isinstance(value, dict):
            raise DataError(f"{path}: row {row}: expected a JSON object, found {type(value).__name__}")
        for dataset, field in LAYOUT_FIELDS:
            if field in value:
                return dataset
        known = ", ".join(f"{field!r} ({dataset})" for dataset, field in LAYOUT_FIELDS)
        raise DataError(f"{path}: row {row}: its fields {sorted(value)} fit no known layout (a row has one of "
                        f"{known}); or write JSON lines of prompt, target, paraphrase")
    raise DataError(f"{path}: empty JSON array")


def read_jsonl(path: str, n: Optional[int] = None, *, strict: bool = False, report: Optional[ReadReport] = None,
               log: Optional[Callable[[str], None]] = None) -> list[EditRecord]:
    """The first ``n`` usable edits (all when None) of a plain JSON-lines file. A missing optional text is None
    (``tokenize`` then reports such a record as unusable for the probe it lacks). Unusable rows (an empty or
    missing required text, the same prompt and target as an earlier row) are skipped and reported as
    ``lnjax.data.read`` does, or raised with ``strict``."""
    quiet = report is None and log is None

    def parse_row(r: _Row) -> EditRecord:
        loc = r.text("loc_prompt", optional=True)
        return EditRecord(r.text("prompt"), r.text("target"), r.text("paraphrase", optional=True), loc,
                          r.text("loc_answer") if loc is not None else None, subject=r.text("subject", optional=True))

    return collect_usable(path, iter_jsonl(path), parse_row, n, strict=strict,
                          report=report if report is not None else ReadReport(), log=log, warn=quiet)


def read_probes_jsonl(path: str) -> list[tuple[str, str]]:
    """Facts ``(prompt, answer)`` from a JSON-lines file of ``prompt`` and ``answer`` (every row must be usable:
    a probe set with holes would measure less than it says)."""
    return [(r.text("prompt"), r.text("answer")) for r in (_Row(path, row, v) for row, v in iter_jsonl(path))]
