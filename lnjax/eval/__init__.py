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

Every metric reads the argmax at the supervised positions only, so ``predictions`` computes nothing else: the
rows of all probe sets are pooled, sorted by length and cut into length buckets (``plan_buckets``: each bucket
padded to its own longest row, never to the longest probe of the set), each bucket runs in calls of a row count
fitted to it, and the vocabulary projection (``Model.head``) is applied to the gathered hidden states of the
answer positions only. ``dense_predictions`` is the previous computation (every position, fixed chunks of
padded rows), kept as the reference the tests hold the new one to.
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
from lnjax.models import split_apply, split_stages

PROBES = ("edit", "paraphrase", "locality")


@dataclasses.dataclass
class EvalSet:
    """Packed probes of a list of records: name -> TurnBatch [n, L] (record order), and the raw pairs."""

    batches: dict
    pairs: dict
    prefix: Optional["FrozenPrefix"] = None   # the unedited residual streams below the edited blocks, if kept

    @property
    def size(self) -> int:
        return self.batches["edit"].input_ids.shape[0]

    def subset(self, idx: np.ndarray) -> "EvalSet":
        take = lambda tb: jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], tb)
        return EvalSet({k: take(v) for k, v in self.batches.items()},
                       {k: [v[i] for i in idx] for k, v in self.pairs.items()},
                       None if self.prefix is None else self.prefix.subset(idx))


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


def dense_predictions(apply: Callable, params, batch: TurnBatch, chunk: int = 256) -> np.ndarray:
    """Teacher-forced argmax token at every position [n, L] (int32), in chunks of ``chunk`` rows padded to the
    batch's length: the reference computation ``predictions`` must agree with at the supervised positions."""
    return _chunked(_argmax_fn(apply), params, [np.asarray(batch.input_ids), np.asarray(batch.attention_mask)],
                    chunk)


@functools.lru_cache(maxsize=16)
def _argmax_fn(apply: Callable) -> Callable:
    return jax.jit(lambda params, ids, mask: jnp.argmax(apply(params, ids, mask), axis=-1).astype(jnp.int32))


# Bucketing: lengths are multiples of LENGTH_GRAIN and row counts of ROW_GRAIN (fewer distinct shapes, so compiled
# programs are shared between probe sets, evaluation points and editors, at a few percent of padding); a bucket
# costs COMPILE_TOKENS padded tokens' worth extra (one more program to compile), which decides when merging two
# lengths beats padding one up to the other.
LENGTH_GRAIN = 2
ROW_GRAIN = 4
COMPILE_TOKENS = 1024


def tokens_per_call() -> int:
    """Rows × length of one evaluation call: small on the CPU (cache-resident activations run faster per token
    there), large on accelerators (whose throughput grows with the batch)."""
    return 1024 if jax.default_backend() == "cpu" else 32768


def plan_buckets(lengths: np.ndarray, budget: Optional[int] = None, length_grain: int = LENGTH_GRAIN,
                 row_grain: int = ROW_GRAIN, compile_tokens: int = COMPILE_TOKENS) -> list[tuple[int, int, np.ndarray]]:
    """Length buckets for rows of ``lengths`` [n] (tokens each row needs): ``[(L, B, rows)]`` where every row of
    ``rows`` (indices into ``lengths``) fits in ``L`` (a multiple of ``length_grain``) and runs in calls of ``B``
    rows (``B * L`` at most ``budget``, the rows split evenly over the calls, ``B`` a multiple of ``row_grain`` or a
    power of two below it). The bucket tops minimise padded tokens plus ``compile_tokens`` per bucket (an exact
    dynamic program over the distinct rounded lengths)."""
    budget = budget or tokens_per_call()
    lengths = np.asarray(lengths, np.int64)
    if lengths.size == 0:
        return []
    tops = -(-np.maximum(lengths, 1) // length_grain) * length_grain
    values, counts = np.unique(tops, return_counts=True)
    k = len(values)
    best = np.full(k + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(k + 1, np.int64)
    for j in range(1, k + 1):  # best[j]: cost of the first j distinct lengths, the last bucket ending at j - 1
        for i in range(j):
            cost = best[i] + counts[i:j].sum() * values[j - 1] + compile_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], k
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    plan = []
    for i, j in reversed(bounds):
        L = int(values[j - 1])
        rows = np.flatnonzero((tops >= values[i]) & (tops <= values[j - 1]))
        cap = max(1, budget // L)                       # most rows one call may take
        cap = cap // row_grain * row_grain if cap >= row_grain else 1 << (cap.bit_length() - 1)
        calls = -(-len(rows) // cap)
        per_call = -(-len(rows) // calls)               # the rows spread evenly over the calls
        B = -(-per_call // row_grain) * row_grain if per_call > row_grain else 1 << (per_call - 1).bit_length()
        plan.append((L, B, rows))                       # B <= cap: both multiples of row_grain (or powers of 2)
    return plan


@functools.lru_cache(maxsize=16)
def _supervised_argmax_fn(apply: Callable) -> Callable:
    """jit of ``(params, ids [B, L], mask [B, L], pos [B, A]) -> argmax [B, A]`` at positions ``pos``: the
    hidden states, gathered, then the vocabulary projection (``lnjax.models.split_apply``); for an ``apply``
    that cannot be split, its logits gathered."""
    parts = split_apply(apply)

    def fn(params, ids, mask, pos):
        if parts is None:
            logits = jnp.take_along_axis(apply(params, ids, mask), pos[:, :, None], axis=1)
        else:
            hidden, head = parts
            logits = head(params, jnp.take_along_axis(hidden(params, ids, mask), pos[:, :, None], axis=1))
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.jit(fn)


def _pool(batches: dict) -> tuple[dict, list]:
    """The output arrays {name: int32 [n, L] of -1} and the rows with a supervised position, each as ``(name, row,
    tokens needed, ids, mask, supervised positions)``."""
    out, pool = {}, []
    for name, b in batches.items():
        ids, mask, labels = (np.asarray(a) for a in (b.input_ids, b.attention_mask, b.labels))
        out[name] = np.full(labels.shape, -1, np.int32)
        sup = labels != IGNORE
        real = np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1] != 0, axis=1), 0)
        last_sup = np.where(sup.any(1), labels.shape[1] - np.argmax(sup[:, ::-1], axis=1), 0)
        for r in np.flatnonzero(sup.any(1)):
            pool.append((name, r, max(real[r], last_sup[r]), ids[r], mask[r], np.flatnonzero(sup[r])))
    return out, pool


def _bucketed(batches: dict, budget: Optional[int], call: Callable) -> dict:
    """Argmax at the supervised positions of ``batches`` (see ``predictions_of``), each bucket's calls made by
    ``call(rows, ids [B, L], mask [B, L], pos [B, A]) -> argmax [B, A]`` with ``rows`` the calls' (name, row)s."""
    out, pool = _pool(batches)
    for L, B, rows in plan_buckets(np.array([p[2] for p in pool]), budget) if pool else []:
        A = 1 << (max(len(pool[i][5]) for i in rows) - 1).bit_length()  # a power of 2: fewer shapes to compile
        for s in range(0, len(rows), B):
            part = rows[s:s + B]
            ids = np.zeros((B, L), np.int32)
            mask = np.zeros((B, L), np.int32)
            pos = np.zeros((B, A), np.int32)
            for j, i in enumerate(part):
                _, _, n, row_ids, row_mask, row_pos = pool[i]
                w = min(L, len(row_ids))
                ids[j, :w], mask[j, :w] = row_ids[:w], row_mask[:w]
                pos[j, :len(row_pos)] = row_pos
            got = np.asarray(call([pool[i][:2] for i in part], ids, mask, pos))
            for j, i in enumerate(part):
                name, r, _, _, _, row_pos = pool[i]
                out[name][r, row_pos] = got[j, :len(row_pos)]
    return out


def predictions_of(apply: Callable, params, batches: dict, budget: Optional[int] = None,
                   prefix: Optional["FrozenPrefix"] = None) -> dict:
    """Teacher-forced argmax at the supervised positions (``labels != IGNORE``) of every batch of ``batches``
    {name: TurnBatch [n, L]} → {name: int32 [n, L]}, -1 at every other position (no metric reads those).

    The rows of all batches are pooled, bucketed by length (``plan_buckets``) and each bucket runs in calls of
    [B, L] rows, projecting to the vocabulary only at the gathered supervised positions [B, A]. Rows must be
    right-padded (``lnjax.core.turns.pack``), as causal attention then makes a row's predictions independent of
    the padding after it. With a ``prefix`` of these batches (``frozen_prefix_predictions``) that serves
    ``params`` (their blocks below ``prefix.start`` unchanged), only the blocks from ``prefix.start`` on run."""
    if prefix is not None and prefix.serves(apply, params):
        fn = _suffix_argmax_fn(apply, prefix.start)
        return _bucketed(batches, budget, lambda rows, ids, mask, pos: fn(
            params, prefix.gather(rows, ids.shape), ids, mask, pos))
    fn = _supervised_argmax_fn(apply)
    return _bucketed(batches, budget, lambda rows, ids, mask, pos: fn(params, ids, mask, pos))


# Most host memory a FrozenPrefix may take (float32 residual streams of every probe position); larger evaluation
# sets run every block at every evaluation instead.
PREFIX_BYTES = 4 << 30


@dataclasses.dataclass
class FrozenPrefix:
    """The residual stream entering block ``start`` at every position of every probe of an ``EvalSet``:
    ``states`` {probe: float32 [n, L, d_model]} (L the probe set's packed length), computed once on parameters
    whose ``frozen`` leaves (``lnjax.models.Stages.frozen_leaves``: the embeddings and blocks below ``start``)
    sequential editing at blocks ``start`` and above never changes. Every later evaluation of such parameters runs
    only the blocks from ``start`` on: for edits at SmolLM2's blocks 25-28, 5 of its 30 blocks."""

    start: int
    states: dict
    frozen: list

    def serves(self, apply: Callable, params) -> bool:
        """Whether ``params``' leaves below ``start`` are those the states were computed from (the same arrays,
        or equal ones)."""
        leaves = split_stages(apply).frozen_leaves(params, self.start)
        if len(leaves) != len(self.frozen):
            return False
        if all(a is b for a, b in zip(leaves, self.frozen)):
            return True
        if any(np.shape(a) != np.shape(b) for a, b in zip(leaves, self.frozen)):
            return False
        try:  # compared where the parameters live (a run on a mesh places its own copies there)
            kept = [jax.device_put(b, a.sharding) if isinstance(a, jax.Array) else b
                    for a, b in zip(leaves, self.frozen)]
            return bool(_all_equal(leaves, kept))
        except (ValueError, TypeError):  # not comparable here: every block runs (the same numbers, slower)
            return False

    def gather(self, rows: Sequence[tuple], shape: tuple) -> np.ndarray:
        """The states of ``rows`` [(probe, row)] as one call's input [B, L, d_model] for ``shape`` (B, L) (zeros
        in the rows past ``rows`` and past each probe set's packed length: padding, which causal attention never
        lets a real position read)."""
        L = shape[1]
        d = next(iter(self.states.values())).shape[-1]
        h = np.zeros(tuple(shape) + (d,), np.float32)
        for j, (name, r) in enumerate(rows):
            w = min(L, self.states[name].shape[1])
            h[j, :w] = self.states[name][r, :w]
        return h

    def subset(self, idx: np.ndarray) -> "FrozenPrefix":
        return FrozenPrefix(self.start, {k: v[idx] for k, v in self.states.items()}, self.frozen)


@jax.jit
def _all_equal(a: list, b: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in zip(a, b)]))


def prefix_bytes(batches: dict, d_model: int) -> int:
    """Bytes a ``FrozenPrefix`` of ``batches`` holds."""
    return sum(4 * int(np.prod(np.shape(b.input_ids))) * d_model for b in batches.values())


def frozen_prefix_predictions(apply: Callable, params, batches: dict, start: int,
                              budget: Optional[int] = None) -> tuple[dict, Optional[FrozenPrefix]]:
    """``predictions_of(apply, params, batches)`` computed as blocks below ``start`` then the rest, keeping the
    residual stream between them: ``(predictions, FrozenPrefix)``. The prefix is None (and the predictions those
    of one pass) when ``apply`` cannot be cut into stages or the states would exceed ``PREFIX_BYTES``."""
    stages = split_stages(apply)
    if stages is None or not 0 < start <= stages.n_layers:
        return predictions_of(apply, params, batches, budget), None
    one = jnp.zeros((1, 1), jnp.int32)
    d = int(jax.eval_shape(lambda p: stages.prefix(p, one, one, start), params).shape[-1])
    if prefix_bytes(batches, d) > PREFIX_BYTES:
        return predictions_of(apply, params, batches, budget), None
    states = {k: np.zeros(np.shape(b.input_ids) + (d,), np.float32) for k, b in batches.items()}
    prefix_fn, suffix_fn = _prefix_fn(apply, start), _suffix_argmax_fn(apply, start)

    def call(rows, ids, mask, pos):
        h = prefix_fn(params, ids, mask)
        host = np.asarray(h)
        for j, (name, r) in enumerate(rows):
            w = min(ids.shape[1], states[name].shape[1])
            states[name][r, :w] = host[j, :w]
        return suffix_fn(params, h, ids, mask, pos)

    preds = _bucketed(batches, budget, call)
    return preds, FrozenPrefix(start, states, stages.frozen_leaves(params, start))


def prefix_states(apply: Callable, params, ids: np.ndarray, mask: np.ndarray, start: int) -> np.ndarray:
    """The residual stream entering block ``start`` for ids / mask [n, L]: float32 [n, L, d_model]."""
    return np.asarray(_prefix_fn(apply, start)(params, ids, mask), np.float32)


@functools.lru_cache(maxsize=16)
def _prefix_fn(apply: Callable, start: int) -> Callable:
    """jit of ``(params, ids [B, L], mask [B, L]) -> h`` [B, L, d_model], the stream entering block ``start``."""
    stages = split_stages(apply)
    return jax.jit(lambda params, ids, mask: stages.prefix(params, ids, mask, start))


@functools.lru_cache(maxsize=16)
def _suffix_argmax_fn(apply: Callable, start: int) -> Callable:
    """jit of ``(params, h [B, L, d_model], ids, mask, pos [B, A]) -> argmax [B, A]``: blocks ``start`` on from
    the stream ``h``, then the vocabulary projection at positions ``pos``."""
    stages = split_stages(apply)

    def fn(params, h, ids, mask, pos):
        hidden = stages.suffix(params, h, ids, mask, start)
        logits = stages.head(params, jnp.take_along_axis(hidden, pos[:, :, None], axis=1))
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.jit(fn)


def predictions(apply: Callable, params, batch: TurnBatch, budget: Optional[int] = None) -> np.ndarray:
    """Teacher-forced argmax token at the supervised positions of ``batch`` [n, L] (int32; -1 elsewhere); see
    ``predictions_of``."""
    return predictions_of(apply, params, {"batch": batch}, budget)["batch"]


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
             per_example: bool = False, known: Optional[dict] = None) -> dict:
    """Metrics of ``params`` on ``eval_set`` under each protocol (see the module docstring).

    ``base_locality`` is ``base_predictions`` of the unedited model (needed for ``locality_vs_unedited``). With
    ``per_example`` the per-example arrays are returned under ``"per_example"`` too. ``known`` {probe: [n, L]}
    holds predictions of these very ``params`` already computed (e.g. ``{"locality": base_locality}`` when
    ``params`` is the unedited model), which are used instead of computed again.
    """
    out: dict = {}
    per: dict = {}
    b = eval_set.batches
    if set(protocols) & {"teacher_forced", "locality_vs_unedited", "generation_exact_match"}:
        known = dict(known or {})
        preds = {**known, **predictions_of(apply, params, {k: v for k, v in b.items() if k not in known},
                                           prefix=eval_set.prefix)}
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
