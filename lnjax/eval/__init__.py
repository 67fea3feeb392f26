"""Metrics of an edited model, each named by its protocol (docs/method.md §9).

- ``teacher_forced``: the reference ES / GS / LS — per example, the fraction of answer positions where
  argmax(logits) equals the label (the gold answer for specificity), then the mean over examples.
- ``locality_vs_unedited``: on the locality prompts, the fraction of answer positions where the edited model's
  argmax equals the *unedited* model's argmax (teacher-forced on the gold answer), mean over examples.
- ``generation_exact_match``: greedy generation of as many tokens as the answer has; 1 if all equal.

Greedy exact match needs no generation loop: in a causal decoder, greedy decoding reproduces the answer iff the
teacher-forced argmax is right at every answer position (by induction over the answer, each decoding step then
sees exactly the teacher-forced prefix). ``evaluate`` therefore reads it off the teacher-forced predictions
(``exact_match``), which saves ``len(answer)`` full forward passes per probe; ``greedy_exact_match`` is the
decoding loop itself, kept as the reference the tests compare against.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lnjax.core.metrics import token_accuracy
from lnjax.core.turns import IGNORE, TurnBatch, pack
from lnjax.data import TokenizedRecord

PROBES = ("edit", "paraphrase", "locality")


@dataclasses.dataclass
class EvalSet:
    """Packed probes of a list of records: name -> TurnBatch [n, L] (record order), and the raw pairs."""

    batches: dict
    pairs: dict

    @property
    def size(self) -> int:
        return self.batches["edit"].input_ids.shape[0]

    def subset(self, idx: np.ndarray) -> "EvalSet":
        take = lambda tb: jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], tb)
        return EvalSet({k: take(v) for k, v in self.batches.items()},
                       {k: [v[i] for i in idx] for k, v in self.pairs.items()})


def build_eval_set(records: Sequence[TokenizedRecord]) -> EvalSet:
    """Pack every probe of ``records`` (edit, paraphrase, locality and shared extras) for evaluation."""
    pairs = {name: [getattr(r, name) for r in records] for name in PROBES}
    extras = set.intersection(*(set(r.extra) for r in records)) if records else set()
    for name in sorted(extras):
        pairs[name] = [r.extra[name] for r in records]
    return EvalSet({k: pack(v) for k, v in pairs.items()}, pairs)


def _chunked(fn: Callable, params, arrays: Sequence[np.ndarray], chunk: int) -> np.ndarray:
    """Run ``fn(params, *arrays)`` over the leading axis in fixed-size chunks (the last padded) so that one
    compile serves every chunk; ``params`` is an argument, never a baked-in constant."""
    n = arrays[0].shape[0]
    outs = []
    for s in range(0, n, chunk):
        part = [a[s:s + chunk] for a in arrays]
        pad = chunk - part[0].shape[0]
        if pad:
            part = [np.concatenate([p, np.zeros((pad,) + p.shape[1:], p.dtype)]) for p in part]
        outs.append(np.asarray(fn(params, *part))[:chunk - pad])
    return np.concatenate(outs) if outs else np.zeros((0,))


def predictions(apply: Callable, params, batch: TurnBatch, chunk: int = 256) -> np.ndarray:
    """Teacher-forced argmax token at every position [n, L] (int32)."""
    return _chunked(_argmax_fn(apply), params, [np.asarray(batch.input_ids), np.asarray(batch.attention_mask)],
                    chunk)


@functools.lru_cache(maxsize=16)
def _argmax_fn(apply: Callable) -> Callable:
    return jax.jit(lambda params, ids, mask: jnp.argmax(apply(params, ids, mask), axis=-1).astype(jnp.int32))


def agreement(preds: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per example, the fraction of supervised positions where two models' argmax agree [n]."""
    return token_accuracy(preds, labels, target=reference)


def exact_match(preds, labels) -> np.ndarray:
    """Per example, 1.0 where the argmax ``preds`` [n, L] equals ``labels`` [n, L] at every supervised position
    (0 for an example without any) [n]: the greedy exact match of a causal decoder (module docstring)."""
    # token_accuracy is hits / supervised, exactly 1.0 iff every supervised position is a hit (0 without any)
    return (token_accuracy(np.asarray(preds), np.asarray(labels)) == 1.0).astype(np.float64)


def greedy_exact_match(apply: Callable, params, pairs: Sequence[tuple], chunk: int = 256) -> np.ndarray:
    """Greedy-generate ``len(answer)`` tokens after each prompt; 1.0 where they equal the answer [n].

    The decoding loop (one forward per answer token); ``exact_match`` of the teacher-forced predictions gives the
    same numbers at the cost of one forward."""
    if not pairs:
        return np.zeros((0,))
    A = max(len(a) for _, a in pairs)
    L = max(len(p) for p, _ in pairs) + A
    n = len(pairs)
    buf = np.zeros((n, L), np.int32)
    plen = np.zeros((n,), np.int32)
    ans = np.full((n, A), -1, np.int32)
    for i, (p, a) in enumerate(pairs):
        buf[i, :len(p)] = p
        plen[i] = len(p)
        ans[i, :len(a)] = a

    return _chunked(_generate_fn(apply, L, A), params, [buf, plen, ans], chunk)


@functools.lru_cache(maxsize=16)
def _generate_fn(apply: Callable, L: int, A: int) -> Callable:
    def gen(params, buf, plen, ans):
        rows = jnp.arange(buf.shape[0])

        def step(t, carry):
            ids, out = carry
            mask = (jnp.arange(L)[None, :] < (plen + t)[:, None]).astype(jnp.int32)
            logits = apply(params, ids, mask)
            nxt = jnp.argmax(logits[rows, plen + t - 1], axis=-1).astype(jnp.int32)
            ids = ids.at[rows, plen + t].set(nxt)
            return ids, out.at[:, t].set(nxt)

        _, out = jax.lax.fori_loop(0, A, step, (buf, jnp.zeros((buf.shape[0], A), jnp.int32)))
        return jnp.all((out == ans) | (ans < 0), axis=1).astype(jnp.float32)

    return jax.jit(gen)


def base_predictions(apply: Callable, params, eval_set: EvalSet) -> np.ndarray:
    """The unedited model's teacher-forced argmax on the locality probes (for ``locality_vs_unedited``)."""
    return predictions(apply, params, eval_set.batches["locality"])


def evaluate(apply: Callable, params, eval_set: EvalSet, base_locality: Optional[np.ndarray] = None,
             protocols: Sequence[str] = ("teacher_forced", "locality_vs_unedited", "generation_exact_match"),
             per_example: bool = False) -> dict:
    """Metrics of ``params`` on ``eval_set`` under each protocol (see the module docstring).

    ``base_locality`` is ``base_predictions`` of the unedited model (needed for ``locality_vs_unedited``). With
    ``per_example`` the per-example arrays are returned under ``"per_example"`` too.
    """
    out: dict = {}
    per: dict = {}
    b = eval_set.batches
    if set(protocols) & {"teacher_forced", "locality_vs_unedited", "generation_exact_match"}:
        preds = {k: predictions(apply, params, v) for k, v in b.items()}
        acc = {k: token_accuracy(preds[k], np.asarray(v.labels)) for k, v in b.items()}
        if "teacher_forced" in protocols:
            names = {"edit": "efficacy", "paraphrase": "generalization", "locality": "specificity"}
            out["teacher_forced"] = {names.get(k, k): float(v.mean()) for k, v in acc.items()}
            per.update({f"teacher_forced.{names.get(k, k)}": v for k, v in acc.items()})
        if "locality_vs_unedited" in protocols:
            if base_locality is None:
                raise ValueError("locality_vs_unedited needs base_locality (the unedited model's predictions)")
            agree = agreement(preds["locality"], base_locality, np.asarray(b["locality"].labels))
            out["locality_vs_unedited"] = float(agree.mean())
            per["locality_vs_unedited"] = agree
    if "generation_exact_match" in protocols:
        em = {"efficacy": exact_match(preds["edit"], np.asarray(b["edit"].labels)),
              "generalization": exact_match(preds["paraphrase"], np.asarray(b["paraphrase"].labels))}
        out["generation_exact_match"] = {k: float(v.mean()) for k, v in em.items()}
        per.update({f"generation_exact_match.{k}": v for k, v in em.items()})
    if per_example:
        out["per_example"] = per
    return out


def retention_by_turn(efficacy: np.ndarray, turn_of_example: np.ndarray, n_turns: int) -> np.ndarray:
    """Mean per-example efficacy of each turn's edits [n_turns] (NaN for turns with no example)."""
    sums = np.bincount(turn_of_example, weights=efficacy, minlength=n_turns)
    counts = np.bincount(turn_of_example, minlength=n_turns)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
