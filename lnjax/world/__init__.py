"""A synthetic knowledge world: invented people, relations with paraphrase templates, multi-token answers.

Deterministic from a seed. It emits edit records in the ZsRE schema (``subject``, ``src``, ``rephrase``,
``ans``, ``alt``, ``pred``, ``loc``, ``loc_ans``) from three disjoint pools of subjects, so the same readers and
pipeline serve synthetic and real data:

- ``edit``: facts that runs rewrite (counterfactual targets drawn from the relation's answer set);
- ``train``: facts for StableEdit's warm-up turns (the dataset's "training split");
- ``locality``: facts that are never edited; they supply every record's ``loc`` prompt.

The world's tokenizer is word-level (a ``tokenizers`` WordLevel model with a BOS post-processor), so a model
trained on the world can be exported as an ordinary HF checkpoint with ``tokenizer.json``. Each invented name
is one token (a rare-entity token, like a surname a large tokenizer keeps whole); answers are 1-3 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import numpy as np

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = 0, 1, 2, 3

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_NUCLEI = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r")


@dataclasses.dataclass(frozen=True)
class Relation:
    """A relation: ``name``, its question ``templates`` (``{s}`` = subject, ending in ``?``) and answer set."""

    name: str
    templates: tuple
    answers: tuple


def _relations(rng: np.random.Generator, n_answers: int) -> tuple:
    # Answer words are relation-specific tokens; answers are 1-3 of them, so edits are multi-token.
    # Every wording ends with the subject, as in "the capital of France?": the model then looks the fact up in
    # the MLPs at the question mark, the position the editors write to.
    specs = [
        ("city", ("city of {s} ?", "home town of {s} ?", "where lives {s} ?"),
         ("port", "lake", "north", "new", "old", "upper", "san", "fort"), 3),
        ("job", ("job of {s} ?", "occupation of {s} ?", "what works {s} ?"),
         ("senior", "chief", "junior", "field", "night", "head"), 2),
        ("country", ("birth country of {s} ?", "native land of {s} ?", "where was born {s} ?"),
         ("republic", "kingdom", "united", "free", "east", "west"), 2),
        ("language", ("language of {s} ?", "mother tongue of {s} ?", "what speaks {s} ?"),
         ("high", "low", "middle", "classic"), 2),
    ]
    out = []
    for name, templates, prefixes, max_len in specs:
        heads = [f"{name}_{i}" for i in range(n_answers)]
        answers = []
        for i in range(n_answers):
            n_prefix = int(rng.integers(0, max_len))
            words = list(rng.choice(prefixes, size=n_prefix, replace=False)) if n_prefix else []
            answers.append(" ".join(words + [heads[i]]))
        out.append(Relation(name, templates, tuple(answers)))
    return tuple(out)


def _names(rng: np.random.Generator, n: int) -> list[str]:
    syllables = [o + v + c for o in _ONSETS for v in _NUCLEI for c in _CODAS]
    seen, names = set(), []
    while len(names) < n:
        k = 2 if rng.random() < 0.6 else 3
        name = "".join(rng.choice(syllables, size=k))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Size and seed of a world: ``n_subjects`` people, each with one answer for every relation."""

    seed: int = 0
    n_subjects: int = 3000
    n_answers: int = 40
    edit_fraction: float = 0.6
    train_fraction: float = 0.1


class World:
    """Facts ``facts[s, r]`` (answer index of subject s for relation r), names, relations and a tokenizer."""

    def __init__(self, spec: WorldSpec = WorldSpec()):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        self.relations = _relations(rng, spec.n_answers)
        self.subjects = _names(rng, spec.n_subjects)
        self.facts = rng.integers(0, spec.n_answers, size=(spec.n_subjects, len(self.relations)))
        perm = rng.permutation(spec.n_subjects)
        n_edit = int(spec.edit_fraction * spec.n_subjects)
        n_train = int(spec.train_fraction * spec.n_subjects)
        self.pools = {"edit": np.sort(perm[:n_edit]), "train": np.sort(perm[n_edit:n_edit + n_train]),
                      "locality": np.sort(perm[n_edit + n_train:])}
        self.vocab = self._vocab()

    @property
    def n_facts(self) -> int:
        return self.facts.size

    def _vocab(self) -> dict[str, int]:
        words: list[str] = list(SPECIALS)
        seen = set(words)
        texts = [t for r in self.relations for t in r.templates] + [a for r in self.relations for a in r.answers]
        texts += self.subjects
        for text in texts:
            for w in text.replace("{s}", " ").split():
                if w not in seen:
                    seen.add(w)
                    words.append(w)
        return {w: i for i, w in enumerate(words)}

    def prompt(self, subject: int, relation: int, template: int) -> str:
        """The question text of fact (subject, relation) in wording ``template``."""
        return self.relations[relation].templates[template].format(s=self.subjects[subject])

    def answer(self, subject: int, relation: int) -> str:
        return self.relations[relation].answers[self.facts[subject, relation]]

    def tokenizer(self):
        """A ``lnjax.hf.Tokenizer`` over this world's vocabulary (BOS prepended with special tokens)."""
        from lnjax.io.hf import Tokenizer
        return Tokenizer(self._hf_tokenizer(), "world")

    @functools.lru_cache(maxsize=None)
    def _hf_tokenizer(self):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, processors, decoders

        tok = HFTokenizer(models.WordLevel(vocab=self.vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        return tok

    def save_tokenizer(self, directory: str) -> str:
        """Write ``tokenizer.json`` into ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        self._hf_tokenizer().save(path)
        return path

    def all_facts(self, pool: Optional[str] = None) -> np.ndarray:
        """(subject, relation) pairs [F, 2] of a pool (or of the whole world)."""
        subjects = np.arange(self.spec.n_subjects) if pool is None else self.pools[pool]
        rel = np.arange(len(self.relations))
        return np.stack(np.meshgrid(subjects, rel, indexing="ij"), -1).reshape(-1, 2)

    def records(self, split: str, n: int, seed: Optional[int] = None) -> list[dict]:
        """``n`` edit records in the ZsRE schema from pool ``split`` (``edit`` or ``train``), distinct facts in a
        seeded random order, each with a counterfactual target and a locality fact from the ``locality`` pool.

        ``src`` uses wording 0, ``rephrase`` a different wording; ``loc`` has no trailing ``?`` (the ZsRE reader
        appends one, as the reference does).
        """
        if split not in ("edit", "train"):
            raise ValueError(f"split must be 'edit' or 'train', got {split!r}")
        facts = self.all_facts(split)
        if n > len(facts):
            raise ValueError(f"the {split!r} pool has {len(facts)} facts; {n} distinct edits were asked for")
        rng = np.random.default_rng(self.spec.seed * 1000 + (seed if seed is not None else 0) + (split == "train"))
        chosen = facts[rng.permutation(len(facts))[:n]]
        loc_facts = self.all_facts("locality")
        loc_pick = loc_facts[rng.integers(0, len(loc_facts), n)]
        out = []
        for (s, r), (ls, lr) in zip(chosen, loc_pick):
            rel = self.relations[r]
            true = int(self.facts[s, r])
            new = int(rng.integers(0, len(rel.answers) - 1))
            new += new >= true
            para = int(rng.integers(1, len(rel.templates)))
            loc_t = int(rng.integers(0, len(self.relations[lr].templates)))
            out.append({
                "subject": self.subjects[s], "src": self.prompt(s, r, 0), "rephrase": self.prompt(s, r, para),
                "ans": rel.answers[new], "alt": rel.answers[new], "pred": rel.answers[true],
                "loc": self.prompt(ls, lr, loc_t)[:-2], "loc_ans": self.answer(ls, lr),
                "relation": rel.name,
            })
        return out

    def edit_stream(self, n: int, seed: int = 0) -> tuple[list[dict], np.ndarray]:
        """``n`` edit records for horizons longer than the edit pool: passes over the pool's facts in fresh
        random orders, each pass giving every fact a new counterfactual target (different from its previous one).

        Returns ``(records, fact_id [n])``; the latest record of a fact is the one a horizon study evaluates.
        """
        facts = self.all_facts("edit")
        rng = np.random.default_rng(self.spec.seed * 7919 + seed)
        loc_facts = self.all_facts("locality")
        current = {i: int(self.facts[s, r]) for i, (s, r) in enumerate(facts)}
        out, ids = [], []
        while len(out) < n:
            for i in rng.permutation(len(facts))[: n - len(out)]:
                s, r = facts[i]
                rel = self.relations[r]
                new = int(rng.integers(0, len(rel.answers) - 1))
                new += new >= current[i]
                current[i] = new
                ls, lr = loc_facts[rng.integers(0, len(loc_facts))]
                para = int(rng.integers(1, len(rel.templates)))
                out.append({"subject": self.subjects[s], "src": self.prompt(s, r, 0),
                            "rephrase": self.prompt(s, r, para), "ans": rel.answers[new], "alt": rel.answers[new],
                            "pred": self.answer(s, r), "loc": self.prompt(ls, lr, 0)[:-2],
                            "loc_ans": self.answer(ls, lr), "relation": rel.name})
                ids.append(int(i))
        return out, np.asarray(ids)

    def write_records(self, path: str, split: str, n: int, seed: Optional[int] = None) -> str:
        """Write ``records(split, n)`` as a JSON array (the published files' format); returns ``path``."""
        with open(path, "w") as f:
            json.dump(self.records(split, n, seed), f, indent=1)
        return path


@functools.lru_cache(maxsize=4)
def default_world(seed: int = 0) -> World:
    """The embedded default world (``WorldSpec(seed=seed)``)."""
    return World(WorldSpec(seed=seed))

