"""The fair evidence protocol on the synthetic world (issue 23): which wordings build, which are only scored;
which subjects tune, which are evaluated; locality probe families that can fail.

- **Wordings.** Each relation has three wordings. ``KEY_WORDINGS`` (wording 0, the wording every edit request is
  written in) is the only wording a memory's slot keys and its whitening are built from; ``EVAL_WORDINGS``
  (1 and 2) are only ever scored: generalization (GS) and every locality probe use them. The older construction
  that averages a fact's key over all three wordings is kept as ``key_wordings="all"`` in
  ``lnjax.world.memory_testbed``; it makes GS the memory's routing rate, i.e. decided by construction (a unit test,
  not evidence).
- **Subjects.** ``fair_split`` divides the subjects of the world's ``edit`` and ``locality`` pools into a
  ``tune`` role and an ``eval`` role (disjoint); hyperparameters are chosen on ``tune`` subjects only, numbers
  are reported on ``eval`` subjects only. The ``train`` pool (StableEdit's warm-up and the memory's whitening)
  belongs to neither. Each subject of the edit pool keeps ``kept_relations`` of its relations out of every edit,
  so that the edited subject's other relations can be probed.
- **Locality families** (``locality_families``), each a set of kept facts of the role, probed in an
  evaluation wording and scored against the unedited model: ``subject`` (the edited subjects' kept relations),
  ``nearest_key`` (for each edited fact, the kept fact whose memory key is nearest to its key), ``shared_answer``
  (kept facts of the same relation whose answer is the edited fact's old answer) and ``random`` (kept facts
  drawn uniformly). ``check_protocol`` asserts all of the above and raises ``ProtocolError`` otherwise.

Facts are numbered as ``World.all_facts()`` orders them: fact ``f`` is (subject ``f // R``, relation ``f % R``),
which is also the memory slot a fact-keyed memory gives it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from lnjax.world import World

KEY_WORDINGS = (0,)
EVAL_WORDINGS = (1, 2)
ROLES = ("tune", "eval")
FAMILIES = ("random", "subject", "nearest_key", "shared_answer")


class ProtocolError(ValueError):
    """The fair protocol is violated (an evaluated wording or subject used to build or tune)."""


@dataclasses.dataclass(frozen=True)
class FairSplit:
    """Subjects and facts per role. ``subjects[role]`` sorted subject ids; ``editable[role]`` the facts edits may
    be drawn from (edit-pool subjects minus their kept relations); ``kept[role]`` facts no edit touches (the kept
    relations of the role's edit-pool subjects, and every fact of its locality-pool subjects). ``seed`` and
    ``tune_fraction`` say how it was drawn."""

    subjects: dict
    editable: dict
    kept: dict
    seed: int
    tune_fraction: float
    kept_relations: int
    key_wordings: tuple = KEY_WORDINGS
    eval_wordings: tuple = EVAL_WORDINGS

    def describe(self) -> dict:
        """JSON-able summary for results metadata."""
        return {"seed": self.seed, "tune_fraction": self.tune_fraction, "kept_relations": self.kept_relations,
                "key_wordings": list(self.key_wordings), "eval_wordings": list(self.eval_wordings),
                **{f"{role}_subjects": int(len(self.subjects[role])) for role in ROLES},
                **{f"{role}_editable_facts": int(len(self.editable[role])) for role in ROLES},
                **{f"{role}_kept_facts": int(len(self.kept[role])) for role in ROLES}}


def fair_split(world: World, seed: int = 0, tune_fraction: float = 1 / 3, kept_relations: int = 1) -> FairSplit:
    """Divide the world's ``edit`` and ``locality`` subjects into ``tune`` / ``eval`` roles (``tune_fraction`` of
    each pool to ``tune``), and give every edit-pool subject ``kept_relations`` relations no edit touches."""
    n_rel = len(world.relations)
    if not 0 < tune_fraction < 1 or not 0 < kept_relations < n_rel:
        raise ValueError(f"tune_fraction must lie in (0, 1) and kept_relations in [1, {n_rel}); got "
                         f"{tune_fraction}, {kept_relations}")
    rng = np.random.default_rng(10_007 * (world.spec.seed + 1) + seed)
    subjects = {r: [] for r in ROLES}
    editable = {r: [] for r in ROLES}
    kept = {r: [] for r in ROLES}
    for pool in ("edit", "locality"):
        ids = rng.permutation(world.pools[pool])
        n_tune = int(round(tune_fraction * len(ids)))
        for role, part in (("tune", ids[:n_tune]), ("eval", ids[n_tune:])):
            subjects[role].extend(int(s) for s in part)
            for s in part:
                facts = int(s) * n_rel + np.arange(n_rel)
                if pool == "locality":
                    kept[role].extend(facts.tolist())
                    continue
                keep = rng.permutation(n_rel)[:kept_relations]
                kept[role].extend(facts[keep].tolist())
                editable[role].extend(np.delete(facts, keep).tolist())
    arr = lambda d: {r: np.sort(np.asarray(v, np.int64)) for r, v in d.items()}
    return FairSplit(arr(subjects), arr(editable), arr(kept), seed, tune_fraction, kept_relations)


def key_examples(world: World, wordings: Sequence[int] = KEY_WORDINGS, tok=None) -> list:
    """Tokenized (prompt_ids, answer_ids) of every fact in each of ``wordings``: ``[wording][fact]`` — what a
    fact-keyed memory's slot keys are built from (only these wordings reach the memory)."""
    tok = tok or world.tokenizer()
    facts = world.all_facts()
    return [[(tok.encode(world.prompt(s, r, t)), tok.encode(" " + world.answer(s, r), False)) for s, r in facts]
            for t in wordings]


def _fact(world: World, f: int) -> tuple[int, int]:
    return int(f) // len(world.relations), int(f) % len(world.relations)


def probe_pairs(world: World, probes: np.ndarray, tok=None) -> list:
    """Tokenized (prompt, true answer) pairs of probes [n, 2] = (fact, wording)."""
    tok = tok or world.tokenizer()
    out = []
    for f, t in probes:
        s, r = _fact(world, f)
        out.append((tok.encode(world.prompt(s, r, int(t))), tok.encode(" " + world.answer(s, r), False)))
    return out


def _record(world: World, f: int, new: int, old: int, loc: tuple, para: int) -> dict:
    s, r = _fact(world, f)
    rel = world.relations[r]
    ls, lr = _fact(world, loc[0])
    return {"subject": world.subjects[s], "src": world.prompt(s, r, KEY_WORDINGS[0]),
            "rephrase": world.prompt(s, r, para), "ans": rel.answers[new], "alt": rel.answers[new],
            "pred": rel.answers[old], "loc": world.prompt(ls, lr, int(loc[1]))[:-2],
            "loc_ans": world.answer(ls, lr), "relation": rel.name}


def edit_records(world: World, split: FairSplit, role: str, n: int, seed: int = 0) -> tuple[list, np.ndarray]:
    """``n`` edit records (ZsRE schema) of distinct editable facts of ``role`` in a seeded order: the request in
    wording 0, the paraphrase in an evaluation wording, the ``loc`` prompt a random kept fact of the role in an
    evaluation wording. Returns ``(records, fact ids [n])``."""
    pool = split.editable[role]
    if n > len(pool):
        raise ValueError(f"the {role!r} role has {len(pool)} editable facts; {n} distinct edits were asked for")
    rng = np.random.default_rng(7_919 * (split.seed + 1) + 1_000 * ROLES.index(role) + seed)
    chosen = pool[rng.permutation(len(pool))[:n]]
    return _records(world, split, role, chosen, rng)


def edit_stream(world: World, split: FairSplit, role: str, n: int, seed: int = 0) -> tuple[list, np.ndarray]:
    """``n`` edit records for horizons longer than the role's editable facts: passes over them in fresh random
    orders, each pass giving every fact a new answer (never its current one) — facts whose answers change over
    time. Returns ``(records, fact ids [n])``; a fact's latest record is the one its ES/GS are scored against."""
    pool = split.editable[role]
    rng = np.random.default_rng(7_919 * (split.seed + 1) + 1_000 * ROLES.index(role) + 500 + seed)
    ids = []
    while len(ids) < n:
        ids.extend(pool[rng.permutation(len(pool))[: n - len(ids)]].tolist())
    return _records(world, split, role, np.asarray(ids, np.int64), rng)


def _records(world, split, role, facts, rng) -> tuple[list, np.ndarray]:
    current: dict = {}
    kept = split.kept[role]
    out = []
    for f in facts:
        s, r = _fact(world, f)
        n_ans = len(world.relations[r].answers)
        old = current.get(int(f), int(world.facts[s, r]))
        new = int(rng.integers(0, n_ans - 1))
        new += new >= old
        current[int(f)] = new
        loc = (int(kept[rng.integers(0, len(kept))]), int(rng.choice(split.eval_wordings)))
        out.append(_record(world, int(f), new, old, loc, int(rng.choice(split.eval_wordings))))
    return out, np.asarray(facts, np.int64)


def locality_families(world: World, split: FairSplit, role: str, edited: np.ndarray, slot_keys: np.ndarray,
                      n: int, seed: int = 0) -> dict:
    """Kept facts of ``role`` to probe, per family (module docstring), ``n`` at most each: name -> probes
    [m, 2] int64 of (fact, evaluation wording). ``edited``: the fact ids a run edits; ``slot_keys`` [d, F] the
    memory's unit key per fact (``nearest_key`` ranks kept facts by cosine with each edited fact's key)."""
    rng = np.random.default_rng(31_337 * (split.seed + 1) + seed)
    kept = split.kept[role]
    edited = np.unique(np.asarray(edited, np.int64))
    n_rel = len(world.relations)
    fam: dict = {}
    fam["random"] = kept
    subj = np.unique(edited // n_rel)
    fam["subject"] = kept[np.isin(kept // n_rel, subj)]
    k = np.asarray(slot_keys, np.float64)
    near = []
    for part in np.array_split(edited, max(1, len(edited) // 1000)):
        cos = k[:, part].T @ k[:, kept]               # [edited, kept]
        near.append(kept[np.argmax(cos, axis=1)])
    fam["nearest_key"] = np.unique(np.concatenate(near)) if near else kept[:0]
    answers = world.facts.reshape(-1)
    old = set(zip((edited % n_rel).tolist(), answers[edited].tolist()))
    fam["shared_answer"] = kept[[(int(f % n_rel), int(answers[f])) in old for f in kept]]
    out = {}
    for name in FAMILIES:
        facts = fam[name]
        facts = facts[rng.permutation(len(facts))[:n]]
        out[name] = np.stack([facts, rng.choice(split.eval_wordings, len(facts))], 1).astype(np.int64)
    return out


def check_protocol(split: FairSplit, *, key_wordings: Sequence[int], tuned_on: Optional[np.ndarray] = None,
                   evaluated: Optional[np.ndarray] = None, families: Optional[dict] = None,
                   edited: Optional[np.ndarray] = None, role: str = "eval") -> None:
    """Raise ``ProtocolError`` unless: the memory's key wordings are disjoint from the scored wordings; tuning
    and evaluation subjects are disjoint (``tuned_on`` / ``evaluated``: subject ids actually used); every
    locality family is non-empty, of the evaluation role's kept facts, in a scored wording, and disjoint from
    the ``edited`` facts (families of ``role``)."""
    if set(key_wordings) & set(split.eval_wordings):
        raise ProtocolError(f"memory keys built from wordings {sorted(set(key_wordings))} that are scored "
                            f"(evaluation wordings {list(split.eval_wordings)})")
    if set(split.subjects["tune"].tolist()) & set(split.subjects["eval"].tolist()):
        raise ProtocolError("the split's tune and eval subjects overlap")
    if tuned_on is not None and evaluated is not None:
        both = set(np.asarray(tuned_on).tolist()) & set(np.asarray(evaluated).tolist())
        if both:
            raise ProtocolError(f"{len(both)} subjects were both tuned on and evaluated (e.g. {min(both)})")
    if families is not None:
        edited_set = set(np.asarray(edited if edited is not None else [], np.int64).tolist())
        kept = set(split.kept[role].tolist())
        for name, probes in families.items():
            if len(probes) == 0:
                raise ProtocolError(f"locality family {name!r} is empty")
            facts = set(probes[:, 0].tolist())
            if facts & edited_set:
                raise ProtocolError(f"locality family {name!r} holds {len(facts & edited_set)} edited facts")
            if not facts <= kept:
                raise ProtocolError(f"locality family {name!r} holds facts outside the {role} role's kept facts")
            if not set(probes[:, 1].tolist()) <= set(split.eval_wordings):
                raise ProtocolError(f"locality family {name!r} probes a wording that is not an evaluation wording")


@dataclasses.dataclass
class FairJob:
    """One seed's edits on a role, packed, with everything scored on them: ``batches`` TurnBatch [T, E, L] and
    ``order`` [T, E] (indices into ``facts``), ``warmup`` (StableEdit's train-pool turns, or None), ``eval_set``
    (edit wording 0 / paraphrase in an evaluation wording / a random kept fact), ``base_loc`` the unedited
    model's predictions on its locality probes, ``families`` name -> (TurnBatch, unedited predictions),
    ``facts`` [n] the edited fact ids, ``tokenized`` the records."""

    batches: object
    order: np.ndarray
    warmup: object
    eval_set: object
    base_loc: np.ndarray
    families: dict
    facts: np.ndarray
    tokenized: list


def slot_keys_of(model, layer: int) -> np.ndarray:
    """The unit slot keys [d, F] of the fact memory at block ``layer`` (``nearest_key`` ranks by them)."""
    return np.asarray(model.params["model"]["layers"][layer]["memory"]["key_proj"]["kernel"])


def prepare(model, world: World, split: FairSplit, role: str, turns: int, edits_per_turn: int, seed: int,
            warmup_turns: int = 0, family_size: int = 500, layer: int = 3) -> FairJob:
    """Draw ``turns * edits_per_turn`` edits of ``role`` (``edit_records``), pack them into turns, and build the
    evaluation: ES/GS/random locality per record and the locality families (``family_size`` probes each) with
    the unedited model's predictions. ``check_protocol`` runs on the result."""
    from lnjax import data
    from lnjax import eval as ev
    from lnjax.core.turns import pack_turns, probe_length
    tok = world.tokenizer()
    rows, facts = edit_records(world, split, role, turns * edits_per_turn, seed)
    recs = data.tokenize(data.records_from_dicts("zsre", rows, f"world:fair:{role}"), tok)
    warm_recs = data.tokenize(data.records_from_dicts(
        "zsre", world.records("train", warmup_turns * edits_per_turn, seed=seed), "world:train"), tok) \
        if warmup_turns else []
    length = max(probe_length(*r.edit) for r in recs + warm_recs)
    batches, order = pack_turns([r.edit for r in recs], edits_per_turn, length)
    warm = pack_turns([r.edit for r in warm_recs], edits_per_turn, length)[0] if warm_recs else None
    fams = locality_families(world, split, role, facts, slot_keys_of(model, layer), family_size, seed)
    check_protocol(split, key_wordings=KEY_WORDINGS, families=fams, edited=facts, role=role)
    eval_set = ev.build_eval_set(recs)
    return FairJob(batches, order, warm, eval_set, ev.base_predictions(model.apply, model.params, eval_set),
                   family_predictions(model, world, fams), facts, recs)


def family_predictions(model, world: World, families: dict) -> dict:
    """Probes [m, 2] per family -> (TurnBatch [m, L], the unedited ``model``'s teacher-forced argmax [m, L])."""
    from lnjax import eval as ev
    from lnjax.core.turns import pack
    tok = world.tokenizer()
    out = {}
    for name, probes in families.items():
        batch = pack(probe_pairs(world, probes, tok))
        out[name] = (batch, ev.predictions(model.apply, model.params, batch))
    return out


def family_locality(apply, params, families: dict) -> dict:
    """Locality vs the unedited model per family (``family_predictions``): name -> mean agreement."""
    from lnjax import eval as ev
    return {name: float(ev.agreement(ev.predictions(apply, params, batch), base, np.asarray(batch.labels)).mean())
            for name, (batch, base) in families.items()}


def evaluate(apply, params, job: FairJob) -> dict:
    """ES / GS (teacher-forced), locality vs the unedited model on the records' random kept facts, and per
    locality family; ``score`` = mean(ES, GS, the lowest locality) (the tuning rule's objective)."""
    from lnjax import eval as ev
    m = ev.evaluate(apply, params, job.eval_set, job.base_loc, ("teacher_forced", "locality_vs_unedited"))
    fam = family_locality(apply, params, job.families)
    tf = m["teacher_forced"]
    low = min([m["locality_vs_unedited"], *fam.values()])
    return {"efficacy": tf["efficacy"], "generalization": tf["generalization"],
            "locality": m["locality_vs_unedited"], "locality_families": fam, "locality_min": low,
            "score": (tf["efficacy"] + tf["generalization"] + low) / 3}


__all__ = ["EVAL_WORDINGS", "FAMILIES", "FairJob", "FairSplit", "KEY_WORDINGS", "ProtocolError", "ROLES",
           "check_protocol", "edit_records", "edit_stream", "evaluate", "fair_split", "family_locality",
           "family_predictions", "key_examples", "locality_families", "prepare", "probe_pairs", "slot_keys_of"]
