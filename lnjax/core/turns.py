"""The arrays of a turn (``TurnBatch``, ``EditTurn``) and their host-side packing from tokenized edits
(docs/method.md §1). NumPy only on the host; the types are pytrees, so the same arrays go into ``lax.scan``."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from flax import struct

IGNORE = -100

# Edits per forward/backward mini-batch within a turn, as the released UltraEdit/StableEdit/RLEdit code runs its
# turns (the datasets' ``batch_size: 10``; docs/method.md §1): the mini-batch is the unit the features' loss is
# averaged over and the statistics are merged by, so it changes results. Every lnjax default is this constant.
REFERENCE_MINIBATCH_SIZE = 10


@struct.dataclass
class TurnBatch:
    """Padded token arrays of edits: ``input_ids``, ``attention_mask``, ``labels`` with shape [..., E, L].

    Labels are aligned with logits (no shift): ``-100`` except at the supervised (answer) positions. Within a turn
    the edits are already in the reference order (longest first), so consecutive groups of ``minibatch_size``
    edits are the reference's mini-batches. A padded edit has no supervised position.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    labels: jax.Array


@struct.dataclass
class EditTurn:
    """Everything one turn offers an editor that asks for ``"turn"`` (docs/method.md §7), shapes [..., E, ...]:

    ``edit`` (TurnBatch [E, L], labels on the new answer), ``paraphrase`` and ``locality`` (TurnBatch [E, L'] or
    None) and ``subject_last`` [E] int32 (position of the subject's last token in the edit prompt, -1 when
    unknown). Stacked over turns every field gains a leading [T] axis.

    ``stream`` [E, L, d_model] (float32, or None): the *unedited* model's residual stream entering block
    ``stream_start`` (static) at every position of ``edit``. Sequential editing at blocks ``stream_start`` and
    above never changes what is below, so the probe runs only the blocks from there on
    (``lnjax.models.probe.turn_features``); ``lnjax.eval.prepare`` fills it from the states the unedited
    evaluation keeps (``lnjax.eval.FrozenPrefix``).
    """

    edit: TurnBatch
    paraphrase: Optional[TurnBatch] = None
    locality: Optional[TurnBatch] = None
    subject_last: Optional[jax.Array] = None
    stream: Optional[jax.Array] = None
    stream_start: Optional[int] = struct.field(pytree_node=False, default=None)

    @classmethod
    def of(cls, batch: "TurnBatch | EditTurn") -> "EditTurn":
        """``batch`` as an EditTurn: a TurnBatch becomes one with the edit arrays only; a missing
        ``subject_last`` becomes all -1 (shape of the edit labels minus the last axis)."""
        turn = batch if isinstance(batch, EditTurn) else cls(edit=batch)
        if turn.subject_last is not None:
            return turn
        labels = turn.edit.labels
        full = np.full if isinstance(labels, np.ndarray) else jax.numpy.full
        return turn.replace(subject_last=full(labels.shape[:-1], -1, np.int32))


def probe_length(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> int:
    """Tokens one probe occupies in a turn: the prompt and the answer without its last token."""
    return len(prompt_ids) + len(answer_ids) - 1


def example_arrays(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> tuple[list, list]:
    """(input_ids, labels) of one edit: prompt then answer without its last token; labels aligned with logits,
    ``-100`` on the first ``len(prompt) - 1`` positions, then the answer ids (one position per answer token)."""
    if len(prompt_ids) == 0 or len(answer_ids) == 0:
        raise ValueError("prompt and answer must each have at least one token")
    ids = list(prompt_ids) + list(answer_ids[:-1])
    labels = [IGNORE] * (len(prompt_ids) - 1) + list(answer_ids)
    return ids, labels


def pack(examples: Sequence[tuple[Sequence[int], Sequence[int]]], length: Optional[int] = None) -> TurnBatch:
    """Right-pad examples (prompt_ids, answer_ids) in the given order into a TurnBatch [n, L] (no sorting).

    ``length`` defaults to the longest example; a longer example raises ValueError naming its index.
    """
    pairs = [example_arrays(p, a) for p, a in examples]
    L = max((len(i) for i, _ in pairs), default=1) if length is None else int(length)
    ids = np.zeros((len(pairs), L), np.int32)
    mask = np.zeros((len(pairs), L), np.int32)
    labels = np.full((len(pairs), L), IGNORE, np.int32)
    for r, (i, lab) in enumerate(pairs):
        if len(i) > L:
            raise ValueError(f"example {r} has {len(i)} tokens, more than the configured length {L}")
        ids[r, :len(i)] = i
        mask[r, :len(i)] = 1
        labels[r, :len(lab)] = lab
    return TurnBatch(input_ids=ids, attention_mask=mask, labels=labels)


def pack_turns(examples: Sequence[tuple[Sequence[int], Sequence[int]]], n_edits: int,
               length: Optional[int] = None) -> tuple[TurnBatch, np.ndarray]:
    """Cut examples into turns of ``n_edits`` (the last one padded with empty edits), order each turn longest
    first (stable sort on token count, as the reference does), and pad to ``length``.

    Returns ``(TurnBatch [T, n_edits, L], order [T, n_edits])`` where ``order`` holds each slot's index into
    ``examples`` (-1 for padding).
    """
    if n_edits < 1:
        raise ValueError(f"n_edits must be >= 1, got {n_edits}")
    n = len(examples)
    T = max(-(-n // n_edits), 1)
    if length is None:
        length = max((probe_length(p, a) for p, a in examples), default=1)
    order = -np.ones((T, n_edits), np.int64)
    for t in range(T):
        idx = list(range(t * n_edits, min((t + 1) * n_edits, n)))
        sizes = [probe_length(*examples[i]) for i in idx]
        ranked = sorted(range(len(idx)), key=lambda j: -sizes[j])  # Python's sort is stable
        order[t, :len(idx)] = [idx[j] for j in ranked]
    flat = pack([examples[i] for i in order.reshape(-1) if i >= 0], length)
    out = [np.zeros((T * n_edits, length), np.int32), np.zeros((T * n_edits, length), np.int32),
           np.full((T * n_edits, length), IGNORE, np.int32)]
    real = order.reshape(-1) >= 0
    for arr, src in zip(out, (flat.input_ids, flat.attention_mask, flat.labels)):
        arr[real] = src
    shape = (T, n_edits, length)
    return TurnBatch(*(a.reshape(shape) for a in out)), order
