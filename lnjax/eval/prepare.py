"""The setup every sequential-editing run shares: records → tokens → turns → evaluation set → unedited predictions.

``prepare_edits(records, tok, model, edits_per_turn=...)`` is what ``lnjax run`` (``lnjax.app.run.prepare_job``) and
the experiment scripts call before ``edit_sequence`` (it lives in the eval layer, below ``world`` and ``app``, so a
testbed in ``lnjax.world`` can use it too); it returns a ``PreparedEdits`` holding the packed edit turns
(with each slot's record index and subject position, for the editors that locate the subject), the tokenized warm-up
records (packed on demand, ``warmup_turns(r)``, to the same probe length) and the evaluation set with the unedited
model's locality predictions, so every caller packs, orders and pads the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from lnjax import data as data_lib
from lnjax import eval as eval_lib
from lnjax.core.turns import EditTurn, TurnBatch, pack_turns, probe_length
from lnjax.models import split_stages


@dataclasses.dataclass
class PreparedEdits:
    """The edits of a run, packed. ``T`` turns of ``E = edits_per_turn`` edits, probe length ``L``:

    - ``records``: the tokenized edit records (``TokenizedRecord``), in stream order; ``n = len(records)``.
    - ``turns``: TurnBatch [T, E, L] (each turn longest first, the last padded with empty edits; ``pack_turns``).
    - ``order``: int [T, E], each slot's index into ``records`` (-1 for padding).
    - ``subject_last``: int32 [T, E], the subject's last token in each slot's edit prompt (-1: unknown or padding).
    - ``length``: L, the longest probe of the edits *and* the warm-up records, so warm-up turns stack with edits.
    - ``warmup_records``: tokenized warm-up records (packed by ``warmup_turns``).
    - ``eval_set``: ``lnjax.eval.EvalSet`` of ``records[eval_records]`` (all records by default), [n_eval, L'];
      None when ``eval_records`` is None.
    - ``base_loc``: int [n_eval, L_loc], the unedited model's teacher-forced argmax on the locality probes
      (``locality_vs_unedited``); None without a model or an evaluation set.
    - ``unedited``: {probe: int [n_eval, L_probe]}, the unedited model's predictions of every probe set of
      ``eval_set`` (``base_loc`` is its ``"locality"``), computed in one pooled pass so the unedited evaluation
      reuses them (``evaluate(..., known=unedited)``); None when ``base_loc`` is.
    - ``eval_index``: int [n_eval], each evaluation record's index into ``records``.
    """

    records: list
    turns: TurnBatch
    order: np.ndarray
    subject_last: np.ndarray
    length: int
    edits_per_turn: int
    warmup_records: list
    eval_set: Optional[eval_lib.EvalSet]
    base_loc: Optional[np.ndarray]
    unedited: Optional[dict] = None
    eval_index: Optional[np.ndarray] = None

    @property
    def n_turns(self) -> int:
        return int(self.order.shape[0])

    @property
    def turn_of_example(self) -> np.ndarray:
        """int [n]: the turn each record is edited in (records are cut into turns in stream order)."""
        return np.arange(len(self.records)) // self.edits_per_turn

    def edit_turns(self) -> EditTurn:
        """The turns as an EditTurn [T, ...] (edit arrays and ``subject_last``), for editors that locate the
        subject (MEMIT, AlphaEdit)."""
        return EditTurn(edit=self.turns, subject_last=self.subject_last)

    def streamed_turns(self, model, warmup: Optional[TurnBatch] = None) -> Optional[tuple]:
        """``(turns, warm-up)`` as EditTurns [T, E, ...] carrying the unedited residual stream entering the lowest
        edited block (``EditTurn.stream`` [T, E, L, d_model]), so that each turn's probe runs only the blocks from
        there on. The edit turns' streams are the ones the unedited evaluation kept for the same rows
        (``eval_set.prefix``: an edit row is its record's efficacy probe); those of edits outside the evaluation
        set and of the warm-up turns are computed here, a turn at a time. None when the evaluation kept none."""
        prefix = None if self.eval_set is None else self.eval_set.prefix
        if prefix is None or self.eval_index is None:
            return None
        where = np.full(len(self.records), -1)
        where[self.eval_index] = np.arange(len(self.eval_index))
        slots = np.where(self.order >= 0, where[np.maximum(self.order, 0)], -1)
        states = prefix.states["edit"]                                            # [n_eval, L_e, d]
        w = min(self.length, states.shape[1])
        stream = np.zeros(self.order.shape + (self.length, states.shape[2]), np.float32)
        stream[..., :w, :] = states[np.maximum(slots, 0), :w]
        for t in np.flatnonzero(((slots < 0) & (self.order >= 0)).any(axis=1)):  # edits the evaluation skipped
            own = eval_lib.prefix_states(model.apply, model.params, np.asarray(self.turns.input_ids[t]),
                                         np.asarray(self.turns.attention_mask[t]), prefix.start)
            stream[t, slots[t] < 0] = own[slots[t] < 0]
        stream[self.order < 0] = 0.0                                               # padding slots: no edit
        turns = EditTurn(edit=self.turns, stream=stream, stream_start=prefix.start)
        if warmup is None:
            return turns, None
        ids, mask = (np.asarray(a) for a in (warmup.input_ids, warmup.attention_mask))
        h = eval_lib.prefix_states(model.apply, model.params, ids.reshape(-1, ids.shape[-1]),
                                   mask.reshape(-1, mask.shape[-1]), prefix.start)
        return turns, EditTurn(edit=warmup, stream=h.reshape(ids.shape + (h.shape[-1],)), stream_start=prefix.start)

    def turn_slice(self, start: int, stop: Optional[int] = None) -> TurnBatch:
        """Turns [start, stop) as a TurnBatch [stop - start, E, L]: the same arrays packing those turns' records
        alone gives (each turn is ordered on its own)."""
        return jax.tree_util.tree_map(lambda a: a[start:stop], self.turns)

    def warmup_turns(self, n_turns: Optional[int] = None) -> Optional[TurnBatch]:
        """The first ``n_turns`` turns of warm-up records (all of them by default) as a TurnBatch [n_turns, E, L],
        or None for none."""
        records = self.warmup_records if n_turns is None else self.warmup_records[:n_turns * self.edits_per_turn]
        if not records:
            return None
        return pack_turns([r.edit for r in records], self.edits_per_turn, self.length)[0]


def _as_records(rows: Sequence, source: str = "world") -> list:
    """``EditRecord``s as given; dict rows (``World.records``) parsed with the ZsRE schema checks."""
    rows = list(rows)
    if rows and isinstance(rows[0], dict):
        return data_lib.records_from_dicts("zsre", rows, source)
    return rows


def prepare_edits(records: Sequence, tok, model=None, *, edits_per_turn: int, n_turns: Optional[int] = None,
                  warmup_records: Sequence = (), max_length: Optional[int] = None, eval_records=slice(None),
                  strict: bool = False, report: Optional[data_lib.ReadReport] = None,
                  log: Optional[Callable[[str], None]] = None,
                  targets: Optional[Sequence[str]] = None) -> PreparedEdits:
    """Tokenize, pack and evaluate-prepare ``records`` for a sequential run of ``edits_per_turn`` edits per turn.

    ``records`` and ``warmup_records`` are ``EditRecord``s (``lnjax.data.read``, ``records_from_dicts``,
    ``facts.edit_records``) or the dict rows of ``World.records`` (parsed as ZsRE). Tokenization (``lnjax.data.tokenize``) refuses probes longer than ``max_length`` and skips unusable
    records into ``report`` (``strict``: raises). With ``n_turns`` the run needs ``n_turns * edits_per_turn``
    usable edits (a ValueError otherwise) and takes the first that many; without it every usable record is
    edited, the last turn padded. ``eval_records`` (a slice or index array into the tokenized records; None for no
    evaluation set) picks the records the evaluation set holds; ``model`` (``.apply``, ``.params``) gives the unedited locality predictions.
    With ``targets`` (the modules the run edits) the unedited residual streams entering the lowest edited block
    are kept with the evaluation set (``lnjax.eval.FrozenPrefix``), so that evaluating the edited model runs only
    the blocks from there on. Shapes: see ``PreparedEdits``.
    """
    opts = dict(strict=strict, report=report, log=log)
    tokenized = data_lib.tokenize(_as_records(records), tok, max_length, **opts)
    warm = data_lib.tokenize(_as_records(warmup_records, "world:warm-up"), tok, max_length, **opts) if len(warmup_records) \
        else []
    if n_turns is not None:
        n = n_turns * edits_per_turn
        if len(tokenized) < n:
            skipped = len(report.skipped) if report is not None else len(records) - len(tokenized)
            raise ValueError(f"only {len(tokenized)} of {n} edits are usable ({skipped} skipped)")
        tokenized = tokenized[:n]
    if not tokenized:
        raise ValueError("no usable edits to prepare")
    length = max(probe_length(*r.edit) for r in tokenized + warm)
    turns, order = pack_turns([r.edit for r in tokenized], edits_per_turn, length)
    subject_last = np.array([tokenized[i].subject_last if i >= 0 else -1 for i in order.reshape(-1)],
                            np.int32).reshape(order.shape)
    eval_set = base_loc = unedited = eval_index = None
    if eval_records is not None:
        eval_index = np.arange(len(tokenized))[eval_records]
        selected = [tokenized[i] for i in eval_index]
        eval_set = eval_lib.build_eval_set(selected)
        if model is not None:
            stages = split_stages(model.apply)
            start = None if stages is None or not targets else stages.first_block(targets)
            if start:
                unedited, eval_set.prefix = eval_lib.frozen_prefix_predictions(model.apply, model.params,
                                                                               eval_set.batches, start)
            else:
                unedited = eval_lib.predictions_of(model.apply, model.params, eval_set.batches)
            base_loc = unedited["locality"]
    return PreparedEdits(records=tokenized, turns=turns, order=order, subject_last=subject_last, length=length,
                         edits_per_turn=edits_per_turn, warmup_records=warm, eval_set=eval_set, base_loc=base_loc,
                         unedited=unedited, eval_index=eval_index)
